"""Type-check with mypy against a committed baseline that may only shrink.

    python scripts/mypy_baseline.py            # fail on any error not in mypy-baseline.txt
    python scripts/mypy_baseline.py --update   # rewrite the baseline (only ever to remove lines)

An error is keyed by file, code and message, without its line number, so unrelated edits that
move code do not count as new errors. Errors fixed since the baseline are reported, and
`--update` drops them.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
BASELINE = BASE_DIR / "mypy-baseline.txt"
TARGETS = ["billing", "sessions_app", "providers", "config", "tests", "conftest.py"]
LINE = re.compile(r"^(?P<path>[^:]+):\d+: error: (?P<message>.*)$")


def current_errors() -> tuple[Counter[str], str]:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", *TARGETS], cwd=BASE_DIR, capture_output=True, text=True, check=False
    )
    if result.returncode not in (0, 1):
        sys.exit(f"mypy could not run:\n{result.stdout}{result.stderr}")
    keys: Counter[str] = Counter()
    for line in result.stdout.splitlines():
        match = LINE.match(line)
        if match:
            keys[f"{match['path']}: {match['message']}"] += 1
    return keys, result.stdout


def read_baseline() -> Counter[str]:
    if not BASELINE.exists():
        return Counter()
    return Counter(line for line in BASELINE.read_text().splitlines() if line and not line.startswith("#"))


def main(argv: list[str]) -> int:
    now, output = current_errors()
    baseline = read_baseline()
    new = now - baseline
    fixed = baseline - now
    if "--update" in argv:
        header = "# mypy errors accepted for now (scripts/mypy_baseline.py). This file may only shrink.\n"
        BASELINE.write_text(header + "".join(f"{key}\n" for key in sorted(now.elements())))
        print(f"mypy baseline: {sum(now.values())} errors recorded")
        return 0
    if fixed:
        print(f"mypy: {sum(fixed.values())} baseline errors are fixed; run `scripts/mypy_baseline.py --update`.")
    if new:
        print(f"mypy: {sum(new.values())} new errors (not in mypy-baseline.txt):")
        shown = set(new)
        for line in output.splitlines():
            match = LINE.match(line)
            if match and f"{match['path']}: {match['message']}" in shown:
                print(line)
        return 1
    print(f"mypy: no new errors ({sum(now.values())} in the baseline)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
