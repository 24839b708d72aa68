"""Invoices: drafts from the report math, issuing, numbering, the lock, never billing twice."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.db import transaction

from billing.models import InvoiceLine, InvoiceStatus
from billing.selectors import report_for_period
from billing.services import (
    ERR_ALREADY_BILLED,
    BillingError,
    invoice_create_draft,
    invoice_issue,
)
from billing.tests.helpers import at, march, work
from sessions_app.errors import SessionLocked
from sessions_app.models import ChatSession
from tests.factories import MessageFactory, SegmentFactory

MARCH = {"period_start": dt.date(2026, 3, 1), "period_end": dt.date(2026, 3, 31)}


@pytest.fixture
def march_work(owner, colleague, client_acme):
    return [
        work(user=owner, client=client_acme, start=at(2), seconds=361, costs=["0.125", "0.0051"], name="Kick-off"),
        work(user=colleague, client=client_acme, start=at(3), seconds=1800, costs=["2.5"], name="Review"),
        work(user=owner, client=client_acme, start=at(4), seconds=60, costs=[None], name="Unpriced"),
    ]


@pytest.mark.django_db
def test_draft_lines_come_from_the_report_math(staff, client_acme, march_work):
    invoice = invoice_create_draft(client=client_acme, user=staff, **MARCH)
    report = report_for_period(period=march(), user=staff)
    acme = next(r for r in report.rows if r.terms.slug == "acme")
    assert invoice.status == InvoiceStatus.DRAFT and invoice.number is None
    assert invoice.total == acme.totals.total
    assert invoice.time_total == acme.totals.time_amount
    assert invoice.llm_total == acme.totals.llm_cost + acme.totals.markup
    lines = list(invoice.lines.order_by("position"))
    assert sum(line.amount for line in lines) == invoice.total
    kick_off = [line for line in lines if line.session_id == march_work[0].pk]
    assert [(line.kind, line.quantity, line.amount) for line in kick_off] == [
        ("time", Decimal("0.2000"), Decimal("30.00")),  # 6:01 → 12 minutes at 150/h
        # Issue 14: an LLM line's quantity is the USD provider cost and its unit price the exchange
        # rate it used (1 for a USD client), so quantity × unit price is the amount.
        ("llm", Decimal("0.130100"), Decimal("0.13")),  # 0.1301 → 0.13
    ]
    unpriced = [line for line in lines if line.session_id == march_work[2].pk and line.kind == "llm"]
    assert "unknown price" in unpriced[0].description


@pytest.mark.django_db
def test_issue_assigns_consecutive_numbers_and_locks_the_sessions(staff, client_acme, client_globex, owner, march_work):
    work(user=owner, client=client_globex, start=at(5), seconds=900)
    first = invoice_issue(
        invoice=invoice_create_draft(client=client_acme, user=staff, **MARCH), user=staff, now=at(31, 12)
    )
    second = invoice_issue(
        invoice=invoice_create_draft(client=client_globex, user=staff, **MARCH), user=staff, now=at(31, 12)
    )
    assert (first.number, second.number) == ("INV-2026-0001", "INV-2026-0002")
    assert first.status == InvoiceStatus.ISSUED and first.issued_at is not None
    for session in march_work:
        session.refresh_from_db()
        assert session.invoice_id == first.pk
        assert session.is_locked


@pytest.mark.django_db
def test_a_locked_session_refuses_changes_to_billed_fields(staff, client_acme, march_work):
    invoice_issue(invoice=invoice_create_draft(client=client_acme, user=staff, **MARCH), user=staff)
    session = ChatSession.objects.get(pk=march_work[0].pk)
    message = session.messages.first()
    message.cost_usd = Decimal("0")
    with pytest.raises(SessionLocked, match="message #"):
        message.save()
    with pytest.raises(SessionLocked):
        MessageFactory(session=session, seq=99, domain=client_acme, timestamp=at(2))
    with pytest.raises(SessionLocked):
        SegmentFactory(session=session, started_at=at(2, 12), ended_at=at(2, 13))
    # Django deletes inside an atomic block without a savepoint: give it one, as a view would.
    with pytest.raises(SessionLocked), transaction.atomic():
        session.segments.first().delete()
    session.ended_at = session.ended_at + dt.timedelta(hours=1)
    with pytest.raises(SessionLocked, match="ended_at"):
        session.save()
    # What is not billed may still change.
    session.refresh_from_db()
    session.name = "Kick-off (renamed)"
    session.save()


@pytest.mark.django_db
def test_a_session_is_never_billed_twice(staff, client_acme, march_work):
    draft_a = invoice_create_draft(client=client_acme, user=staff, **MARCH)
    # Issue 14: a second draft for the same dates is refused, naming the first.
    with pytest.raises(BillingError, match="already has a draft for 2026-03-01 – 2026-03-31"):
        invoice_create_draft(client=client_acme, user=staff, **MARCH)
    # A draft for April takes up every unbilled part that ended before April's end: March's too.
    draft_b = invoice_create_draft(
        client=client_acme, user=staff, period_start=dt.date(2026, 4, 1), period_end=dt.date(2026, 4, 30)
    )
    invoice_issue(invoice=draft_a, user=staff)
    with pytest.raises(BillingError) as refused:
        invoice_issue(invoice=draft_b, user=staff)
    assert refused.value.message.startswith(ERR_ALREADY_BILLED.split("{")[0])
    draft_b.refresh_from_db()
    assert draft_b.status == InvoiceStatus.DRAFT and draft_b.number is None
    with pytest.raises(BillingError, match="No unbilled, ended sessions"):
        invoice_create_draft(client=client_acme, user=staff, **MARCH)
    billed = InvoiceLine.objects.filter(invoice__status=InvoiceStatus.ISSUED).values_list("session_id", flat=True)
    assert sorted(map(str, set(billed))) == sorted(str(s.pk) for s in march_work)


@pytest.mark.django_db
def test_active_sessions_wait_for_a_later_invoice(staff, owner, client_acme):
    ended = work(user=owner, client=client_acme, start=at(2), seconds=600)
    active = work(user=owner, client=client_acme, start=at(3), ended=False)
    invoice = invoice_create_draft(client=client_acme, user=staff, **MARCH)
    billed = invoice.lines.filter(kind__in=InvoiceLine.BILLED_KINDS)
    assert set(billed.values_list("session_id", flat=True)) == {ended.pk}
    # Issue 14: the running session is listed as pending (amount 0), never silently dropped.
    pending = invoice.lines.get(kind=InvoiceLine.Kind.PENDING)
    assert (pending.session_id, pending.amount) == (active.pk, Decimal("0"))
    active.refresh_from_db()
    assert active.invoice_id is None


@pytest.mark.django_db
def test_issued_invoices_cannot_be_issued_again(staff, client_acme, march_work):
    invoice = invoice_issue(invoice=invoice_create_draft(client=client_acme, user=staff, **MARCH), user=staff)
    with pytest.raises(BillingError, match="already issued"):
        invoice_issue(invoice=invoice, user=staff)
    line = invoice.lines.first()
    line.amount = Decimal("1.00")
    with pytest.raises(SessionLocked):
        line.save()
