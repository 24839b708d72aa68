"""The chat pages in headless Chromium, against daphne and the provider simulator.

A real daphne serves the app from its own database (a SQLite file, or `<name>_browser` when
DATABASE_URL is PostgreSQL) and talks to a simulator streaming 15 tokens a second, so an
answer visibly arrives in steps. Set SAVE_SCREENSHOTS=1 to refresh docs/screenshots/.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "docs" / "screenshots"
PASSWORD = "pw-for-browser-1"
TOKENS_PER_SECOND = 15
MODEL = "ollama:llama3.2:latest"
XSS_BRAND = "<img src=x onerror=alert('brand')>Initrode"
XSS_MESSAGE = "<img src=x onerror=alert('msg')><script>alert('msg')</script> **bold** [click](javascript:alert(1))"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing: apt-get install -y chromium"),
]

SEED = f"""
from django.contrib.auth import get_user_model
from billing.models import Brand, ClientDomain
user = get_user_model().objects.create_user("olivia", "olivia@example.com", {PASSWORD!r}, first_name="Olivia")
acme = ClientDomain.objects.create(name="Acme Corp", slug="acme", hourly_rate="150.00")
Brand.objects.create(client=acme, name="Acme Legal", primary_color="#0b7285", accent_color="#e67700",
                     background_color="#f4f8f9", font="humanist", is_default=True,
                     welcome_text="Acme's contract desk. Every minute here is billed to Acme Corp.")
globex = ClientDomain.objects.create(name="Globex", slug="globex", hourly_rate="200.00")
Brand.objects.create(client=globex, name="Globex Research", primary_color="#c92a2a", accent_color="#364fc7",
                     background_color="#fbf7f5", font="serif", is_default=True)
initrode = ClientDomain.objects.create(name="Initrode", slug="initrode")
Brand.objects.create(client=initrode, name={XSS_BRAND!r}, primary_color="#2b8a3e", is_default=True)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_http(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status < 500:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in time")


def _browser_database(env: dict, workdir: Path) -> str:
    """A database of the server's own: the test process's database is not visible to it."""
    url = env.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        return f"sqlite:///{workdir / 'db.sqlite3'}"
    import psycopg

    parsed = urlparse(url)
    name = f"{parsed.path.lstrip('/') or 'postgres'}_browser"
    admin = urlunparse(parsed._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return urlunparse(parsed._replace(path=f"/{name}"))


@pytest.fixture(scope="module")
def live_url(tmp_path_factory):
    """daphne serving the app (with a slow simulator behind it); yields its base URL."""
    # On tmpfs when there is one: migrating a fresh SQLite file is mostly fsync otherwise.
    shm = Path("/dev/shm")
    workdir = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() else tmp_path_factory.mktemp("browser")
    sim_port, port = _free_port(), _free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings_test",
        "DEBUG": "1",
        "SERVE_STATIC": "1",
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "OLLAMA_HOST": f"http://127.0.0.1:{sim_port}",
        "OPENAI_API_KEY": "",
        "ANTHROPIC_API_KEY": "",
        "PROVIDER_SIMULATOR": "0",
        "PYTHONUNBUFFERED": "1",
    }
    env["DATABASE_URL"] = _browser_database(env, workdir)
    manage = [sys.executable, str(ROOT / "manage.py")]
    processes: list[subprocess.Popen] = []
    log = (workdir / "server.log").open("w")
    try:
        processes.append(
            subprocess.Popen(
                [*manage, "simulate_providers", "--port", str(sim_port), "--tokens-per-second", str(TOKENS_PER_SECOND)],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        subprocess.run([*manage, "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True, timeout=180)
        subprocess.run([*manage, "shell", "-c", SEED], cwd=ROOT, env=env, check=True, timeout=60)
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "config.asgi:application"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        deadline = time.monotonic() + 30
        _wait_for_http(f"http://127.0.0.1:{sim_port}/api/version", deadline)
        _wait_for_http(f"http://127.0.0.1:{port}/accounts/login/", deadline)
        yield f"http://127.0.0.1:{port}"
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            if process.poll() is None:
                process.kill()
        log.close()
        if workdir.parent == shm:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, live_url):
    """A signed-in page; every unexpected dialog (an alert from injected script) is recorded."""
    context = browser.new_context(base_url=live_url, viewport={"width": 1280, "height": 860}, device_scale_factor=1)
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.unexpected_dialogs = []

    def on_dialog(dialog):
        if dialog.type == "confirm" and dialog.message.startswith("End this session?"):
            dialog.accept()
        else:
            page.unexpected_dialogs.append(f"{dialog.type}: {dialog.message}")
            dialog.dismiss()

    page.on("dialog", on_dialog)
    # Whatever the Content-Security-Policy blocks, the browser reports on the console.
    page.csp_violations = []
    page.on(
        "console",
        lambda message: "Content Security Policy" in message.text and page.csp_violations.append(message.text),
    )
    page.goto("/accounts/login/")
    page.fill("#id_username", "olivia")
    page.fill("#id_password", PASSWORD)
    page.click(".auth-card button[type=submit]")
    page.wait_for_url(f"{live_url}/")
    yield page
    context.close()


def start_session(page, client: str, name: str) -> None:
    page.goto("/sessions/new/")
    page.select_option("#id_client", client)
    page.select_option("#id_model", MODEL)
    page.fill("#id_name", name)
    page.click(".card-form button[type=submit]")
    page.wait_for_url(re.compile(r"/sessions/[0-9a-f-]{36}/$"))
    page.wait_for_selector("[data-conn][data-state=live]")


def record_streaming_steps(page) -> None:
    """Note the streaming answer's text length at every change of the conversation."""
    page.evaluate(
        """() => {
            window.__steps = [];
            const log = document.querySelector("[data-log]");
            new MutationObserver(() => {
                const body = log.querySelector(".msg--streaming .msg__body");
                if (body) window.__steps.push(body.textContent.length);
            }).observe(log, {childList: true, subtree: true, characterData: true});
        }"""
    )


def ask(page, text: str) -> None:
    answers = page.locator(".msg--assistant:not(.msg--streaming)").count()
    page.fill("#composer-input", text)
    page.press("#composer-input", "Enter")
    page.wait_for_function(
        "n => document.querySelectorAll('.msg--assistant:not(.msg--streaming)').length > n "
        "&& !document.querySelector('.msg--streaming')",
        arg=answers,
    )


def brand_primary(page) -> tuple[str, str]:
    """The brand colour custom property, and the header's computed background."""
    return tuple(
        page.evaluate(
            """() => [
            getComputedStyle(document.documentElement).getPropertyValue("--brand-primary").trim(),
            getComputedStyle(document.querySelector(".site-header")).backgroundColor,
        ]"""
        )
    )


def test_a_consultants_session_from_start_to_summary(page):
    start_session(page, "acme", "Supplier contract review")
    assert page.locator("[data-client-name]").inner_text() == "Acme Corp"
    assert brand_primary(page) == ("#0b7285", "rgb(11, 114, 133)")

    # The timer runs.
    first = page.locator("[data-timer]").inner_text()
    page.wait_for_function("t => document.querySelector('[data-timer]').textContent !== t", arg=first)

    # Shift+Enter breaks the line, Enter sends; the answer arrives in visible steps.
    page.fill("#composer-input", "Which clauses limit our liability?")
    page.press("#composer-input", "Shift+Enter")
    page.type("#composer-input", "Quote them, please.")
    assert page.input_value("#composer-input") == "Which clauses limit our liability?\nQuote them, please."
    record_streaming_steps(page)
    page.press("#composer-input", "Enter")
    page.wait_for_selector(".msg--assistant:not(.msg--streaming)")
    steps = page.evaluate("window.__steps")
    assert len({n for n in steps if n > 0}) >= 3, steps
    answer = page.locator(".msg--assistant .msg__body").last.inner_text()
    assert answer.startswith("Simulated answer to")
    assert page.locator(".msg--user .msg__body").last.inner_text() == (
        "Which clauses limit our liability?\nQuote them, please."
    )
    assert page.locator("[data-tokens]").inner_text() != "0"

    # Switch to Globex: the page takes Globex's brand without a reload.
    page.click("[data-switch-open]")
    page.select_option("#switch-client", "globex")
    page.fill("#switch-reason", "Globex asked about the same supplier")
    page.click("[data-switch-form] button[type=submit]")
    page.wait_for_selector(".notice-bar--success")
    assert page.locator("[data-client-name]").inner_text() == "Globex"
    assert brand_primary(page) == ("#c92a2a", "rgb(201, 42, 42)")
    assert page.locator(".brand__name").inner_text() == "Globex Research"
    ask(page, "Summarise the indemnity terms for Globex.")

    if os.environ.get("SAVE_SCREENSHOTS"):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "chat.png"))

    page.click("[data-end]")
    page.wait_for_url(re.compile(r"/summary/$"))
    assert page.locator("tr[data-client=acme]").count() == 1
    assert page.locator("tr[data-client=globex]").count() == 1
    assert "Integrity verified" in page.locator(".integrity").inner_text()
    assert page.unexpected_dialogs == []
    assert page.csp_violations == []
    if os.environ.get("SAVE_SCREENSHOTS"):
        page.screenshot(path=str(SCREENSHOTS / "summary.png"), full_page=True)


def test_script_in_a_message_or_a_brand_name_stays_text(page):
    start_session(page, "acme", "Escaping check")
    ask(page, XSS_MESSAGE)
    assert page.locator(".msg--user .msg__body").last.inner_text() == XSS_MESSAGE
    assert "<img src=x onerror=alert('msg')><script>" in page.locator(".msg--assistant .msg__body").last.inner_text()
    assert page.locator("a[href^='javascript']").count() == 0

    page.click("[data-switch-open]")
    page.select_option("#switch-client", "initrode")
    page.click("[data-switch-form] button[type=submit]")
    page.wait_for_selector(".notice-bar--success")
    assert page.locator(".brand__name").inner_text() == XSS_BRAND

    page.reload()
    page.wait_for_selector("[data-conn][data-state=live]")
    assert page.locator(".brand__name").inner_text() == XSS_BRAND
    assert page.locator("img[src=x]").count() == 0
    assert page.unexpected_dialogs == []


def test_a_connection_dropped_mid_answer_comes_back_with_the_stored_partial(page):
    sockets = []

    def route(ws):
        sockets.append((ws, ws.connect_to_server()))

    page.route_web_socket(re.compile(r"/ws/sessions/"), route)
    start_session(page, "acme", "Flaky train wifi")
    page.fill("#composer-input", "Explain the termination clause in eight short words")
    page.press("#composer-input", "Enter")
    page.wait_for_function("() => document.querySelector('.msg--streaming .msg__body')?.textContent.length > 0")
    page_side, server_side = sockets[-1]
    server_side.close()
    page_side.close()

    # The page reconnects by itself and shows the answer as the server stored it: partial.
    page.wait_for_selector(".msg--assistant.msg--partial")
    page.wait_for_selector("[data-conn][data-state=live]")
    assert len(sockets) >= 2
    assert page.locator(".msg--streaming").count() == 0
    assert "partial answer kept" in page.locator(".msg--assistant.msg--partial .msg__meta").inner_text()
    assert (
        page.locator(".msg--user .msg__body").last.inner_text() == "Explain the termination clause in eight short words"
    )
    ask(page, "And now the whole answer?")
    assert page.locator(".msg--assistant.msg--complete").count() == 1


def test_markdown_is_built_as_nodes_and_unsafe_links_stay_text(page):
    source = (
        "# Plan\n\nSome **bold**, *italic* and `code`.\n\n"
        "- one\n- two\n  - nested\n\n1. first\n2. second\n\n"
        "```python\nprint('<b>hi</b>')\n```\n\n"
        "| a | b |\n|---|---:|\n| <i>x</i> | 2 |\n\n"
        "> quoted\n\n[ok](https://example.com) [bad](javascript:alert(1)) <img src=x onerror=alert(1)>"
    )
    result = page.evaluate(
        """async (source) => {
            const { renderMarkdown } = await import("/static/js/markdown.js");
            const root = document.createElement("div");
            root.append(renderMarkdown(source));
            return {
                heading: root.querySelector("h3")?.textContent,
                strong: root.querySelector("p strong")?.textContent,
                em: root.querySelector("p em")?.textContent,
                code: root.querySelector("p code")?.textContent,
                items: root.querySelectorAll(":scope > ul > li").length,
                nested: root.querySelector("ul ul li")?.textContent,
                ordered: Array.from(root.querySelectorAll("ol > li"), (li) => li.textContent),
                block: root.querySelector(".code-block code")?.textContent,
                language: root.querySelector(".code-lang")?.textContent,
                cell: root.querySelector("tbody td")?.textContent,
                align: root.querySelector("tbody td:last-child")?.style.textAlign,
                quote: root.querySelector("blockquote")?.textContent.trim(),
                links: Array.from(root.querySelectorAll("a"), (a) => a.getAttribute("href")),
                images: root.querySelectorAll("img, script, i").length,
                text: root.textContent,
            };
        }""",
        source,
    )
    assert result["heading"] == "Plan"
    assert (result["strong"], result["em"], result["code"]) == ("bold", "italic", "code")
    assert result["items"] == 2 and result["nested"] == "nested"
    assert result["ordered"] == ["first", "second"]
    assert (result["block"], result["language"]) == ("print('<b>hi</b>')", "python")
    assert (result["cell"], result["align"]) == ("<i>x</i>", "right")
    assert result["quote"] == "quoted"
    assert result["links"] == ["https://example.com"]
    assert result["images"] == 0
    assert "[bad](javascript:alert(1))" in result["text"]
    assert "<img src=x onerror=alert(1)>" in result["text"]
    assert page.unexpected_dialogs == []


def test_every_page_passes_the_content_security_policy(page, live_url):
    """Issue 18: a CSP with no inline script but by nonce; every page works under it."""
    start_session(page, "acme", "Policy check")
    ask(page, "Hello under the policy")
    chat_path = urlparse(page.url).path
    headers = page.goto(chat_path).headers
    assert "script-src 'self' 'nonce-" in headers["content-security-policy"]
    assert "'unsafe-inline'" not in headers["content-security-policy"].split("script-src")[1].split(";")[0]
    page.wait_for_selector("[data-conn][data-state=live]")
    for path in ("/", "/sessions/", "/sessions/new/", "/search/?q=policy", "/reports/", chat_path):
        page.goto(path)
        page.wait_for_load_state("networkidle")
    page.goto("/sessions/new/")
    page.select_option("#id_client", "globex")  # the brand list follows (static/js/session_new.js)
    assert page.locator("#id_brand optgroup:not([hidden])").count() == 1
    page.goto("/")
    first = page.locator(".live-timer").first.inner_text()  # ticking (static/js/live_timers.js)
    page.wait_for_function("t => document.querySelector('.live-timer').textContent !== t", arg=first)
    if os.environ.get("SAVE_SCREENSHOTS"):
        page.goto("/search/?q=policy")
        page.screenshot(path=str(SCREENSHOTS / "search.png"), full_page=True)
    assert page.csp_violations == []
    assert page.unexpected_dialogs == []
