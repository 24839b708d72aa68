"""Dated terms and exchange rates: recording a client's new terms, guarding issued invoices, loading rates.

An issued invoice is the record of what was billed, so nothing it was computed from may change
under it: a rate row it used is never edited or deleted, no rate may be added that would take
over calls it converted, and no client terms may take effect before a part it billed ended
(unless they are the very terms that part was billed at).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from billing.models import TERMS_EPOCH, ClientDomain, ClientTerms, ExchangeRate, InvoiceLine, InvoiceStatus
from billing.money import format_rate, quantize_micro

TERMS_FIELDS = ("hourly_rate", "llm_markup_percent", "billing_increment_minutes")
CURRENCY = re.compile(r"^[A-Z]{3}$")
ISSUED = (InvoiceStatus.ISSUED,)

ERR_RATE_USED = (
    "This {currency} rate is used by issued invoice {number}; it can no longer change or be deleted. "
    "Add a new rate from a later date instead."
)
ERR_RATE_TAKES_OVER = (
    "A {currency} rate from {when} would change issued invoice {number}, which converted calls up to "
    "{last} at the rate from {rate_from}; choose a date after {last}."
)
ERR_RATE_USD = "USD needs no exchange rate: provider costs are stored in USD."
ERR_TERMS_REWRITE = (
    "Terms from {when} would change issued invoice {number}, which billed work of {client} that ended "
    "{ended}; a change takes effect after the last billed work (or from now)."
)
ERR_CSV_HEADER = "The first line must name the columns currency, usd_rate and effective_from (got {found})."
ERR_CSV_ROW = "Line {line}: {problem}"
ERR_BAD_CURRENCY = "{value!r} is not a three-letter currency code."
ERR_BAD_RATE = "{value!r} is not a positive decimal rate."
ERR_BAD_WHEN = "{value!r} is not a date (YYYY-MM-DD) or a date and time with its offset."
ERR_CONFLICT = "{currency} already has a different rate from {when} ({existing}); delete or edit that row first."


class RecordLocked(ValueError):
    """A change that would alter an issued invoice; the message says which and what to do."""


def _local(value: dt.datetime | None) -> str:
    if value is None:
        return "—"
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M")


# --- Guards -------------------------------------------------------------------------------


def issued_lines(currency: str):
    return InvoiceLine.objects.filter(
        invoice__status__in=ISSUED, invoice__currency=currency, kind__in=("llm", "markup"), usd_cost__gt=0
    ).select_related("invoice")


def exchange_rate_guard(rate: ExchangeRate, *, deleting: bool = False) -> None:
    """Refuse a change to exchange rates that would alter an issued invoice (RecordLocked)."""
    if rate.currency == "USD":
        raise RecordLocked(ERR_RATE_USD)
    if rate.pk is not None:
        old = ExchangeRate.objects.filter(pk=rate.pk).values("currency", "effective_from", "usd_rate").first()
        if old is not None:
            unchanged = (old["currency"], old["effective_from"], old["usd_rate"]) == (
                rate.currency,
                rate.effective_from,
                rate.usd_rate,
            )
            if unchanged and not deleting:
                return
            used = issued_lines(old["currency"]).filter(exchange_rate_from=old["effective_from"]).first()
            if used is not None:
                raise RecordLocked(ERR_RATE_USED.format(currency=old["currency"], number=used.invoice.number))
    if deleting:
        return
    taken = (
        issued_lines(rate.currency)
        .filter(Q(exchange_rate_from__lt=rate.effective_from) | Q(exchange_rate_from__isnull=True))
        .filter(last_call_at__gte=rate.effective_from)
        .order_by("-last_call_at")
        .first()
    )
    if taken is not None:
        raise RecordLocked(
            ERR_RATE_TAKES_OVER.format(
                currency=rate.currency,
                when=_local(rate.effective_from),
                number=taken.invoice.number,
                last=_local(taken.last_call_at),
                rate_from=_local(taken.exchange_rate_from),
            )
        )


def _in_force(rows: list[tuple[dt.datetime, tuple]], fallback: tuple, when: dt.datetime) -> tuple:
    """The values in force at `when` among dated rows (before the first row: the first row's)."""
    if not rows:
        return fallback
    earlier = [row for row in rows if row[0] <= when]
    return max(earlier)[1] if earlier else min(rows)[1]


def client_terms_guard(terms: ClientTerms, *, deleting: bool = False) -> None:
    """Refuse terms that would re-price a part an issued invoice billed (RecordLocked).

    Terms identical to those the affected parts were billed at change nothing and are allowed
    (recording a client's first terms from the beginning of time, for example).
    """
    client = ClientDomain.objects.get(pk=terms.client_id)
    fallback = tuple(Decimal(getattr(client, name)) for name in TERMS_FIELDS)
    stored = {
        row.pk: (row.effective_from, tuple(Decimal(getattr(row, name)) for name in TERMS_FIELDS))
        for row in ClientTerms.objects.filter(client=client)
    }
    before = list(stored.values())
    after = [value for pk, value in stored.items() if pk != terms.pk]
    if not deleting:
        after.append((terms.effective_from, tuple(Decimal(getattr(terms, name)) for name in TERMS_FIELDS)))
    since = terms.effective_from
    if terms.pk in stored:
        since = min(since, stored[terms.pk][0])
    billed = (
        InvoiceLine.objects.filter(
            invoice__status__in=ISSUED,
            client_id=client.pk,
            kind__in=InvoiceLine.BILLED_KINDS,
            part_ended_at__gte=since,
        )
        .select_related("invoice")
        .order_by("part_ended_at")
    )
    for line in billed.iterator():
        if _in_force(before, fallback, line.part_ended_at) != _in_force(after, fallback, line.part_ended_at):
            raise RecordLocked(
                ERR_TERMS_REWRITE.format(
                    when=_local(terms.effective_from),
                    number=line.invoice.number,
                    client=client.name,
                    ended=_local(line.part_ended_at),
                )
            )


def ensure_terms_start(terms: ClientTerms) -> None:
    """Before a client's first dated row, record the terms it had until then, from the beginning.

    So a client with dated terms always has a row in force at any time: work done before a
    scheduled change keeps the client's terms as they were, whatever its fields say later.
    """
    if terms.effective_from <= TERMS_EPOCH or ClientTerms.objects.filter(client_id=terms.client_id).exists():
        return
    client = ClientDomain.objects.get(pk=terms.client_id)
    ClientTerms(
        client=client, effective_from=TERMS_EPOCH, **{name: getattr(client, name) for name in TERMS_FIELDS}
    ).save_base(raw=True)


# --- Recording a client's new terms -------------------------------------------------------


def client_terms_record(*, client: ClientDomain, previous: dict, now: dt.datetime | None = None) -> ClientTerms | None:
    """After a client's rate, markup or increment changed: keep what held before, the new from now.

    The first change also records the terms the client had until then, from the beginning,
    so work done before the change keeps being billed as it was.
    """
    current = {name: getattr(client, name) for name in TERMS_FIELDS}
    if all(Decimal(previous[name]) == Decimal(current[name]) for name in TERMS_FIELDS):
        return None
    now = now or timezone.now()
    with transaction.atomic():
        if not ClientTerms.objects.filter(client=client).exists():
            # What held until now, restated as a dated row: it re-prices nothing, by construction
            # (the guard would compare it with the client's fields, which already hold the new values).
            ClientTerms(client=client, effective_from=TERMS_EPOCH, **previous).save_base(raw=True)
        row = ClientTerms.objects.filter(client=client, effective_from=now).first() or ClientTerms(
            client=client, effective_from=now
        )
        for name, value in current.items():
            setattr(row, name, value)
        client_terms_guard(row)
        row.save()
    return row


# --- Loading rates from a CSV file --------------------------------------------------------


@dataclass
class RatesLoaded:
    created: int = 0
    unchanged: int = 0
    errors: list[str] = field(default_factory=list)


def _when(value: str) -> dt.datetime | None:
    value = value.strip()
    moment = parse_datetime(value)
    if moment is not None:
        return moment if timezone.is_aware(moment) else timezone.make_aware(moment)
    day = parse_date(value)
    if day is not None:
        return timezone.make_aware(dt.datetime.combine(day, dt.time()))
    return None


def exchange_rates_load(text: str, *, source: str = "") -> RatesLoaded:
    """Import rates from CSV text (`currency,usd_rate,effective_from` per line); all or nothing.

    A date alone means midnight in settings.TIME_ZONE. A row that already exists with the same
    rate is left as it is (loading a file twice changes nothing); one that would change an
    existing rate, or an issued invoice, is an error, and then nothing at all is loaded.
    """
    result = RatesLoaded()
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    header = [cell.strip().lower() for cell in next(reader, [])]
    needed = ("currency", "usd_rate", "effective_from")
    if any(name not in header for name in needed):
        result.errors.append(ERR_CSV_HEADER.format(found=", ".join(header) or "nothing"))
        return result
    index = {name: header.index(name) for name in needed}
    rows: list[ExchangeRate] = []
    for number, cells in enumerate(reader, start=2):
        if not any(cell.strip() for cell in cells):
            continue
        try:
            currency, raw_rate, raw_when = (cells[index[n]].strip() for n in needed)
        except IndexError:
            result.errors.append(ERR_CSV_ROW.format(line=number, problem="too few columns"))
            continue
        currency = currency.upper()
        problems = []
        if not CURRENCY.fullmatch(currency) or currency == "USD":
            problems.append(ERR_RATE_USD if currency == "USD" else ERR_BAD_CURRENCY.format(value=currency))
        try:
            rate = Decimal(raw_rate)
            if not rate.is_finite() or rate <= 0:
                raise InvalidOperation
        except InvalidOperation:
            problems.append(ERR_BAD_RATE.format(value=raw_rate))
            rate = None
        when = _when(raw_when)
        if when is None:
            problems.append(ERR_BAD_WHEN.format(value=raw_when))
        if problems:
            result.errors.extend(ERR_CSV_ROW.format(line=number, problem=p) for p in problems)
            continue
        rows.append(ExchangeRate(currency=currency, usd_rate=rate, effective_from=when, source=source[:200]))
    if result.errors:
        return result
    with transaction.atomic():
        for row in rows:
            existing = ExchangeRate.objects.filter(currency=row.currency, effective_from=row.effective_from).first()
            if existing is not None:
                if existing.usd_rate == quantize_micro(row.usd_rate):
                    result.unchanged += 1
                    continue
                result.errors.append(
                    ERR_CONFLICT.format(
                        currency=row.currency, when=_local(row.effective_from), existing=format_rate(existing.usd_rate)
                    )
                )
                continue
            try:
                exchange_rate_guard(row)
            except RecordLocked as exc:
                result.errors.append(str(exc))
                continue
            row.save()
            result.created += 1
        if result.errors:
            transaction.set_rollback(True)
            result.created = 0
    return result
