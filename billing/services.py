"""Billing writes: invoice drafts from the report math, issuing with a gapless number, voiding, payment.

The rules (docs/BILLING.md states them for people):

- An invoice for a client and a period bills every *part* (one session's share for the client)
  whose session ended before the period's end and that no issued invoice bills yet: the
  period's own work, and any earlier work that was still running when the earlier period was
  invoiced. Sessions of the client still running are listed on it as pending, billed on the
  invoice of the period in which they end. So each part lands on exactly one invoice.
- One draft per client and overlapping dates: a second is refused, naming the first; the
  first can be refreshed at any time (drafts are working copies, recomputed from the work).
- Issuing checks the draft still equals the work it bills (else: refresh it), that every call
  with a cost has an exchange rate, takes the year's next number from one gapless sequence,
  sets the due date from the client's payment terms and locks the sessions it bills.
- An issued invoice never changes. Voiding it issues a credit note that references it (the
  next number of the same sequence) and returns its parts to "unbilled", so corrected work can
  be invoiced again.
"""

from __future__ import annotations

import datetime as dt
import re

from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from billing.models import (
    ClientDomain,
    Invoice,
    InvoiceKind,
    InvoiceLine,
    InvoiceSequence,
    InvoiceStatus,
)
from billing.money import amount_text, format_money, format_rate, quantize_cents
from billing.reports import HUNDRED, PERIOD_CUSTOM, ZERO, BillingLine, Period, billing_tz, month_bounds
from billing.selectors import lines_for_sessions, sessions_billing
from sessions_app.models import ChatSession, SessionStatus

ERR_NOTHING_TO_BILL = "No unbilled, ended sessions for {client} up to {end}."
ERR_PERIOD_ORDER = "The period ends before it starts."
ERR_DRAFT_EXISTS = (
    "{client} already has a draft for {start} – {end} (created {created}); "
    "refresh or delete that draft rather than drafting the same dates twice."
)
ERR_NOT_DRAFT = "Invoice {invoice} is already issued; issued invoices cannot change."
ERR_EMPTY_INVOICE = "Invoice {invoice} has no billed lines; there is nothing to issue."
ERR_ALREADY_BILLED = "Session {session} is already billed to {client} on invoice {number}; redraft this invoice."
ERR_SESSION_ACTIVE = "Session {session} is still active; end it before issuing."
ERR_NOT_ISSUED = "Only issued invoices export; this one is a draft."
ERR_DRAFT_STALE = "The draft no longer matches the work it bills ({detail}); refresh it, check it, then issue."
ERR_MISSING_RATE = (
    "{count} call(s) on this draft have no {currency} exchange rate in force; add the rates "
    "(Admin → Exchange rates or manage.py load_exchange_rates), refresh the draft, then issue."
)
ERR_NOT_VOIDABLE = "Only an issued invoice can be voided; {invoice} is {status}."
ERR_CREDIT_NOTE_VOID = "A credit note cannot be voided; it already cancels {number}."
ERR_NOT_PAYABLE = "Only an issued invoice can be marked paid; {invoice} is {status}."
ERR_ALREADY_PAID = "{invoice} was already marked paid on {date}."
ERR_NOT_DELETABLE = "Only a draft can be deleted; {invoice} is {status}."
ERR_NUMBERING = "Could not assign an invoice number; try again."
NUMBER_PATTERN = re.compile(r"^INV-(\d{4})-(\d{4,})$")


class BillingError(Exception):
    """A billing action that cannot be done; the message says why."""

    status = 409

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def last_month(now: dt.datetime | None = None) -> tuple[dt.date, dt.date]:
    today = (now or timezone.now()).astimezone(billing_tz()).date()
    return month_bounds(today.replace(day=1) - dt.timedelta(days=1))


# --- What a draft bills -------------------------------------------------------------------


def billed_sessions(client: ClientDomain):
    """Sessions whose part for `client` is on an issued invoice (a subquery)."""
    return InvoiceLine.objects.billed().filter(client=client).values("session_id")


def draft_contents(
    *, client: ClientDomain, period_start: dt.date, period_end: dt.date, now: dt.datetime
) -> tuple[list[BillingLine], list[ChatSession]]:
    """(parts to bill, sessions still running) for a draft: see the module docstring."""
    period = Period(kind=PERIOD_CUSTOM, first_day=period_start, last_day=period_end, tz=billing_tz())
    ended = (
        ChatSession.objects.filter(status=SessionStatus.ENDED, ended_at__lt=period.end)
        .filter(sessions_billing(client))
        .exclude(pk__in=billed_sessions(client))
    )
    lines = lines_for_sessions(ended, now=now, client=client, unbilled_only=True)
    lines.sort(key=lambda ln: (ln.ended_at, ln.started_at, str(ln.session_id)))
    running = list(
        ChatSession.objects.filter(status=SessionStatus.ACTIVE, started_at__lt=period.end)
        .filter(sessions_billing(client))
        .select_related("user")
        .order_by("started_at", "session_id")
    )
    return lines, running


def _local(value: dt.datetime | None) -> str:
    return value.astimezone(billing_tz()).strftime("%Y-%m-%d %H:%M") if value else "—"


def _clock(seconds: int) -> str:
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _time_description(line: BillingLine) -> str:
    t = line.terms
    return (
        f"{line.session_name} — {line.username}, {_local(line.started_at)} – {_local(line.ended_at)}: "
        f"worked {_clock(line.seconds)}, billed {line.billable_minutes} min "
        f"({t.billing_increment_minutes}-minute increments)"
    )


def _llm_description(line: BillingLine, charge) -> str:
    text = f"{line.session_name} — LLM usage: {charge.calls} call(s), {charge.tokens} tokens"
    if charge.currency == "USD":
        text += f", provider cost {amount_text(charge.usd, 6)} USD"
    elif charge.rate is None:
        text += (
            f", provider cost {amount_text(charge.usd, 6)} USD — no {charge.currency} exchange rate "
            "in force: not converted"
        )
    else:
        text += (
            f", provider cost {amount_text(charge.usd, 6)} USD at {format_rate(charge.rate)} {charge.currency}/USD"
            f" (rate of {_local(charge.rate_from)})"
        )
    if charge.unpriced:
        text += f" ({charge.unpriced} call(s) with unknown price not included)"
    return text


def _invoice_lines(invoice: Invoice, lines: list[BillingLine], running: list[ChatSession]) -> list[InvoiceLine]:
    """The invoice's lines: per part its time, per exchange rate its LLM cost and markup; then pending sessions."""
    rows: list[InvoiceLine] = []

    def add(**values) -> None:
        rows.append(InvoiceLine(invoice=invoice, position=len(rows) + 1, client=invoice.client, **values))

    for line in lines:
        t = line.terms
        common = {"session_id": line.session_id, "part_ended_at": line.ended_at}
        if line.billable_minutes:
            add(
                kind=InvoiceLine.Kind.TIME,
                description=_time_description(line)[:500],
                quantity=line.billable_hours,
                unit="hours",
                unit_price=t.hourly_rate,
                amount=line.time_amount,
                **common,
            )
        for charge in line.charges:
            if charge.usd <= 0 and not charge.unpriced:
                continue  # free calls (a local model): nothing to bill, nothing to flag
            add(
                kind=InvoiceLine.Kind.LLM,
                description=_llm_description(line, charge)[:500],
                quantity=charge.usd,
                unit="USD",
                unit_price=charge.rate if charge.rate is not None else ZERO,
                amount=charge.cost,
                usd_cost=charge.usd,
                exchange_rate=charge.rate,
                exchange_rate_from=charge.rate_from,
                calls=charge.calls,
                unpriced_calls=charge.unpriced,
                unconverted_calls=charge.unconverted,
                first_call_at=charge.first_at,
                last_call_at=charge.last_at,
                **common,
            )
            if t.llm_markup_percent and charge.cost:
                add(
                    kind=InvoiceLine.Kind.MARKUP,
                    description=f"{line.session_name} — markup {t.llm_markup_percent}% on LLM cost"[:500],
                    quantity=charge.cost,
                    unit=invoice.currency,
                    unit_price=t.llm_markup_percent / HUNDRED,
                    amount=charge.markup,
                    exchange_rate=charge.rate,
                    exchange_rate_from=charge.rate_from,
                    last_call_at=charge.last_at,
                    **common,
                )
    for session in running:
        add(
            kind=InvoiceLine.Kind.PENDING,
            description=(
                f"{session} — {session.user.get_username()}, running since {_local(session.started_at)}: "
                "billed on the invoice for the period in which it ends"
            )[:500],
            session_id=session.pk,
            quantity=ZERO,
            unit="",
            unit_price=ZERO,
            amount=ZERO,
        )
    return rows


def _set_totals(invoice: Invoice, rows: list[InvoiceLine]) -> None:
    invoice.time_total = sum((r.amount for r in rows if r.kind == InvoiceLine.Kind.TIME), ZERO)
    invoice.llm_total = sum((r.amount for r in rows if r.kind in ("llm", "markup")), ZERO)
    invoice.subtotal = invoice.time_total + invoice.llm_total
    invoice.tax_total = quantize_cents(invoice.subtotal * invoice.tax_rate_percent / HUNDRED)
    invoice.total = invoice.subtotal + invoice.tax_total


def _fill(invoice: Invoice, *, now: dt.datetime) -> list[InvoiceLine]:
    lines, running = draft_contents(
        client=invoice.client, period_start=invoice.period_start, period_end=invoice.period_end, now=now
    )
    rows = _invoice_lines(invoice, lines, running)
    if not any(r.kind in InvoiceLine.BILLED_KINDS for r in rows):
        raise BillingError(ERR_NOTHING_TO_BILL.format(client=invoice.client.name, end=invoice.period_end))
    return rows


def _overlapping_draft(client: ClientDomain, start: dt.date, end: dt.date, exclude=None) -> Invoice | None:
    drafts = Invoice.objects.filter(
        client=client, status=InvoiceStatus.DRAFT, period_start__lte=end, period_end__gte=start
    )
    if exclude is not None:
        drafts = drafts.exclude(pk=exclude.pk)
    return drafts.order_by("created_at").first()


@transaction.atomic
def invoice_create_draft(
    *, client: ClientDomain, period_start: dt.date, period_end: dt.date, user, now: dt.datetime | None = None
) -> Invoice:
    """Draft an invoice for the client's unbilled, ended work up to the period's end.

    Refused when a draft for the same client already overlaps these dates (it names it):
    one working copy per client and period, which can be refreshed.
    """
    now = now or timezone.now()
    if period_end < period_start:
        raise BillingError(ERR_PERIOD_ORDER)
    # Serialize drafting per client, so two clicks cannot make two drafts for the same dates.
    client = ClientDomain.objects.select_for_update().get(pk=client.pk)
    existing = _overlapping_draft(client, period_start, period_end)
    if existing is not None:
        raise BillingError(
            ERR_DRAFT_EXISTS.format(
                client=client.name,
                start=existing.period_start,
                end=existing.period_end,
                created=_local(existing.created_at),
            )
        )
    invoice = Invoice(
        client=client,
        period_start=period_start,
        period_end=period_end,
        currency=client.currency,
        tax_rate_percent=client.tax_rate_percent,
        payment_terms_days=client.payment_terms_days,
        created_by=user,
        created_at=now,
    )
    rows = _fill(invoice, now=now)
    _set_totals(invoice, rows)
    invoice.save(force_insert=True)
    InvoiceLine.objects.bulk_create(rows)
    return invoice


@transaction.atomic
def invoice_refresh_draft(*, invoice: Invoice, user, now: dt.datetime | None = None) -> Invoice:
    """Recompute a draft from the work as it is now (ended sessions, new rates, the client's tax and terms)."""
    now = now or timezone.now()
    locked = Invoice.objects.select_for_update().select_related("client").get(pk=invoice.pk)
    if locked.status != InvoiceStatus.DRAFT:
        raise BillingError(ERR_NOT_DRAFT.format(invoice=locked))
    locked.currency = locked.client.currency
    locked.tax_rate_percent = locked.client.tax_rate_percent
    locked.payment_terms_days = locked.client.payment_terms_days
    rows = _fill(locked, now=now)
    locked.lines.all().delete()
    _set_totals(locked, rows)
    locked.save()
    InvoiceLine.objects.bulk_create(rows)
    return locked


def invoice_delete_draft(*, invoice: Invoice, user) -> None:
    with transaction.atomic():
        locked = Invoice.objects.select_for_update().get(pk=invoice.pk)
        if locked.status != InvoiceStatus.DRAFT:
            raise BillingError(ERR_NOT_DELETABLE.format(invoice=locked, status=locked.get_status_display().lower()))
        locked.lines.all().delete()
        locked.delete()


# --- Numbering ----------------------------------------------------------------------------


def _next_number(year: int) -> str:
    """The year's next number, INV-<year>-NNNN, from its sequence row (locked until commit).

    The first issue of a year starts after any number already given out that year, so numbers
    issued before the sequence existed are never reused.
    """
    try:
        sequence = InvoiceSequence.objects.select_for_update().get(year=year)
    except InvoiceSequence.DoesNotExist:
        highest = 0
        for number in Invoice.objects.filter(number__startswith=f"INV-{year}-").values_list("number", flat=True):
            match = NUMBER_PATTERN.match(number)
            if match:
                highest = max(highest, int(match.group(2)))
        try:
            with transaction.atomic():
                InvoiceSequence.objects.create(year=year, last=highest)
        except IntegrityError:
            pass  # another issue created it first; lock it below like any other
        sequence = InvoiceSequence.objects.select_for_update().get(year=year)
    sequence.last += 1
    sequence.save(update_fields=["last"])
    return f"INV-{year}-{sequence.last:04d}"


# --- Issuing ------------------------------------------------------------------------------


def _fingerprint(rows) -> list[tuple]:
    return sorted(
        (
            r.kind,
            str(r.session_id),
            str(r.client_id),
            r.quantity.normalize() if r.quantity is not None else None,
            r.unit_price.normalize() if r.unit_price is not None else None,
            r.amount.normalize(),
            r.exchange_rate_from,
        )
        for r in rows
    )


def invoice_issue(*, invoice: Invoice, user, now: dt.datetime | None = None) -> Invoice:
    """Issue a draft: check it, give it the year's next number and a due date, lock the sessions it bills."""
    now = now or timezone.now()
    try:
        with transaction.atomic():
            return _issue_once(invoice=invoice, user=user, now=now)
    except IntegrityError:
        raise BillingError(ERR_NUMBERING) from None


def _issue_once(*, invoice: Invoice, user, now: dt.datetime) -> Invoice:
    locked = Invoice.objects.select_for_update().select_related("client").get(pk=invoice.pk)
    if locked.status != InvoiceStatus.DRAFT:
        raise BillingError(ERR_NOT_DRAFT.format(invoice=locked))
    stored = list(locked.lines.all())
    billed = [r for r in stored if r.kind in InvoiceLine.BILLED_KINDS]
    if not billed:
        raise BillingError(ERR_EMPTY_INVOICE.format(invoice=locked))
    session_ids = sorted({r.session_id for r in billed if r.session_id}, key=str)
    sessions = list(ChatSession.objects.select_for_update().filter(pk__in=session_ids).order_by("pk"))
    for session in sessions:
        if session.status != SessionStatus.ENDED:
            raise BillingError(ERR_SESSION_ACTIVE.format(session=session))
    clash = (
        InvoiceLine.objects.billed()
        .filter(client=locked.client, session_id__in=session_ids)
        .select_related("invoice", "session")
        .first()
    )
    if clash is not None:
        raise BillingError(
            ERR_ALREADY_BILLED.format(session=clash.session, client=locked.client, number=clash.invoice.number)
        )
    try:
        fresh = _fill(locked, now=now)
    except BillingError as exc:
        raise BillingError(ERR_DRAFT_STALE.format(detail=exc.message)) from None
    if _fingerprint(fresh) != _fingerprint(stored):
        raise BillingError(ERR_DRAFT_STALE.format(detail="the billed work or its rates changed since it was drafted"))
    unconverted = sum(r.unconverted_calls for r in billed)
    if unconverted:
        raise BillingError(ERR_MISSING_RATE.format(count=unconverted, currency=locked.currency))
    locked.number = _next_number(now.astimezone(billing_tz()).year)
    locked.status = InvoiceStatus.ISSUED
    locked.issued_at = now
    locked.due_date = now.astimezone(billing_tz()).date() + dt.timedelta(days=locked.payment_terms_days)
    locked.save(update_fields=["number", "status", "issued_at", "due_date"])
    # A session points at an issued invoice that bills it (its first); every part's own
    # invoice is on its lines, which the reports read.
    ChatSession.objects.filter(pk__in=session_ids).filter(Q(invoice__isnull=True) | Q(invoice=locked)).update(
        invoice=locked
    )
    invoice.refresh_from_db()
    return locked


# --- Voiding and payment ------------------------------------------------------------------


def invoice_void(*, invoice: Invoice, user, reason: str = "", now: dt.datetime | None = None) -> Invoice:
    """Void an issued invoice: issue a credit note that cancels it and return its parts to unbilled.

    The invoice itself stays as it was issued (status `void`); the credit note, numbered in the
    same sequence, repeats its lines and totals and references it.
    """
    now = now or timezone.now()
    with transaction.atomic():
        locked = Invoice.objects.select_for_update().select_related("client").get(pk=invoice.pk)
        if locked.is_credit_note:
            raise BillingError(ERR_CREDIT_NOTE_VOID.format(number=locked.credit_for.number))
        if locked.status != InvoiceStatus.ISSUED:
            raise BillingError(ERR_NOT_VOIDABLE.format(invoice=locked, status=locked.get_status_display().lower()))
        locked.status = InvoiceStatus.VOID
        locked.voided_at = now
        locked.void_reason = reason.strip()[:500]
        locked.save(update_fields=["status", "voided_at", "void_reason"])
        credit = Invoice.objects.create(
            client=locked.client,
            kind=InvoiceKind.CREDIT_NOTE,
            credit_for=locked,
            period_start=locked.period_start,
            period_end=locked.period_end,
            number=_next_number(now.astimezone(billing_tz()).year),
            status=InvoiceStatus.ISSUED,
            currency=locked.currency,
            time_total=locked.time_total,
            llm_total=locked.llm_total,
            subtotal=locked.subtotal,
            tax_rate_percent=locked.tax_rate_percent,
            tax_total=locked.tax_total,
            total=locked.total,
            payment_terms_days=locked.payment_terms_days,
            void_reason=locked.void_reason,
            created_by=user,
            created_at=now,
            issued_at=now,
        )
        copied = []
        for line in locked.lines.order_by("position"):
            line.pk = None
            line._state.adding = True
            line.invoice = credit
            copied.append(line)
        InvoiceLine.objects.bulk_create(copied)
        _relink_sessions(locked)
    return credit


def _relink_sessions(voided: Invoice) -> None:
    """Sessions that pointed at a voided invoice point at another issued one billing them, or none (unlocked)."""
    for session in ChatSession.objects.filter(invoice=voided):
        other = (
            InvoiceLine.objects.billed()
            .filter(session=session)
            .order_by("invoice__issued_at")
            .values_list("invoice_id", flat=True)
            .first()
        )
        ChatSession.objects.filter(pk=session.pk).update(invoice_id=other)


def invoice_mark_paid(*, invoice: Invoice, user, paid_at: dt.datetime | None = None) -> Invoice:
    """Record that an issued invoice was paid (the date it was, today by default)."""
    with transaction.atomic():
        locked = Invoice.objects.select_for_update().get(pk=invoice.pk)
        if locked.status != InvoiceStatus.ISSUED or locked.is_credit_note:
            raise BillingError(ERR_NOT_PAYABLE.format(invoice=locked, status=locked.get_status_display().lower()))
        if locked.paid_at is not None:
            raise BillingError(ERR_ALREADY_PAID.format(invoice=locked, date=_local(locked.paid_at)))
        locked.paid_at = paid_at or timezone.now()
        locked.save(update_fields=["paid_at"])
    return locked


def unpriced_calls_on(invoice: Invoice) -> int:
    """Calls with an unknown price on the invoice's LLM lines (billed at 0.00, named on those lines)."""
    return sum(invoice.lines.filter(kind=InvoiceLine.Kind.LLM).values_list("unpriced_calls", flat=True))


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


def invoice_summary_text(invoice: Invoice) -> str:
    """One line for messages: "INV-2026-0004 for Acme: 1,234.50 EUR" (a draft: "a draft for Acme (dates): …")."""
    total = format_money(invoice.total, invoice.currency, sign=invoice.sign)
    if invoice.number is None:
        return f"a draft for {invoice.client} ({invoice.period_start} – {invoice.period_end}): {total}"
    return f"{invoice.number} for {invoice.client}: {total}"
