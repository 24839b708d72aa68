"""Budgets: use against a monthly limit, warnings once, paid models refused at 100 % in every front end."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from io import StringIO

import pytest
from django.core import mail
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from billing import budgets
from billing.budgets import ERR_BUDGET_EXCEEDED, BudgetExceeded, budget_state
from billing.models import BUDGETS_KEY, BudgetAlert, ClientBudget, ExchangeRate, new_version
from sessions_app import services
from sessions_app.models import ChatSession, SessionMessage
from tests.factories import ClientFactory, MessageFactory, SessionFactory

PAID = "openai:gpt-4o"
FREE = "ollama:llama3.2"


def month() -> dt.date:
    return budgets.month_of(timezone.now())


def spend(session, cost: str, *, client=None) -> None:
    seq = (session.messages.order_by("-seq").values_list("seq", flat=True).first() or 0) + 1
    MessageFactory(
        session=session,
        seq=seq,
        role="assistant",
        domain=client or session.domain,
        model=PAID,
        provider="openai",
        cost_usd=Decimal(cost),
        timestamp=timezone.now(),
    )


@pytest.fixture
def budgeted(client_acme, owner, staff):
    """Acme with a 10.00 USD budget this month and a session that has spent 7.99 of it."""
    staff.email = "billing@example.com"
    staff.save()
    ClientBudget.objects.create(client=client_acme, month=month(), llm_limit=Decimal("10.00"))
    session = SessionFactory(user=owner, domain=client_acme, primary_model=PAID)
    spend(session, "7.99")
    return session


def test_use_counts_converted_cost_with_markup_in_the_clients_currency(db, owner):
    client = ClientFactory(slug="eur", currency="EUR", llm_markup_percent=Decimal("10"))
    ExchangeRate.objects.create(
        currency="EUR", usd_rate=Decimal("0.5"), effective_from=timezone.now() - dt.timedelta(days=40)
    )
    ClientBudget.objects.create(client=client, month=month() - dt.timedelta(days=40), llm_limit=Decimal("100"))
    session = SessionFactory(user=owner, domain=client, primary_model=PAID)
    spend(session, "10")
    state = budget_state(client_id=client.pk)
    # 10 USD × 0.5 = 5 EUR, + 10 % markup: the budget set last month still holds this month.
    assert (state.used, state.currency, state.percent, state.level) == (Decimal("5.50"), "EUR", 5, "ok")


def test_at_80_percent_staff_get_one_email_per_month_and_threshold(
    budgeted, owner, use_simulator, django_capture_on_commit_callbacks
):
    spend(budgeted, "0.01")  # 8.00 of 10.00
    with django_capture_on_commit_callbacks(execute=True):  # the email goes once the turn commits
        services.begin_turn(session_id=budgeted.pk, user=owner, message="Still fine?")
    assert [m.subject for m in mail.outbox] == [
        f"[Budget] Acme Corp: 80% of the paid-model cost budget for {month():%B %Y}"
    ]
    assert mail.outbox[0].to == ["billing@example.com"]
    assert "80% of its 10.00 USD paid-model budget" in mail.outbox[0].body
    # Another turn, another process's view: still one email.
    budgets._sent.clear()
    again = SessionFactory(user=owner, domain=budgeted.domain, primary_model=PAID)
    with django_capture_on_commit_callbacks(execute=True):
        services.begin_turn(session_id=again.pk, user=owner, message="And now?")
    assert len(mail.outbox) == 1
    assert BudgetAlert.objects.filter(threshold=80).count() == 1


def test_at_100_percent_paid_models_are_refused_and_ollama_still_works(
    budgeted, owner, use_simulator, django_capture_on_commit_callbacks
):
    spend(budgeted, "2.01")  # 10.00 of 10.00
    with pytest.raises(BudgetExceeded) as refused, django_capture_on_commit_callbacks(execute=True):
        services.begin_turn(session_id=budgeted.pk, user=owner, message="One more, please")
    assert refused.value.status == 402 and refused.value.code == "budget_exceeded"
    assert refused.value.message == ERR_BUDGET_EXCEEDED.format(
        client="Acme Corp", used="10.00 USD", limit="10.00 USD", month=f"{month():%B %Y}"
    )
    # Nothing was stored and the session is not left claimed.
    assert not SessionMessage.objects.filter(session=budgeted, content="One more, please").exists()
    assert ChatSession.objects.get(pk=budgeted.pk).turn_started_at is None
    assert "100%" in mail.outbox[-1].subject
    # Starting on, or switching to, a paid model is refused too; a local model is fine.
    with pytest.raises(BudgetExceeded):
        services.session_start(user=owner, client="acme", model=PAID)
    free = services.session_start(user=owner, client="acme", model=FREE)
    with pytest.raises(BudgetExceeded):
        services.session_switch(session_id=free.pk, user=owner, model=PAID)
    services.session_switch(session_id=budgeted.pk, user=owner, model=FREE)
    start = services.begin_turn(session_id=budgeted.pk, user=owner, message="Local is fine")
    assert start.user_message.content == "Local is fine"


def test_raising_the_budget_lets_paid_models_run_again_at_once(budgeted, owner, staff):
    spend(budgeted, "5")
    with pytest.raises(BudgetExceeded):
        budgets.budget_check(client_id=budgeted.domain_id, model=PAID)
    budgets.budget_set(client=budgeted.domain, month=month(), llm_limit=Decimal("50"), hours_limit=None, user=staff)
    assert budgets.budget_check(client_id=budgeted.domain_id, model=PAID).percent == 25


def test_the_check_costs_no_query_without_a_budget_and_one_with(db, client_acme, client_globex, owner):
    ClientBudget.objects.create(client=client_globex, month=month(), llm_limit=Decimal("1"))
    budgets.budget_check(client_id=client_acme.pk, model=PAID)  # warm the process cache
    budgets.budget_check(client_id=client_globex.pk, model=PAID)
    version = budgets.read_version()
    # As the gateway checks: the budgets' version read with the token (`budgets_at`).
    with budgets.budgets_at(version), CaptureQueriesContext(connection) as free:
        budgets.budget_check(client_id=client_acme.pk, model=PAID)
        budgets.budget_check(client_id=client_globex.pk, model=FREE)
    with budgets.budgets_at(version), CaptureQueriesContext(connection) as limited:
        budgets.budget_check(client_id=client_globex.pk, model=PAID)
    assert (len(free), len(limited)) == (0, 1)
    # Elsewhere the version costs one small read per check, and a free model none.
    with CaptureQueriesContext(connection) as unpinned:
        budgets.budget_check(client_id=client_acme.pk, model=PAID)
        budgets.budget_check(client_id=client_globex.pk, model=FREE)
    assert len(unpinned) == 1 and "model_catalogue_version" in unpinned[0]["sql"]


def test_a_budget_set_in_another_process_refuses_this_ones_very_next_paid_check(budgeted, settings):
    """The budgets' version lives in the database, renewed in the writer's transaction: no shared
    cache is needed to see another process's edit, and a Redis outage cannot hide one."""
    settings.CACHES = {  # the shared cache is down (nothing listens on the discard port)
        "default": {
            "BACKEND": "config.resilience.ResilientRedisCache",
            "LOCATION": "redis://127.0.0.1:9/3",
            "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1},
        }
    }
    client_id = budgeted.domain_id
    state = budgets.budget_check(client_id=client_id, model=PAID)  # 7.99 of 10.00, now cached
    assert state is not None and not state.exceeded
    # Another process lowers the budget: its save renews the version; this process's cache is untouched.
    ClientBudget.objects.filter(client_id=client_id).update(llm_limit=Decimal("5.00"))
    with transaction.atomic():
        new_version(BUDGETS_KEY)
    with pytest.raises(BudgetExceeded):
        budgets.budget_check(client_id=client_id, model=PAID)


def test_every_budget_client_terms_or_rate_write_renews_the_budgets_version(db, client_acme):
    before = budgets.read_version()
    ClientBudget.objects.create(client=client_acme, month=month(), llm_limit=Decimal("10.00"))
    after_budget = budgets.read_version()
    ExchangeRate.objects.create(currency="EUR", effective_from=timezone.now(), usd_rate=Decimal("0.9"))
    after_rate = budgets.read_version()
    client_acme.name = "Acme Renamed"
    client_acme.save()
    assert len({before, after_budget, after_rate, budgets.read_version()}) == 4


def test_the_rest_api_answers_402_with_the_error_shape(budgeted, owner_client, client_acme, use_simulator):
    spend(budgeted, "3")
    response = owner_client.post(
        f"/api/ollama/session/{budgeted.pk}/chat", json.dumps({"message": "Hi"}), content_type="application/json"
    )
    assert response.status_code == 402
    assert response.json()["error"]["code"] == "budget_exceeded"
    started = owner_client.post(
        "/api/ollama/session/start", json.dumps({"client": "acme", "model": PAID}), content_type="application/json"
    )
    assert (started.status_code, started.json()["error"]["code"]) == (402, "budget_exceeded")


def test_the_cli_says_so_in_one_line_and_exits_1(budgeted, owner, use_simulator):
    spend(budgeted, "3")
    with pytest.raises(CommandError) as refused:
        call_command("chat", "-s", str(budgeted.pk), "Hello", stdout=StringIO(), stderr=StringIO())
    assert refused.value.returncode == 1
    assert "\n" not in str(refused.value) and "paid models are paused" in str(refused.value)


@pytest.mark.django_db(transaction=True)
def test_the_chat_socket_sends_an_error_frame(client_acme, owner, use_simulator):
    from asgiref.sync import async_to_sync
    from channels.routing import URLRouter
    from channels.testing import WebsocketCommunicator

    from sessions_app.routing import websocket_urlpatterns

    ClientBudget.objects.create(client=client_acme, month=month(), llm_limit=Decimal("0"))
    session = SessionFactory(user=owner, domain=client_acme, primary_model=PAID)

    async def talk():
        communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), f"/ws/sessions/{session.pk}/")
        communicator.scope["user"] = owner
        ok, _ = await communicator.connect(timeout=10)
        assert ok
        frames = [json.loads(await communicator.receive_from(timeout=10))]
        await communicator.send_to(text_data=json.dumps({"type": "chat", "message": "Hello"}))
        while frames[-1]["type"] != "error":
            frames.append(json.loads(await communicator.receive_from(timeout=10)))
        await communicator.disconnect()
        return frames[-1]

    frame = async_to_sync(talk)()
    assert frame["code"] == "budget_exceeded" and "paid models are paused" in frame["message"]


def test_the_chat_page_shows_use_against_budget_and_what_a_switch_bills(budgeted, owner_client, client_globex):
    spend(budgeted, "0.01")  # 8.00 of 10.00: a warning
    ChatSession.objects.filter(pk=budgeted.pk).update(started_at=timezone.now() - dt.timedelta(seconds=450))
    budgeted.segments.create(domain=budgeted.domain, model=PAID, started_at=timezone.now() - dt.timedelta(seconds=450))
    page = owner_client.get(f"/sessions/{budgeted.pk}/").content.decode()
    assert "8.00 USD of 10.00 USD (80%)" in page and "budget-bar--warning" in page
    assert 'id="billing-config"' in page and "<script>" not in page
    data = owner_client.get(f"/sessions/{budgeted.pk}/billing.json").json()
    assert data["budget"]["level"] == "warning" and data["client"] == "acme"
    # 7:30 so far for Acme, 6-minute increments: it rounds up to 12 minutes.
    assert (data["clients"]["acme"]["increment"], data["clients"]["acme"]["billed_minutes"]) == (6, 12)
    assert data["clients"]["globex"]["seconds"] == 0


def test_another_consultant_cannot_read_a_sessions_billing_panel(budgeted, client, colleague):
    client.force_login(colleague)
    assert client.get(f"/sessions/{budgeted.pk}/billing.json").status_code == 404
