"""The conversation tools' pages in headless Chromium: templates and the hostname's client on the
new-session form, continue, branch, rename, hide, the Markdown transcript, the chat page's
per-message tools (copy, time, branch, edit, regenerate, versions), a shared session live in
two browsers, and the layout on a phone (390×844) and on a wide screen (the admin at 1440 px).

A daphne of this module's own serves a database of its own (a SQLite file, or
`<name>_browser_tools_<worker>` on PostgreSQL, so it never meets test_browser.py's under xdist).
Set SAVE_SCREENSHOTS=1 to refresh docs/screenshots/.
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
from pathlib import Path

import pytest

from sessions_app.tests.processes import daphne, free_port, server_database
from sessions_app.tests.test_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    PASSWORD,
    ROOT,
    SCREENSHOTS,
    _wait_for_http,
)

MODEL = "ollama:llama3.2:latest"
PHONE = {"width": 390, "height": 844}

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing: apt-get install -y chromium"),
]

SEED = f"""
from django.contrib.auth import get_user_model
from billing.models import Brand, ClientDomain, SessionTemplate
from billing.pricing import load_price_list
User = get_user_model()
User.objects.create_user("olivia", "olivia@example.com", {PASSWORD!r}, first_name="Olivia", last_name="Reyes")
User.objects.create_user("colin", "colin@example.com", {PASSWORD!r}, first_name="Colin", last_name="Barr")
User.objects.create_user("oscar", "oscar@example.com", {PASSWORD!r}, first_name="Oscar")
User.objects.create_superuser("stella", "stella@example.com", {PASSWORD!r}, first_name="Stella")
acme = ClientDomain.objects.create(name="Acme Corp", slug="acme", hourly_rate="150.00", hostname="acme.localhost")
Brand.objects.create(client=acme, name="Acme Legal", primary_color="#0b7285", accent_color="#e67700",
                     background_color="#f4f8f9", font="humanist", is_default=True)
north = ClientDomain.objects.create(name="Northwind Traders", slug="northwind", hourly_rate="180.00",
                                    hostname="northwind.localhost")
Brand.objects.create(client=north, name="Northwind", primary_color="#5f3dc4", accent_color="#e8590c",
                     background_color="#f8f7fc", is_default=True)
globex = ClientDomain.objects.create(name="Globex", slug="globex", hourly_rate="200.00")
SessionTemplate.objects.create(client=north, name="Shipping dispute", default_model="ollama:mistral",
    system_prompt="You help Northwind's logistics team with carrier contracts.",
    first_message="Summarise the carrier's liability for damaged goods.")
SessionTemplate.objects.create(name="Plain English", system_prompt="Answer in plain English, no jargon.")
load_price_list()
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """daphne on a free port with a fast simulator behind it; yields (base URL, port)."""
    shm = Path("/dev/shm")
    workdir = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() else tmp_path_factory.mktemp("browser-tools")
    sim_port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings_test",
        "DEBUG": "1",
        "SERVE_STATIC": "1",
        "ALLOWED_HOSTS": "127.0.0.1,localhost,.localhost",
        "OLLAMA_HOST": f"http://127.0.0.1:{sim_port}",
        "OPENAI_API_KEY": "sk-simulator",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{sim_port}/v1",
        "ANTHROPIC_API_KEY": "sk-ant-simulator",
        "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{sim_port}",
        "PROVIDER_SIMULATOR": "0",
        "PYTHONUNBUFFERED": "1",
    }
    env["DATABASE_URL"] = server_database(env, workdir, "browser_tools")
    manage = [sys.executable, str(ROOT / "manage.py")]
    processes: list[subprocess.Popen] = []
    log = (workdir / "server.log").open("w")
    try:
        processes.append(
            subprocess.Popen(
                [*manage, "simulate_providers", "--port", str(sim_port), "--tokens-per-second", "200"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        subprocess.run([*manage, "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True, timeout=180)
        subprocess.run([*manage, "shell", "-c", SEED], cwd=ROOT, env=env, check=True, timeout=60)
        web, port = daphne(env, log)
        processes.append(web)
        deadline = time.monotonic() + 90  # a loaded 2-core machine starts daphne slowly
        _wait_for_http(f"http://127.0.0.1:{sim_port}/api/version", deadline)
        _wait_for_http(f"http://127.0.0.1:{port}/accounts/login/", deadline)
        yield f"http://127.0.0.1:{port}", port
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            if process.poll() is None:
                process.kill()
        log.close()
        if workdir.parent == shm and not os.environ.get("KEEPLOG"):
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@contextlib.contextmanager
def signed_in(browser, base: str, username: str = "olivia", viewport=None):
    """A page of a fresh context signed in as `username` on `base`; unexpected dialogs are recorded."""
    context = browser.new_context(
        base_url=base, viewport=viewport or {"width": 1280, "height": 860}, device_scale_factor=1, accept_downloads=True
    )
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
    page.goto("/accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click(".auth-card button[type=submit]")
    page.wait_for_url(re.compile(r"/$"))
    try:
        yield page
    finally:
        context.close()


def screenshot(page, name: str, *, full_page: bool = False) -> None:
    if os.environ.get("SAVE_SCREENSHOTS"):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / name), full_page=full_page)


def start_session(page, client: str, name: str, model: str = MODEL) -> str:
    page.goto("/sessions/new/")
    page.select_option("#id_client", client)
    page.select_option("#id_model", model)
    page.fill("#id_name", name)
    page.click(".card-form button[type=submit]")
    page.wait_for_url(re.compile(r"/sessions/[0-9a-f-]{36}/$"))
    page.wait_for_selector("[data-conn][data-state=live]")
    return page.url.rstrip("/").rsplit("/", 1)[1]


def ask(page, text: str) -> None:
    answers = page.locator(".msg--assistant:not(.msg--streaming)").count()
    page.fill("#composer-input", text)
    page.press("#composer-input", "Enter")
    page.wait_for_function(
        "n => document.querySelectorAll('.msg--assistant:not(.msg--streaming)').length > n "
        "&& !document.querySelector('.msg--streaming')",
        arg=answers,
    )


def end_session(page) -> None:
    page.click("[data-end]")
    page.wait_for_url(re.compile(r"/summary/$"))


# --- the new-session form ---------------------------------------------------------------------


def test_a_clients_hostname_preselects_it_and_a_template_fills_the_form(browser, server):
    _base, port = server
    with signed_in(browser, f"http://northwind.localhost:{port}") as page:
        page.goto("/sessions/new/")
        assert page.eval_on_selector("#id_client", "s => s.selectedOptions[0].text") == "Northwind Traders"
        groups = page.eval_on_selector_all("#id_model optgroup", "gs => gs.map(g => g.label)")
        assert groups == ["Ollama", "OpenAI", "Anthropic"]
        assert page.input_value("#id_model") == MODEL  # CHAT_MODEL, as Ollama names it
        sonnet = page.locator("#id_model option[value='anthropic:claude-sonnet-4']")
        assert sonnet.inner_text() == "claude-sonnet-4 · 3.00 USD in / 15.00 USD out per 1M tokens"
        assert page.locator("#id_model option[value^='anthropic:']").count() == 4  # aliases folded

        page.select_option("#id_template", label="Shipping dispute")
        assert page.input_value("#id_model") == "ollama:mistral:latest"
        assert page.input_value("#id_name") == "Shipping dispute"
        assert page.input_value("#id_system_prompt").startswith("You help Northwind's logistics team")
        assert page.locator("[data-first-message]").inner_text().startswith("Summarise the carrier's liability")
        screenshot(page, "new-session-template.png", full_page=True)
        page.click(".card-form button[type=submit]")
        page.wait_for_url(re.compile(r"/sessions/[0-9a-f-]{36}/$"))
        page.wait_for_selector("[data-conn][data-state=live]")
        assert page.input_value("#composer-input") == "Summarise the carrier's liability for damaged goods."
        assert page.locator("[data-client-name]").inner_text() == "Northwind Traders"
        page.press("#composer-input", "Enter")
        page.wait_for_selector(".msg--assistant:not(.msg--streaming)")
        assert page.unexpected_dialogs == []


# --- continue, branch, rename, hide, export ---------------------------------------------------


def test_an_ended_session_is_renamed_exported_branched_hidden_and_continued(browser, server):
    base, _ = server
    with signed_in(browser, base) as page:
        sid = start_session(page, "acme", "Supplier contract review")
        ask(page, "Our codename is Bluebird.")
        ask(page, "Which clauses limit liability?")
        end_session(page)

        # Rename.
        page.fill("#rename-name", "Bluebird supplier review")
        page.click(".session-tools__rename button")
        page.wait_for_selector(".message--success")
        assert page.locator("h1").inner_text() == "Bluebird supplier review"

        # The Markdown transcript, under a meaningful name.
        with page.expect_download() as info:
            page.click("[data-export-markdown]")
        download = info.value
        assert re.fullmatch(r"acme-bluebird-supplier-review-\d{4}-\d{2}-\d{2}\.md", download.suggested_filename)
        text = Path(download.path()).read_text()
        assert text.startswith("# Bluebird supplier review") and "### olivia · " in text and "Bluebird." in text
        with page.expect_download() as info:
            page.click("[data-export-json]")
        assert info.value.suggested_filename.endswith(".json")

        # Branch at the first answer.
        page.select_option("#branch-at", "2")
        page.click("[data-branch] button[type=submit]")
        page.wait_for_url(re.compile(r"/sessions/[0-9a-f-]{36}/$"))
        assert page.locator(".msg").count() == 2
        branch_url = page.url
        page.goto(f"/sessions/{sid}/summary/")
        assert "Branches:" in page.locator("[data-lineage-branches]").inner_text()
        screenshot(page, "summary-tools.png", full_page=True)

        # Hide: gone from the lists, back from "Show hidden".
        page.click("[data-hide]")
        page.wait_for_selector(".message--success")
        page.goto("/sessions/")
        assert page.locator(f"a[href='/sessions/{sid}/summary/']").count() == 0
        page.click("[data-show-hidden]")
        assert page.locator(f"a[href='/sessions/{sid}/summary/']").count() == 1
        page.click("[data-unhide]")
        page.wait_for_selector(".message--success")
        page.goto("/sessions/")
        assert page.locator(f"a[href='/sessions/{sid}/summary/']").count() == 1

        # Continue from the list (client picker on the old client), then from the summary.
        page.click(f"tr:has(a[href='/sessions/{sid}/summary/']) [data-continue-link]")
        assert page.eval_on_selector("#id_client", "s => s.value") == "acme"
        page.select_option("#id_client", "globex")
        page.click(".card-form button[type=submit]")
        page.wait_for_url(re.compile(r"/sessions/[0-9a-f-]{36}/$"))
        page.wait_for_selector("[data-conn][data-state=live]")
        assert page.locator("[data-client-name]").inner_text() == "Globex"
        assert page.locator(".msg--user .msg__body").first.inner_text() == "Our codename is Bluebird."
        ask(page, "What is our codename?")
        assert re.fullmatch(r"0\.0+ USD", page.locator("[data-cost]").inner_text())  # Ollama is free; copies unbilled

        page.goto(f"/sessions/{sid}/summary/")
        assert page.eval_on_selector("#continue-client", "s => s.value") == "acme"
        page.click("[data-continue]")
        page.wait_for_url(re.compile(r"/sessions/[0-9a-f-]{36}/$"))
        assert page.url != branch_url and page.locator(".msg").count() == 4
        page.goto(f"/sessions/{sid}/summary/")
        assert page.locator("[data-lineage-continuations] a").count() == 2
        assert page.unexpected_dialogs == []


# --- per-message tools in the chat page ---------------------------------------------------------


def tool(page, seq: int, name: str):
    return page.locator(f".msg[data-seq='{seq}'] [data-tool={name}]")


def copied(page, seq: int) -> None:
    page.wait_for_function(
        "seq => document.querySelector(`.msg[data-seq='${seq}'] [data-tool=copy]`).textContent === 'Copied'", arg=seq
    )


def wait_answered(page, seq: int) -> None:
    """Wait for the page to be live and to show stored answer `seq` with nothing streaming."""
    page.wait_for_selector("[data-conn][data-state=live]")
    try:
        page.wait_for_function(
            "seq => !document.querySelector('.msg--streaming') && document.querySelector(`.msg--assistant[data-seq='${seq}']`)",
            arg=seq,
        )
    except Exception:
        shown = page.eval_on_selector_all(".msg", "ms => ms.map(m => [m.dataset.seq, m.className])")
        raise AssertionError(
            f"answer {seq} not shown on {page.url}: {shown}; {page.locator('[data-notice]').inner_text()}"
        )


def test_each_message_copies_shows_its_time_branches_and_the_last_ones_edit_and_regenerate(browser, server):
    base, _ = server
    with signed_in(browser, base) as page:
        page.context.grant_permissions(["clipboard-read", "clipboard-write"])
        sid = start_session(page, "acme", "Tools check")
        ask(page, "Our codename is **Bluebird**.")
        ask(page, "Which clauses limit liability?")

        # Time: every message, live ones too, with an ISO datetime and the local time shown.
        times = page.eval_on_selector_all(
            ".msg time.msg__time", "ts => ts.map(t => [t.dateTime, t.textContent, t.title])"
        )
        assert len(times) == 4
        for iso, shown, title in times:
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?([+-]\d{2}:\d{2}|Z)", iso), iso
            assert re.search(r"\d{1,2}:\d{2}", shown) and title

        # Labelled tools; edit on my last message, regenerate on the last answer, nowhere else.
        labels = page.eval_on_selector_all(".msg [data-tool]", "bs => bs.map(b => b.getAttribute('aria-label'))")
        assert labels and all(labels)
        assert page.locator("[data-tool=edit]").count() == 1 and tool(page, 3, "edit").count() == 1
        assert page.locator("[data-tool=regenerate]").count() == 1 and tool(page, 4, "regenerate").count() == 1

        # Copy, from the keyboard: the text as written (Markdown), and a visible "Copied".
        tool(page, 1, "copy").focus()
        page.keyboard.press("Enter")
        copied(page, 1)
        assert page.evaluate("navigator.clipboard.readText()") == "Our codename is **Bluebird**."
        tool(page, 2, "copy").click()
        copied(page, 2)
        stored = page.evaluate(f"fetch('/sessions/{sid}/messages.json').then(r => r.json())")
        assert page.evaluate("navigator.clipboard.readText()") == stored["messages"][1]["content"]
        screenshot(page, "chat-message-tools.png")

        # Regenerate the last answer: a new version streams on its own page; "‹ 2/2" links back.
        tool(page, 4, "regenerate").click()
        page.wait_for_url(lambda url: sid not in url)
        wait_answered(page, 4)
        regenerated = page.url
        assert page.locator(".msg--user .msg__body").last.inner_text() == "Which clauses limit liability?"
        versions = page.locator(".msg[data-seq='4'] .msg__versions")
        versions.wait_for()
        assert versions.locator(".msg__versions-count").inner_text() == "2/2"
        versions.locator("a[aria-label^='Previous version']").click()
        page.wait_for_url(re.compile(f"/sessions/{sid}/#message-4$"))
        assert page.locator(".msg[data-seq='4'] .msg__versions-count").inner_text() == "1/2"
        assert page.locator("[data-tool=regenerate]").count() == 0  # the old version ended: no new turns
        page.locator(".msg[data-seq='4'] a[aria-label^='Next version']").click()
        page.wait_for_url(regenerated + "#message-4")

        # Edit my last message: a new version with the new text, and its own answer.
        wait_answered(page, 4)
        tool(page, 3, "edit").click()
        page.fill("#edit-message", "Which clauses cap damages?")
        screenshot(page, "chat-edit.png")
        page.click(".msg__edit button[type=submit]")
        page.wait_for_url(lambda url: url.split("#")[0] != regenerated.split("#")[0])
        wait_answered(page, 4)
        assert page.locator(".msg--user .msg__body").last.inner_text() == "Which clauses cap damages?"
        page.locator(".msg[data-seq='3'] .msg__versions").wait_for()

        # Branch from the first answer: a new session holding messages 1 and 2.
        edited = page.url
        tool(page, 2, "branch").click()
        page.wait_for_url(lambda url: url != edited)
        page.wait_for_selector("[data-conn][data-state=live]")
        assert page.locator(".msg[data-seq]").count() == 2
        assert page.unexpected_dialogs == []

    with signed_in(browser, base, viewport=PHONE) as page:
        page.goto(regenerated)
        page.wait_for_selector(".msg--assistant[data-seq='4']")
        # The regenerated version, among the original and the edit made from it: "‹ 2/3 ›".
        versions = page.locator(".msg[data-seq='3'] .msg__versions")
        versions.wait_for()
        assert versions.locator(".msg__versions-count").inner_text() == "2/3"
        assert versions.locator("a").count() == 2
        page.locator(".msg[data-seq='3']").scroll_into_view_if_needed()
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        for box in page.locator(".msg[data-seq='3'] .msg__foot button, .msg[data-seq='3'] .msg__foot a").all():
            rect = box.bounding_box()
            assert rect["x"] >= 0 and rect["x"] + rect["width"] <= PHONE["width"] and rect["height"] >= 24, rect
        screenshot(page, "phone-message-tools.png")


# --- sharing ------------------------------------------------------------------------------------


OPEN_SOCKET = """async ([path, frame]) => {
    const ws = new WebSocket(`ws://${location.host}${path}`);
    const frames = [];
    const code = await new Promise((resolve) => {
        ws.onmessage = (event) => {
            const data = JSON.parse(event.data);
            frames.push(data);
            if (data.type === "ready" && frame) ws.send(JSON.stringify(frame));
            if (data.type === "error") ws.close(1000);
        };
        ws.onclose = (event) => resolve(event.code);
    });
    return {code, frames};
}"""


def test_a_shared_session_streams_live_to_both_and_revoking_closes_the_guests_page(browser, server):
    base, _ = server
    with signed_in(browser, base) as owner, signed_in(browser, base, "colin") as guest:
        sid = start_session(owner, "acme", "Pairing on the indemnity")
        owner.click("[data-details]")
        owner.click("[data-share]")
        owner.select_option("#id_user", "colin")
        owner.click("[data-invite-form] button[type=submit]")
        owner.wait_for_selector(".message--success")
        assert "Colin Barr" in owner.locator("[data-people]").inner_text()
        owner.goto(f"/sessions/{sid}/")
        owner.wait_for_selector("[data-conn][data-state=live]")

        guest.goto("/")
        assert guest.locator("[data-shared-by=olivia]").count() == 1
        guest.goto(f"/sessions/{sid}/")
        guest.wait_for_selector("[data-conn][data-state=live]")
        assert "shared this session with you" in guest.locator("[data-shared-notice]").inner_text()
        assert guest.locator("[data-end]").count() == 0  # only the owner ends it
        guest.evaluate("window.notReloaded = true")

        # The owner asks; the guest's page shows the question and the answer as they arrive.
        ask(owner, "Olivia's question")
        guest.wait_for_function("() => document.querySelectorAll('.msg--assistant[data-seq]').length === 1")
        assert guest.locator(".msg--user .msg__who").first.inner_text() == "Olivia Reyes"
        assert guest.locator(".msg--assistant .msg__body").first.inner_text() == (
            owner.locator(".msg--assistant .msg__body").first.inner_text()
        )
        # The guest asks; the owner sees who did.
        ask(guest, "Colin's question")
        owner.wait_for_function("() => document.querySelectorAll('.msg--assistant[data-seq]').length === 2")
        assert owner.locator(".msg--user .msg__who").last.inner_text() == "Colin Barr"
        assert guest.locator(".msg--user .msg__who").last.inner_text() == "You"
        assert guest.evaluate("window.notReloaded") is True
        screenshot(guest, "shared-session-guest.png")

        # A guest's End, sent on the socket anyway, is refused in plain words.
        refused = guest.evaluate(OPEN_SOCKET, [f"/ws/sessions/{sid}/", {"type": "end"}])
        error = refused["frames"][-1]
        assert (error["type"], error["code"]) == ("error", "not_owner")
        assert error["message"].startswith("Only Olivia Reyes, who started this session, can end it.")

        # The owner revokes: the guest's open page is told at once and stops.
        owner.goto(f"/sessions/{sid}/share/")
        owner.click("[data-revoke=colin]")
        owner.wait_for_selector(".message--success")
        guest.wait_for_selector("[data-conn][data-state=closed]")
        notice = guest.locator("[data-notice]").inner_text()
        assert "Olivia Reyes stopped sharing this session with you." in notice
        assert guest.locator("[data-composer]").is_hidden()
        screenshot(guest, "shared-session-revoked.png")
        guest.goto(f"/sessions/{sid}/")
        assert guest.title().startswith("Not found") or "not found" in guest.content().lower()

        # The owner's session goes on.
        owner.goto(f"/sessions/{sid}/")
        owner.wait_for_selector("[data-conn][data-state=live]")
        ask(owner, "Still here?")
        assert owner.unexpected_dialogs == [] and guest.unexpected_dialogs == []


def test_an_uninvited_consultant_gets_404_from_a_shared_sessions_pages_api_and_socket(browser, server):
    base, _ = server
    with signed_in(browser, base) as owner:
        sid = start_session(owner, "acme", "Shared with Colin only")
        ask(owner, "Hello")
        status = owner.evaluate(
            """async (sid) => (await fetch(`/api/ollama/session/${sid}/invitations`, {method: "POST",
                headers: {"Content-Type": "application/json",
                          "X-CSRFToken": document.cookie.match(/csrftoken=([^;]+)/)[1]},
                body: JSON.stringify({user: "colin"})})).status""",
            sid,
        )
        assert status == 201
    with signed_in(browser, base, "oscar") as stranger:
        for path in ("", "summary/", "messages.json", "share/", "continue/"):
            assert stranger.goto(f"/sessions/{sid}/{path}").status == 404, path
        for path in ("", "/summary", "/versions", "/transcript", "/invitations"):
            assert stranger.request.get(f"/api/ollama/session/{sid}{path}").status == 404, path
        stranger.goto("/")
        assert stranger.evaluate(OPEN_SOCKET, [f"/ws/sessions/{sid}/", None])["code"] == 4404


# --- phone and wide screens ---------------------------------------------------------------------


def test_on_a_phone_the_session_bar_stays_and_nothing_is_covered_or_clipped(browser, server):
    base, _ = server
    with signed_in(browser, base, viewport=PHONE) as page:
        start_session(page, "acme", "Phone check")
        for question in ("First question about the lease", "Second question", "Third question, a longer one"):
            ask(page, question)
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        page.wait_for_function("() => window.scrollY > 0")
        screenshot(page, "phone-chat.png")
        bar = page.locator(".session-bar").bounding_box()
        assert bar["y"] >= -1 and bar["y"] < 60, bar  # still in view at the bottom of the page
        composer = page.locator(".composer").bounding_box()
        last_meta = page.locator(".msg--assistant .msg__meta").last.bounding_box()
        assert last_meta["y"] + last_meta["height"] <= composer["y"] + 1, (last_meta, composer)
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]

        end_session(page)
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        screenshot(page, "phone-summary.png", full_page=True)

        page.goto("/sessions/")
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        screenshot(page, "phone-sessions.png")

        page.goto("/reports/mine/?preset=this_month")
        table = page.locator(".report-table").first
        wrap = table.locator("xpath=..")
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        assert wrap.evaluate("w => getComputedStyle(w).overflowX") == "auto"
        assert wrap.evaluate("w => w.scrollWidth > w.clientWidth")  # the table scrolls, it is not cut off
        wrap.evaluate("w => w.scrollLeft = w.scrollWidth")
        last_header = table.locator("thead th").last.bounding_box()
        assert last_header["x"] + last_header["width"] <= PHONE["width"] + 1
        screenshot(page, "phone-report.png", full_page=True)


def _column_in_view(page, label_start: str) -> bool:
    """Whether the changelist column whose header starts with `label_start` is inside the visible frame."""
    return page.evaluate(
        """(wanted) => {
            const frame = document.querySelector("#changelist .results").getBoundingClientRect();
            const header = Array.from(document.querySelectorAll("#result_list thead th"))
                .find((th) => th.innerText.trim().toLowerCase().startsWith(wanted));
            if (!header) throw new Error("no column " + wanted);
            const box = header.getBoundingClientRect();
            return box.left >= frame.left - 1 && box.right <= Math.min(frame.right, window.innerWidth) + 1;
        }""",
        label_start,
    )


def test_admin_changelists_show_cost_and_status_at_1440_and_scroll_on_a_phone(browser, server):
    base, _ = server
    with signed_in(browser, base) as page:
        start_session(page, "acme", "A session with a rather long name to show how the admin wraps it")
        ask(page, "Anything")
    pages = {
        "chatsession": "/admin/sessions_app/chatsession/",
        "sessionmessage": "/admin/sessions_app/sessionmessage/",
        "llmusage": "/admin/billing/llmusage/",
    }
    with signed_in(browser, base, "stella", viewport={"width": 1440, "height": 900}) as page:
        for name, url in pages.items():
            page.goto(url)
            assert page.locator("#changelist-filter").is_visible()  # the filters stay beside the table
            if name in ("chatsession", "llmusage"):
                screenshot(page, f"admin-{name}-1440.png")
            for column in ("cost", "status"):
                assert _column_in_view(page, column), (name, column)
            assert page.evaluate("document.documentElement.scrollWidth") <= 1440
    with signed_in(browser, base, "stella", viewport=PHONE) as page:
        for url in pages.values():
            page.goto(url)
            frame = page.locator("#changelist .results")
            assert frame.evaluate("r => getComputedStyle(r).overflowX") == "auto"
            assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"] + 1
            # Scrolled to its end, the last columns come into view instead of being cut off.
            frame.evaluate("r => r.scrollLeft = r.scrollWidth")
            assert _column_in_view(page, "status")
        page.goto(pages["chatsession"])
        screenshot(page, "admin-sessions-phone.png")
