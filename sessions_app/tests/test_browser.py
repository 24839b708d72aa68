"""The chat pages in headless Chromium, against daphne and the provider simulator.

A real daphne serves the app from its own database (a SQLite file, or `<name>_browser_<worker>` when
DATABASE_URL is PostgreSQL) and talks to a simulator streaming 15 tokens a second, so an
answer visibly arrives in steps. Set SAVE_SCREENSHOTS=1 to refresh docs/screenshots/.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

from sessions_app.tests.processes import daphne, free_port, server_database

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


def _wait_for_http(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status < 500:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in time")


class Server:
    """daphne serving the app; a test may kill it and start it again on the same port."""

    def __init__(self, env: dict, log) -> None:
        self.env = env
        self.log = log
        self.port: int | None = None  # handed over on the first start, kept for restarts
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process, self.port = daphne(self.env, self.log, port=self.port)
        _wait_for_http(f"{self.url}/accounts/login/", time.monotonic() + 90)

    def kill(self) -> None:
        """SIGKILL: the process dies mid-answer, as a crash or an OOM kill would leave it."""
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        """SIGTERM: the orderly stop of a restart."""
        self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=30)
        if self.process.poll() is None:
            self.process.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """daphne serving the app (with a slow simulator behind it)."""
    # On tmpfs when there is one: migrating a fresh SQLite file is mostly fsync otherwise.
    shm = Path("/dev/shm")
    workdir = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() else tmp_path_factory.mktemp("browser")
    sim_port = free_port()
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
        "SHUTDOWN_GRACE_SECONDS": "1",
    }
    env["DATABASE_URL"] = server_database(env, workdir, "browser")
    manage = [sys.executable, str(ROOT / "manage.py")]
    log = (workdir / "server.log").open("w")
    simulator = None
    web = Server(env, log)
    try:
        simulator = subprocess.Popen(
            [*manage, "simulate_providers", "--port", str(sim_port), "--tokens-per-second", str(TOKENS_PER_SECOND)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        subprocess.run([*manage, "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True, timeout=180)
        subprocess.run([*manage, "shell", "-c", SEED], cwd=ROOT, env=env, check=True, timeout=60)
        _wait_for_http(f"http://127.0.0.1:{sim_port}/api/version", time.monotonic() + 90)
        web.start()
        yield web
    finally:
        for process in (web.process, simulator):
            if process is not None and process.poll() is None:
                process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=10)
                if process.poll() is None:
                    process.kill()
        log.close()
        if workdir.parent == shm:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def live_url(server):
    return server.url


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


def test_a_connection_dropped_mid_answer_picks_up_where_it_left_off(page):
    # The answer belongs to the server: a dropped connection only stops watching, and the
    # page, back, receives exactly what it missed.
    sockets = []

    def route(ws):
        sockets.append((ws, ws.connect_to_server()))

    page.route_web_socket(re.compile(r"/ws/sessions/"), route)
    start_slow_session(page, "Flaky train wifi", words=45)
    record_streaming_steps(page)
    page.fill("#composer-input", "Explain the termination clause in eight short words")
    page.press("#composer-input", "Enter")
    page.wait_for_function("() => document.querySelector('.msg--streaming .msg__body')?.textContent.length > 0")
    page_side, server_side = sockets[-1]
    server_side.close()
    page_side.close()

    # The page reconnects by itself and the answer goes on to its end, nothing doubled.
    page.wait_for_selector(".msg--assistant.msg--complete", timeout=30_000)
    page.wait_for_selector("[data-conn][data-state=live]")
    assert len(sockets) >= 2
    assert page.locator(".msg--streaming").count() == 0
    shown = page.locator(".msg--assistant .msg__body").last.inner_text()
    assert shown == stored_answers(page)[-1]["content"].strip()
    assert "Cancelled" not in page.locator(".chat-log").inner_text()
    assert (
        page.locator(".msg--user .msg__body").last.inner_text() == "Explain the termination clause in eight short words"
    )


def start_slow_session(page, name: str, *, words: int) -> str:
    """A session on a model whose answers run `words` words (at the simulator's 15 tokens a second)."""
    sid = page.evaluate(
        """async ([name, model]) => {
            const csrf = document.cookie.match(/csrftoken=([^;]+)/)?.[1] || "";
            const response = await fetch("/api/ollama/session/start", {
                method: "POST", credentials: "same-origin",
                headers: {"Content-Type": "application/json", "X-CSRFToken": csrf},
                body: JSON.stringify({client: "acme", model, name}),
            });
            return (await response.json()).session_id;
        }""",
        [name, f"ollama:llama3.2-words-{words}"],
    )
    page.goto(f"/sessions/{sid}/")
    page.wait_for_selector("[data-conn][data-state=live]")
    return sid


def stored_answers(page) -> list[dict]:
    """The session's stored assistant messages, as the server has them."""
    return page.evaluate(
        """async () => {
            const config = JSON.parse(document.getElementById("chat-config").textContent);
            const data = await (await fetch(config.messages_url, {credentials: "same-origin"})).json();
            return data.messages.filter((m) => m.role === "assistant");
        }"""
    )


def streaming_text(page) -> int:
    return page.evaluate("() => document.querySelector('.msg--streaming .msg__body')?.textContent.length || 0")


def test_an_answer_goes_on_while_the_page_is_left_and_is_whole_on_return(page):
    sid = start_slow_session(page, "Walk away", words=90)
    page.fill("#composer-input", "Draft the whole notice, please")
    page.press("#composer-input", "Enter")
    page.wait_for_function("() => document.querySelector('.msg--streaming .msg__body')?.textContent.length > 0")
    page.goto("/")  # navigate away mid-answer
    page.wait_for_selector("main")
    page.goto(f"/sessions/{sid}/")
    # Back mid-answer: the answer in progress is shown (not an empty slot), then the rest.
    page.wait_for_function("() => document.querySelector('.msg--streaming .msg__body')?.textContent.length > 20")
    assert page.locator(".msg--user").count() == 1  # the question once
    page.wait_for_selector("[data-conn][data-state=live]")
    page.wait_for_selector(".msg--assistant.msg--complete", timeout=30_000)
    answer = stored_answers(page)[-1]
    assert answer["status"] == "complete" and not answer["error"]
    assert page.locator(".msg--assistant .msg__body").last.inner_text() == answer["content"].strip()
    assert page.unexpected_dialogs == []


def test_a_second_tab_opened_mid_answer_shows_the_text_so_far_then_the_rest(page):
    sid = start_slow_session(page, "Two tabs", words=60)
    page.fill("#composer-input", "Compare both offers")
    page.press("#composer-input", "Enter")
    page.wait_for_function("() => document.querySelector('.msg--streaming .msg__body')?.textContent.length > 20")

    second = page.context.new_page()
    second.goto(f"/sessions/{sid}/")
    # The text so far arrives at once (the catch-up), while the first tab is still streaming.
    second.wait_for_function("() => document.querySelector('.msg--streaming .msg__body')?.textContent.length > 20")
    assert page.locator(".msg--streaming").count() == 1
    for tab in (page, second):
        tab.wait_for_selector(".msg--assistant.msg--complete", timeout=30_000)
    first_text = page.locator(".msg--assistant .msg__body").last.inner_text()
    second_text = second.locator(".msg--assistant .msg__body").last.inner_text()
    assert first_text == second_text == stored_answers(page)[-1]["content"].strip()
    assert second.locator(".msg--user").count() == 1  # the question once, not doubled
    second.close()


def test_a_server_killed_mid_answer_comes_back_with_the_saved_part_marked_cut_off(page, server):
    start_slow_session(page, "Power cut", words=150)
    page.fill("#composer-input", "Summarise all twelve schedules")
    page.press("#composer-input", "Enter")
    page.wait_for_function("() => document.querySelector('.msg--streaming .msg__body')?.textContent.length > 0")
    time.sleep(2.5)  # past the first 2-second checkpoint
    server.kill()
    try:
        page.wait_for_function(
            "() => document.querySelector('[data-conn]').textContent.startsWith('Server unreachable, retrying in')"
        )
    finally:
        server.start()
    # Back by itself: the start-up stored the checkpointed text, and the page says it was cut off.
    page.wait_for_selector(".msg--assistant.msg--partial", timeout=30_000)
    page.wait_for_selector("[data-conn][data-state=live]")
    meta = page.locator(".msg--assistant.msg--partial .msg__meta").inner_text()
    assert "Cut off: the server stopped while this answer streamed" in meta
    assert page.locator(".msg--streaming").count() == 0
    answer = stored_answers(page)[-1]
    assert answer["status"] == "partial" and answer["content"]


def test_a_restart_keeps_a_signed_in_tab_usable_and_a_signed_out_one_offers_sign_in(page, server):
    sid = start_slow_session(page, "Through a restart", words=5)
    server.stop()
    server.start()
    page.wait_for_selector("[data-conn][data-state=live]", timeout=30_000)
    ask(page, "Still there after the restart?")
    assert page.locator(".msg--assistant.msg--complete").count() == 1

    # Signed out elsewhere (another tab): the next connection is refused with 4401, and the
    # page says so, with a way back to this chat, instead of reconnecting for ever.
    sockets = []

    def route(ws):
        sockets.append((ws, ws.connect_to_server()))

    tab = page.context.new_page()
    tab.route_web_socket(re.compile(r"/ws/sessions/"), route)
    tab.goto(f"/sessions/{sid}/")
    tab.wait_for_selector("[data-conn][data-state=live]")
    page.evaluate(
        """async () => {
            const csrf = document.cookie.match(/csrftoken=([^;]+)/)?.[1] || "";
            await fetch("/accounts/logout/", {method: "POST", credentials: "same-origin",
                                              headers: {"X-CSRFToken": csrf}});
        }"""
    )
    tab_side, server_side = sockets[-1]
    server_side.close()  # the connection drops (a blip, a proxy): the tab reconnects, signed out now
    tab_side.close()
    tab.wait_for_selector("[data-conn][data-state=closed]", timeout=30_000)
    notice = tab.locator("[data-notice]")
    assert notice.inner_text().startswith("Signed out: sign in again.")
    link = notice.locator("a").get_attribute("href")
    assert link == f"/accounts/login/?next=%2Fsessions%2F{sid}%2F"
    tab.close()


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
