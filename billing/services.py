"""Billing writes: invoice drafts from the report math, issuing with a race-safe number."""

from __future__ import annotations

import datetime as dt
import re
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from billing.models import ClientDomain, Invoice, InvoiceLine, InvoiceStatus
from billing.reports import PERIOD_CUSTOM, ZERO, BillingLine, Period, hours, month_bounds
from billing.selectors import UNPRICED, billed_pairs, billing_lines, messages_for_period
from sessions_app.models import ChatSession, SessionStatus

ERR_NOTHING_TO_BILL = "No unbilled, ended sessions for {client} between {start} and {end}."
ERR_PERIOD_ORDER = "The period ends before it starts."
ERR_NOT_DRAFT = "Invoice {invoice} is already issued; issued invoices cannot change."
ERR_EMPTY_INVOICE = "Invoice {invoice} has no lines; there is nothing to issue."
ERR_ALREADY_BILLED = "Session {session} is already billed to {client} on invoice {number}; redraft this invoice."
ERR_SESSION_ACTIVE = "Session {session} is still active; end it before issuing."
ERR_NOT_ISSUED = "Only issued invoices export; this one is a draft."
NUMBER_PATTERN = re.compile(r"^INV-(\d{4})-(\d{4,})$")


class BillingError(Exception):
    """A billing action that cannot be done; the message says why."""

    status = 409

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def billing_tz() -> ZoneInfo:
    """Invoices are cut on the billing desk's calendar: settings.TIME_ZONE."""
    return ZoneInfo(settings.TIME_ZONE)


def invoice_period(invoice: Invoice) -> Period:
    return Period(kind=PERIOD_CUSTOM, first_day=invoice.period_start, last_day=invoice.period_end, tz=billing_tz())


def last_month(now: dt.datetime | None = None) -> tuple[dt.date, dt.date]:
    today = (now or timezone.now()).astimezone(billing_tz()).date()
    return month_bounds(today.replace(day=1) - dt.timedelta(days=1))


def _time_description(line: BillingLine) -> str:
    t = line.terms
    return (
        f"{line.session_name} — {line.username}, {line.started_at.astimezone(billing_tz()):%Y-%m-%d %H:%M}: "
        f"{line.seconds // 60} min {line.seconds % 60} s, billed {line.billable_minutes} min "
        f"({t.billing_increment_minutes}-minute increments)"
    )


def _llm_description(line: BillingLine) -> str:
    t = line.terms
    text = (
        f"{line.session_name} — LLM usage: {line.messages} messages, {line.tokens} tokens, "
        f"cost {line.llm_cost} + {t.llm_markup_percent}% markup {line.markup}"
    )
    if line.unpriced:
        text += f" ({line.unpriced} calls with unknown price not included)"
    return text


@transaction.atomic
def invoice_create_draft(*, client: ClientDomain, period_start: dt.date, period_end: dt.date, user) -> Invoice:
    """Draft an invoice for the client's ended, not yet invoiced sessions in the period.

    Lines come from the report's billing lines (`billing.selectors.billing_lines`), so a
    draft always equals the report's figures for those sessions: per session one time line
    (rounded-up minutes × rate) and, when there was LLM use, one LLM line (cost + markup).
    """
    if period_end < period_start:
        raise BillingError(ERR_PERIOD_ORDER)
    period = Period(kind=PERIOD_CUSTOM, first_day=period_start, last_day=period_end, tz=billing_tz())
    lines = billing_lines(period=period, client=client, unbilled_only=True, ended_only=True)
    if not lines:
        raise BillingError(ERR_NOTHING_TO_BILL.format(client=client.name, start=period_start, end=period_end))
    lines.sort(key=lambda ln: (ln.started_at, str(ln.session_id)))

    invoice = Invoice.objects.create(
        client=client,
        period_start=period_start,
        period_end=period_end,
        currency=client.currency,
        created_by=user,
    )
    rows, time_total, llm_total = [], ZERO, ZERO
    for line in lines:
        if line.billable_minutes:
            rows.append(
                InvoiceLine(
                    invoice=invoice,
                    position=len(rows) + 1,
                    kind=InvoiceLine.Kind.TIME,
                    description=_time_description(line)[:500],
                    session_id=line.session_id,
                    quantity=hours(line.billable_minutes),
                    unit="hours",
                    unit_price=line.terms.hourly_rate,
                    amount=line.time_amount,
                )
            )
            time_total += line.time_amount
        if line.llm_amount or line.unpriced:
            rows.append(
                InvoiceLine(
                    invoice=invoice,
                    position=len(rows) + 1,
                    kind=InvoiceLine.Kind.LLM,
                    description=_llm_description(line)[:500],
                    session_id=line.session_id,
                    quantity=1,
                    unit="usage",
                    unit_price=line.llm_amount,
                    amount=line.llm_amount,
                )
            )
            llm_total += line.llm_amount
    if not rows:
        raise BillingError(ERR_NOTHING_TO_BILL.format(client=client.name, start=period_start, end=period_end))
    InvoiceLine.objects.bulk_create(rows)
    invoice.time_total, invoice.llm_total, invoice.total = time_total, llm_total, time_total + llm_total
    invoice.save(update_fields=["time_total", "llm_total", "total"])
    return invoice


def _next_number(year: int) -> str:
    """The next free INV-<year>-NNNN; the caller holds the numbering lock."""
    prefix = f"INV-{year}-"
    highest = 0
    for number in Invoice.objects.filter(number__startswith=prefix).values_list("number", flat=True):
        match = NUMBER_PATTERN.match(number)
        if match:
            highest = max(highest, int(match.group(2)))
    return f"{prefix}{highest + 1:04d}"


def invoice_issue(*, invoice: Invoice, user, now: dt.datetime | None = None) -> Invoice:
    """Issue a draft: give it the next number and lock the sessions it bills.

    Race-safe: the invoice row and its sessions are locked (SELECT … FOR UPDATE on
    PostgreSQL), a session already billed to this client on an overlapping issued invoice
    refuses the issue, and the number is unique in the database; a collision with a
    concurrent issue retries with the next number.
    """
    now = now or timezone.now()
    for _attempt in range(5):
        try:
            with transaction.atomic():
                return _issue_once(invoice=invoice, user=user, now=now)
        except IntegrityError:
            # Another issue took this number between our read and our write: take the next one.
            continue
    raise BillingError("Could not assign an invoice number; try again.")


def _issue_once(*, invoice: Invoice, user, now: dt.datetime) -> Invoice:
    locked = Invoice.objects.select_for_update().select_related("client").get(pk=invoice.pk)
    if locked.status != InvoiceStatus.DRAFT:
        raise BillingError(ERR_NOT_DRAFT.format(invoice=locked))
    session_ids = list(locked.lines.exclude(session=None).values_list("session_id", flat=True).distinct())
    if not session_ids:
        raise BillingError(ERR_EMPTY_INVOICE.format(invoice=locked))
    sessions = list(ChatSession.objects.select_for_update().filter(pk__in=session_ids).order_by("pk"))
    for session in sessions:
        if session.status != SessionStatus.ENDED:
            raise BillingError(ERR_SESSION_ACTIVE.format(session=session))
    already = billed_pairs(client_ids=[locked.client_id], first_day=locked.period_start, last_day=locked.period_end)
    clash = {sid for sid, _ in already} & set(session_ids)
    if clash:
        other = (
            InvoiceLine.objects.filter(session_id__in=clash, invoice__status=InvoiceStatus.ISSUED)
            .select_related("invoice", "session")
            .first()
        )
        raise BillingError(
            ERR_ALREADY_BILLED.format(session=other.session, client=locked.client, number=other.invoice.number)
        )
    locked.number = _next_number(now.astimezone(billing_tz()).year)
    locked.status = InvoiceStatus.ISSUED
    locked.issued_at = now
    locked.save(update_fields=["number", "status", "issued_at"])
    # A session keeps the first invoice that billed it; one billing several clients stays locked.
    ChatSession.objects.filter(pk__in=session_ids).filter(Q(invoice__isnull=True) | Q(invoice=locked)).update(
        invoice=locked
    )
    invoice.refresh_from_db()
    return locked


def unpriced_calls_on(invoice: Invoice) -> int:
    """Calls with an unknown price inside the invoice's sessions, client and period."""
    period = invoice_period(invoice)
    return (
        messages_for_period(period.start, period.end)
        .billed_to(invoice.client)
        .filter(UNPRICED, session__invoice_lines__invoice=invoice)
        .distinct()
        .count()
    )


def invoices_draft_for_clients(*, clients, period_start: dt.date, period_end: dt.date, user) -> tuple[list, list]:
    """Draft one invoice per client; returns (drafts, [(client, reason)] for those skipped)."""
    drafts, skipped = [], []
    for client in clients:
        try:
            drafts.append(
                invoice_create_draft(client=client, period_start=period_start, period_end=period_end, user=user)
            )
        except BillingError as exc:
            skipped.append((client, exc.message))
    return drafts, skipped
