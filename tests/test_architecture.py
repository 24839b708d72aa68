"""Which way the dependencies point (docs/ARCHITECTURE.md "Dependencies").

`providers` is a leaf: none of its modules (its own tests aside) imports an app of the
project, at module level or inside a function. It learns about models from the catalogue
billing hands it (`providers.router.set_catalogue`).

`sessions_app` builds on `billing` (clients, brands, prices, money, budgets). `billing` reads
sessions for its reports and invoices, so it may import `sessions_app.models` and
`sessions_app.errors`, and nothing else of it: no session services, views or selectors.
"""

from __future__ import annotations

import ast
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
APPS = ("sessions_app", "billing")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def product_modules(package: str) -> list[Path]:
    return [p for p in sorted((BASE_DIR / package).rglob("*.py")) if "tests" not in p.relative_to(BASE_DIR).parts]


def test_providers_import_no_app_of_the_project():
    offending = [
        f"{path.relative_to(BASE_DIR)}:{line} imports {module}"
        for path in product_modules("providers")
        for line, module in imported_modules(path)
        if module.split(".")[0] in APPS
    ]
    assert offending == []


BILLING_MAY_IMPORT = {"sessions_app.models", "sessions_app.errors"}


def test_billing_reads_sessions_but_never_drives_them():
    offending = [
        f"{path.relative_to(BASE_DIR)}:{line} imports {module}"
        for path in product_modules("billing")
        if "migrations" not in path.parts
        for line, module in imported_modules(path)
        if module.split(".")[0] == "sessions_app" and module not in BILLING_MAY_IMPORT
    ]
    assert offending == []


def test_the_checker_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from billing.models import ModelAlias\n")
    assert imported_modules(sample) == [(2, "billing.models")]
