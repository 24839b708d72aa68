"""The billing desk and the budget on the chat page, in headless Chromium against daphne.

Its own daphne and provider simulator (with OpenAI configured, so paid models run), its own
database (`<name>_billing_browser_<worker>` on PostgreSQL). Screenshots go to SCREENSHOT_DIR when set
(and docs/screenshots/ with SAVE_SCREENSHOTS=1): the desk and the print view at 1280 px and
390 × 844.
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
from sessions_app.tests.test_browser import CHROMIUM, CHROMIUM_ARGS, ROOT, SCREENSHOTS, _wait_for_http

PASSWORD = "pw-for-browser-1"
PAID = "openai:gpt-4o"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing: apt-get install -y chromium"),
]

SEED = f"""
import datetime as dt
from decimal import Decimal
from django.contrib.auth import get_user_model
from django.utils import timezone
from billing.models import Brand, ClientBudget, ClientDomain, ExchangeRate
from billing.pricing import load_price_list
from sessions_app.models import ChatSession, SessionMessage, SessionSegment
from sessions_app import integrity
load_price_list()
User = get_user_model()
olivia = User.objects.create_user("olivia", "olivia@example.com", {PASSWORD!r}, first_name="Olivia")
User.objects.create_user("sam", "sam@example.com", {PASSWORD!r}, is_staff=True, is_superuser=True)
acme = ClientDomain.objects.create(name="Acme Corp", slug="acme", hourly_rate="150.00", currency="EUR",
                                   tax_rate_percent="20", llm_markup_percent="10")
Brand.objects.create(client=acme, name="Acme Legal", primary_color="#0b7285", is_default=True)
ExchangeRate.objects.create(currency="EUR", usd_rate="0.920000", effective_from=timezone.now() - dt.timedelta(days=400))
tight = ClientDomain.objects.create(name="Tight Budget Ltd", slug="tight", hourly_rate="100.00")
spent = ClientDomain.objects.create(name="Spent Inc", slug="spent", hourly_rate="100.00")
month = timezone.localdate().replace(day=1)
ClientBudget.objects.create(client=tight, month=month, llm_limit=Decimal("10.00"))
ClientBudget.objects.create(client=spent, month=month, llm_limit=Decimal("5.00"))
# Last month's work for Acme, to invoice; this month's spend for the budgets.
first = month - dt.timedelta(days=1)
last_month = first.replace(day=1)
start = timezone.make_aware(dt.datetime.combine(last_month + dt.timedelta(days=9), dt.time(10)))
def work(client, start, minutes, costs, name):
    end = start + dt.timedelta(minutes=minutes)
    s = ChatSession.objects.create(user=olivia, domain=client, name=name, started_at=start, ended_at=end,
                                   duration_seconds=minutes * 60, status="ended", primary_model={PAID!r},
                                   current_model={PAID!r}, last_activity_at=end)
    SessionSegment.objects.create(session=s, domain=client, model={PAID!r}, started_at=start, ended_at=end)
    previous = integrity.GENESIS
    for seq, cost in enumerate(costs, start=1):
        m = SessionMessage(session=s, seq=seq, role="assistant", content="An answer", domain=client, model={PAID!r},
                           provider="openai", timestamp=start, tokens=400, cost_usd=Decimal(cost))
        m.hash = integrity.link_hash(previous, m)
        m.save()
        previous = m.hash
    return s
work(acme, start, 47, ["0.731200", "0.004100"], "Supplier contract review")
work(acme, start + dt.timedelta(days=2), 12, [], "Call notes")
now = timezone.now()
work(tight, now - dt.timedelta(hours=2), 10, ["8.500000"], "Earlier research")
work(spent, now - dt.timedelta(hours=2), 10, ["5.000000"], "Earlier research")
"""


@pytest.fixture(scope="module")
def live_url(tmp_path_factory):
    shm = Path("/dev/shm")
    workdir = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() else tmp_path_factory.mktemp("billing-browser")
    sim_port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings_test",
        "DEBUG": "1",
        "SERVE_STATIC": "1",
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "OLLAMA_HOST": f"http://127.0.0.1:{sim_port}",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{sim_port}/v1",
        "OPENAI_API_KEY": "sk-simulator-test",
        "ANTHROPIC_API_KEY": "",
        "PROVIDER_SIMULATOR": "0",
        "EMAIL_URL": "dummymail://",
        "INVOICE_ISSUER": "Ledger & Co; 1 Main Street, Springfield; VAT GB123456789",
        "PYTHONUNBUFFERED": "1",
    }
    env["DATABASE_URL"] = server_database(env, workdir, "billing_browser")
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


def signed_in(browser, live_url, username: str, viewport=(1280, 860)):
    context = browser.new_context(base_url=live_url, viewport={"width": viewport[0], "height": viewport[1]})
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.dialogs = []
    page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
    page.goto("/accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click(".auth-card button[type=submit]")
    page.wait_for_url(f"{live_url}/")
    return context, page


def shoot(page, name: str, **kwargs) -> None:
    for folder in (os.environ.get("SCREENSHOT_DIR"), SCREENSHOTS if os.environ.get("SAVE_SCREENSHOTS") else None):
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(Path(folder) / name), **kwargs)


def test_the_billing_desk_drafts_issues_prints_and_voids(browser, live_url):
    context, page = signed_in(browser, live_url, "sam")
    try:
        page.goto("/reports/invoices/")
        page.select_option("select[name=client]", "acme")
        page.click("form[aria-label='New draft'] button[type=submit]")
        page.wait_for_url(re.compile(r"/reports/invoices/[0-9a-f-]{36}/$"))
        assert "Drafted" in page.locator(".messages").inner_text()
        doc = page.locator(".invoice-doc")
        assert "Supplier contract review" in doc.inner_text() and "EUR" in doc.inner_text()
        assert "Tax 20.00 %" in doc.inner_text()
        shoot(page, "desk-draft.png", full_page=True)

        page.click("text=Issue…")
        page.wait_for_url(re.compile(r"/issue/$"))
        assert "locks the 2 sessions it bills" in page.locator("main").inner_text()
        page.click("button:has-text('Issue and lock')")
        page.wait_for_url(re.compile(r"/reports/invoices/[0-9a-f-]{36}/$"))
        number = re.search(r"INV-\d{4}-\d{4}", page.locator(".invoice-doc__number").inner_text()).group(0)
        assert page.locator(".state").first.inner_text().startswith("Issued, due")
        assert page.locator("text=Issue…").count() == 0 and page.locator("text=Mark paid").count() == 1

        page.click("text=Print view")
        page.wait_for_url(re.compile(r"/print/$"))
        page.emulate_media(media="print")
        assert page.locator(".no-print").is_hidden()
        assert number in page.locator(".invoice-doc").inner_text()
        assert "Ledger & Co" in page.locator(".invoice-doc").inner_text()
        shoot(page, "invoice-print.png", full_page=True)
        pdf = page.pdf(format="A4")
        assert pdf.startswith(b"%PDF")
        page.emulate_media(media="screen")

        page.go_back()
        page.click("text=Void…")
        page.wait_for_url(re.compile(r"/void/$"))
        page.fill("#void-reason", "Wrong hourly rate")
        page.click("button:has-text('Void and issue the credit note')")
        page.wait_for_url(re.compile(r"/reports/invoices/[0-9a-f-]{36}/$"))
        assert page.locator(".invoice-doc__title").inner_text().startswith("Credit note")
        assert "\u2212" in page.locator(".invoice-lines__total").inner_text()
        assert page.dialogs == []
    finally:
        context.close()
    # The desk and the printed invoice on a phone.
    context, page = signed_in(browser, live_url, "sam", viewport=(390, 844))
    try:
        page.goto("/reports/invoices/")
        shoot(page, "desk-list-phone.png", full_page=True)
        page.click(f"a:text-is('{number}')")
        page.wait_for_url(re.compile(r"/reports/invoices/[0-9a-f-]{36}/$"))
        shoot(page, "desk-invoice-phone.png", full_page=True)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390 + 1, width  # nothing forces a sideways scroll
    finally:
        context.close()


def open_paid_session(page, client: str) -> None:
    page.goto("/sessions/new/")
    page.select_option("#id_client", client)
    page.select_option("#id_model", PAID)
    page.click(".card-form button[type=submit]")


def test_the_chat_page_warns_at_80_percent_and_refuses_at_100(browser, live_url):
    context, page = signed_in(browser, live_url, "olivia")
    try:
        open_paid_session(page, "tight")
        page.wait_for_url(re.compile(r"/sessions/[0-9a-f-]{36}/$"))
        page.wait_for_selector("[data-conn][data-state=live]")
        bar = page.locator("[data-budget]")
        assert "8.50 USD of 10.00 USD (85%)" in bar.inner_text()
        assert "budget-bar--warning" in bar.get_attribute("class")
        page.fill("#composer-input", "Summarise the findings.")
        with page.expect_response(lambda r: r.url.endswith("/billing.json") and r.status == 200):
            page.press("#composer-input", "Enter")  # the answer's done frame refreshes the panel
        page.wait_for_selector(".msg--assistant:not(.msg--streaming)")
        assert "(85%)" in bar.inner_text() and "budget-bar--warning" in bar.get_attribute("class")
        meta = page.locator(".msg--assistant .msg__meta").last.inner_text()
        assert re.search(r"\d\.\d{2,6} USD", meta), meta  # the live cost: the server's format, never $0.00
        shoot(page, "chat-budget-warning.png")

        # The switch panel says what the time so far bills.
        page.click("[data-switch-open]")
        assert "bills in 6-minute increments" in page.locator("[data-switch-billing]").inner_text()

        # A client whose budget is used up: starting on a paid model is refused, in words.
        open_paid_session(page, "spent")
        assert "paid models are paused" in page.locator("main").inner_text()
        assert page.dialogs == []
    finally:
        context.close()
