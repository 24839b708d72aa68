"""The billing math: periods, parts, time rounding, currency conversion, lines that reconcile to the cent.

Pure functions and dataclasses only (no queries): `billing/selectors.py` and
`billing/pg_reports.py` feed them rows. The rules, stated once (report pages, invoices and
docs/BILLING.md quote them):

- A *part* is one client's share of one work session: the session's segments for that client
  and its billable messages billed to that client. A part is billed **whole, in the period
  where its session ended**; a session still running counts, provisionally and flagged as
  open, in the period that holds "now". So a session across midnight or a month's end is in
  exactly one period, and adjacent periods add up to their union.
- A part's seconds are whole seconds cut at cumulative boundaries from the session's start
  (`allocate_seconds`), exactly as the session summary counts them; they are rounded UP to the
  client's increment once per part (6-minute increments: 6:00 bills 6 minutes, 6:01 bills 12).
- A part is priced at the client's terms (rate, markup, increment) in force when its session
  ended (now, for one still running): changing terms never rewrites a period already worked.
- Time amount = billable hours (minutes / 60, to four decimals, half up: the invoice's printed
  quantity) × hourly rate, rounded to the cent.
- LLM cost: provider costs are stored in USD. Each call is converted at the exchange rate in
  force at the call's time; calls of a part that share a rate form one *charge*, whose cost is
  USD × rate rounded to the cent, and whose markup is that rounded cost × markup %, rounded to
  the cent. A non-USD client with no rate in force for a call with a cost gets nothing added
  for it: the call is counted as unconverted and flagged, never converted 1:1.
- Every figure is rounded once, where it is computed above; every total (part, client row,
  invoice) is the sum of the rounded figures shown beneath it, in one currency. No total ever
  adds two currencies: a report over clients of several currencies has one total per currency.
- A call with an unknown price (cost NULL) adds nothing and is counted and flagged on the part,
  the client row and the report: never silently free.
"""

from __future__ import annotations

import bisect
import datetime as dt
import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.conf import settings

from billing.models import TERMS_EPOCH
from billing.money import quantize, quantize_cents

ZERO = Decimal("0")
ONE = Decimal("1")
HUNDRED = Decimal("100")
MAX_PERIOD_DAYS = 400
BASE_CURRENCY = "USD"

money = quantize_cents  # rounded where money leaves the system (`billing.money`)

PERIOD_RULE = (
    "Each session's time and LLM cost for a client are billed whole in the period where the session "
    "ended; a session still running counts, as open, in the period that holds now."
)
ROUNDING_RULE = (
    "Time is rounded up once per session and client to the client's billing increment "
    "(with 6-minute increments, 6:00 bills 6 minutes and 6:01 bills 12) and priced as billable hours "
    "(to four decimals) × rate. Amounts are rounded to the cent once, half up (ROUND_HALF_UP); every total "
    "is the sum of the rounded lines shown. " + PERIOD_RULE
)
CURRENCY_RULE = (
    "Provider costs are in USD and converted to the client's currency at the exchange rate in force "
    "at each call's time; a call with no rate in force is flagged, never converted 1:1."
)

PERIOD_THIS_MONTH = "this_month"
PERIOD_LAST_MONTH = "last_month"
PERIOD_LAST_30_DAYS = "last_30_days"
PERIOD_CUSTOM = "custom"
PERIOD_CHOICES = [
    (PERIOD_THIS_MONTH, "This month"),
    (PERIOD_LAST_MONTH, "Last month"),
    (PERIOD_LAST_30_DAYS, "Last 30 days"),
    (PERIOD_CUSTOM, "Custom dates"),
]

ERR_BAD_PERIOD = "Unknown period {value!r}; choose this_month, last_month, last_30_days or custom."
ERR_BAD_DATE = "Dates are YYYY-MM-DD; got {value!r}."
ERR_DATES_REQUIRED = "Custom periods need a start and an end date."
ERR_DATES_ORDER = "The end date is before the start date."
ERR_PERIOD_TOO_LONG = f"A period may span at most {MAX_PERIOD_DAYS} days."
ERR_BAD_TZ = "Unknown time zone {value!r}."
ERR_MIXED_CURRENCIES = "These rows are in {currencies}: a total would add two currencies."


class PeriodError(ValueError):
    """The period asked for cannot be built; the message says why."""


class MixedCurrencies(ValueError):
    """A single total was asked of amounts in several currencies."""


def billable_minutes(seconds: int, increment_minutes: int) -> int:
    """Round whole seconds up to the next increment: 360 s → 6, 361 s → 12 (6-minute steps)."""
    if seconds <= 0:
        return 0
    step = max(int(increment_minutes), 1) * 60
    return math.ceil(seconds / step) * max(int(increment_minutes), 1)


def hours(minutes: int) -> Decimal:
    """Minutes as decimal hours, four places: the invoice quantity the time amount is computed from."""
    return quantize(Decimal(minutes) / Decimal(60), 4)


def time_amount(minutes: int, hourly_rate: Decimal) -> Decimal:
    """Billable hours (as printed, four decimals) × rate, to the cent."""
    return money(hours(minutes) * Decimal(hourly_rate))


def allocate_seconds(boundaries: list[tuple[dt.datetime, dt.datetime]], origin: dt.datetime) -> list[int]:
    """Whole seconds per span, cut at cumulative boundaries so they sum to the floor of the total.

    Rounding each span alone can gain or lose a second; flooring the running total at each
    boundary and taking differences cannot. The session summary and every report use this.
    """
    out: list[int] = []
    previous = 0
    for _start, stop in boundaries:
        cumulative = int((stop - origin).total_seconds() // 1)
        cumulative = max(cumulative, previous)
        out.append(cumulative - previous)
        previous = cumulative
    return out


# --- Periods ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Period:
    """A half-open range [start, end) of aware datetimes, built from local dates in `tz`."""

    kind: str
    first_day: dt.date
    last_day: dt.date  # inclusive
    tz: ZoneInfo

    @functools.cached_property
    def start(self) -> dt.datetime:
        return dt.datetime.combine(self.first_day, dt.time(), tzinfo=self.tz).astimezone(dt.UTC)

    @functools.cached_property
    def end(self) -> dt.datetime:
        following = self.last_day + dt.timedelta(days=1)
        return dt.datetime.combine(following, dt.time(), tzinfo=self.tz).astimezone(dt.UTC)

    def holds(self, instant: dt.datetime) -> bool:
        return self.start <= instant < self.end

    @property
    def days(self) -> list[dt.date]:
        count = (self.last_day - self.first_day).days + 1
        return [self.first_day + dt.timedelta(days=i) for i in range(count)]

    @property
    def label(self) -> str:
        return f"{self.first_day:%Y-%m-%d} – {self.last_day:%Y-%m-%d} ({self.tz.key})"

    def as_query(self) -> dict[str, str]:
        """The query-string parameters that rebuild this period."""
        return {
            "period": PERIOD_CUSTOM,
            "start": self.first_day.isoformat(),
            "end": self.last_day.isoformat(),
            "tz": self.tz.key,
        }


def billing_tz() -> ZoneInfo:
    """The billing desk's calendar (settings.TIME_ZONE): months, invoice periods and CSV times."""
    return ZoneInfo(settings.TIME_ZONE)


def parse_tz(value: str | None, default: str) -> ZoneInfo:
    name = (value or "").strip() or default
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise PeriodError(ERR_BAD_TZ.format(value=name[:64])) from None


def _parse_date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value.strip())
    except ValueError:
        raise PeriodError(ERR_BAD_DATE.format(value=value[:32])) from None


def month_bounds(day: dt.date) -> tuple[dt.date, dt.date]:
    first = day.replace(day=1)
    following = (first + dt.timedelta(days=32)).replace(day=1)
    return first, following - dt.timedelta(days=1)


def period_from(
    *,
    kind: str | None,
    start: str | None = None,
    end: str | None = None,
    tz: ZoneInfo,
    now: dt.datetime,
) -> Period:
    """Build the period the picker asked for, with "today" taken in the viewer's zone."""
    kind = (kind or PERIOD_THIS_MONTH).strip()
    today = now.astimezone(tz).date()
    if kind == PERIOD_THIS_MONTH:
        first, last = month_bounds(today)
    elif kind == PERIOD_LAST_MONTH:
        first, last = month_bounds(today.replace(day=1) - dt.timedelta(days=1))
    elif kind == PERIOD_LAST_30_DAYS:
        first, last = today - dt.timedelta(days=29), today
    elif kind == PERIOD_CUSTOM:
        if not start or not end:
            raise PeriodError(ERR_DATES_REQUIRED)
        first, last = _parse_date(start), _parse_date(end)
        if last < first:
            raise PeriodError(ERR_DATES_ORDER)
        if (last - first).days + 1 > MAX_PERIOD_DAYS:
            raise PeriodError(ERR_PERIOD_TOO_LONG)
    else:
        raise PeriodError(ERR_BAD_PERIOD.format(value=kind[:32]))
    return Period(kind=kind, first_day=first, last_day=last, tz=tz)


# --- Terms and rates in force -------------------------------------------------------------


@dataclass(frozen=True)
class ClientTerms:
    """What a client is charged for one part: its rate, markup and increment, and its currency."""

    client_id: object
    slug: str
    name: str
    hourly_rate: Decimal
    llm_markup_percent: Decimal
    billing_increment_minutes: int
    currency: str
    effective_from: dt.datetime = TERMS_EPOCH

    @classmethod
    def of(cls, client, row=None) -> ClientTerms:
        """The client's terms from a dated terms row, or from the client's own fields."""
        source = row if row is not None else client
        return cls(
            client_id=client.pk,
            slug=client.slug,
            name=client.name,
            hourly_rate=Decimal(source.hourly_rate),
            llm_markup_percent=Decimal(source.llm_markup_percent),
            billing_increment_minutes=int(source.billing_increment_minutes),
            currency=client.currency,
            effective_from=getattr(row, "effective_from", TERMS_EPOCH),
        )


class TermsBook:
    """Each client's dated terms; `at(client_id, when)` is the row in force then.

    A client whose terms were never changed has no rows: its own fields are its terms.
    """

    def __init__(self, clients: dict, rows: Iterable = ()) -> None:
        self.clients = clients
        self._dated: dict[object, tuple[list[dt.datetime], list[ClientTerms]]] = {}
        for row in sorted(rows, key=lambda r: (str(r.client_id), r.effective_from)):
            starts, terms = self._dated.setdefault(row.client_id, ([], []))
            starts.append(row.effective_from)
            terms.append(ClientTerms.of(clients[row.client_id], row))
        self._plain = {pk: ClientTerms.of(c) for pk, c in clients.items()}

    def at(self, client_id, when: dt.datetime) -> ClientTerms:
        dated = self._dated.get(client_id)
        if dated:
            index = bisect.bisect_right(dated[0], when) - 1
            if index >= 0:
                return dated[1][index]
            return dated[1][0]  # before the first dated row: the earliest terms known
        return self._plain[client_id]


class RateBook:
    """Exchange rates per currency: `rate(currency, effective_from)` and `in_force(currency, when)`."""

    def __init__(self, rows: Iterable[tuple[str, dt.datetime, Decimal]] = ()) -> None:
        self._by: dict[str, tuple[list[dt.datetime], list[Decimal]]] = {}
        for currency, effective_from, rate in sorted(rows, key=lambda r: (r[0], r[1])):
            starts, rates = self._by.setdefault(currency, ([], []))
            starts.append(effective_from)
            rates.append(Decimal(rate))
        self._exact = {
            (cur, start): rate
            for cur, (starts, rates) in self._by.items()
            for start, rate in zip(starts, rates, strict=True)
        }

    def rate(self, currency: str, effective_from: dt.datetime | None) -> Decimal | None:
        """The rate of the row that took effect at `effective_from`; 1 for USD; None when missing."""
        if currency == BASE_CURRENCY:
            return ONE
        if effective_from is None:
            return None
        return self._exact.get((currency, effective_from))

    def in_force(self, currency: str, when: dt.datetime) -> tuple[dt.datetime | None, Decimal | None]:
        """(effective_from, rate) of the row in force at `when`; (None, 1) for USD; (None, None) when missing."""
        if currency == BASE_CURRENCY:
            return None, ONE
        found = self._by.get(currency)
        if not found:
            return None, None
        index = bisect.bisect_right(found[0], when) - 1
        if index < 0:
            return None, None
        return found[0][index], found[1][index]


# --- Parts and their charges --------------------------------------------------------------


@dataclass
class LLMCharge:
    """A part's calls converted at one exchange rate: one LLM invoice line (and its markup line)."""

    currency: str
    rate: Decimal | None  # units of `currency` per USD; None: no rate in force (flagged)
    rate_from: dt.datetime | None
    usd: Decimal = ZERO
    messages: int = 0
    calls: int = 0  # messages that are provider calls (not the consultant's own)
    tokens: int = 0
    unpriced: int = 0
    first_at: dt.datetime | None = None
    last_at: dt.datetime | None = None
    # Set by price():
    cost: Decimal = ZERO
    markup: Decimal = ZERO
    unconverted: int = 0

    def price(self, markup_percent: Decimal) -> LLMCharge:
        if self.rate is None:
            # Nothing is converted without a rate; a call that cost nothing needs none.
            self.cost = self.markup = ZERO
            self.unconverted = (self.calls - self.unpriced) if self.usd > 0 else 0
            return self
        self.cost = money(self.usd * self.rate)
        self.markup = money(self.cost * Decimal(markup_percent) / HUNDRED)
        self.unconverted = 0
        return self


@dataclass
class BillingLine:
    """One client's part of one session, priced and rounded."""

    terms: ClientTerms
    session_id: object
    session_name: str
    user_id: object
    username: str
    started_at: dt.datetime
    ended_at: dt.datetime | None
    status: str
    invoice_number: str | None
    seconds: int = 0
    messages: int = 0
    tokens: int = 0
    llm_cost_raw: Decimal = ZERO  # provider cost in USD, unrounded
    unpriced: int = 0
    charges: list[LLMCharge] = field(default_factory=list)
    archived: bool = False  # its messages' figures come from the archive's cost rows
    # Set by price():
    billable_minutes: int = 0
    time_amount: Decimal = ZERO
    llm_cost: Decimal = ZERO
    markup: Decimal = ZERO
    total: Decimal = ZERO
    unconverted: int = 0

    def price(self) -> BillingLine:
        t = self.terms
        self.billable_minutes = billable_minutes(self.seconds, t.billing_increment_minutes)
        self.time_amount = time_amount(self.billable_minutes, t.hourly_rate)
        for charge in self.charges:
            charge.price(t.llm_markup_percent)
        self.charges.sort(key=lambda c: (c.rate_from is None, c.rate_from or c.first_at or TERMS_EPOCH))
        self.llm_cost = sum((c.cost for c in self.charges), ZERO)
        self.markup = sum((c.markup for c in self.charges), ZERO)
        self.unconverted = sum(c.unconverted for c in self.charges)
        self.total = self.time_amount + self.llm_cost + self.markup
        return self

    @property
    def currency(self) -> str:
        return self.terms.currency

    @property
    def billable_hours(self) -> Decimal:
        return hours(self.billable_minutes)

    @property
    def llm_amount(self) -> Decimal:
        """LLM cost with markup."""
        return self.llm_cost + self.markup

    @property
    def is_open(self) -> bool:
        return self.ended_at is None

    @property
    def rates_used(self) -> list[Decimal]:
        return [c.rate for c in self.charges if c.rate is not None and c.usd > 0]


@dataclass
class Totals:
    """Sums of already-rounded lines (or rows) in one currency: nothing is rounded again here."""

    currency: str | None = None
    sessions: int = 0
    seconds: int = 0
    billable_minutes: int = 0
    messages: int = 0
    tokens: int = 0
    llm_cost_raw: Decimal = ZERO
    unpriced: int = 0
    unconverted: int = 0
    open_sessions: int = 0
    time_amount: Decimal = ZERO
    llm_cost: Decimal = ZERO
    markup: Decimal = ZERO
    total: Decimal = ZERO

    def add_line(self, line: BillingLine) -> None:
        self._same_currency(line.currency)
        self.sessions += 1
        self.open_sessions += int(line.is_open)
        self._add(line)

    def add_totals(self, other: Totals) -> None:
        self._same_currency(other.currency)
        self.sessions += other.sessions
        self.open_sessions += other.open_sessions
        self._add(other)

    def _same_currency(self, currency: str | None) -> None:
        if currency is None:
            return
        if self.currency is None:
            self.currency = currency
        elif self.currency != currency:
            raise MixedCurrencies(ERR_MIXED_CURRENCIES.format(currencies=f"{self.currency} and {currency}"))

    def _add(self, item) -> None:
        self.seconds += item.seconds
        self.billable_minutes += item.billable_minutes
        self.messages += item.messages
        self.tokens += item.tokens
        self.llm_cost_raw += item.llm_cost_raw
        self.unpriced += item.unpriced
        self.unconverted += item.unconverted
        self.time_amount += item.time_amount
        self.llm_cost += item.llm_cost
        self.markup += item.markup
        self.total += item.total

    @property
    def billable_hours(self) -> Decimal:
        return hours(self.billable_minutes)

    @property
    def actual_hours(self) -> Decimal:
        return quantize(Decimal(self.seconds) / Decimal(3600), 2)

    @property
    def llm_amount(self) -> Decimal:
        return self.llm_cost + self.markup


@dataclass
class GroupRow:
    """A row of a report table (a client, a consultant): its lines and their sums."""

    key: object
    label: str
    terms: ClientTerms | None = None
    lines: list[BillingLine] = field(default_factory=list)
    totals: Totals = field(default_factory=Totals)

    def add(self, line: BillingLine) -> None:
        self.lines.append(line)
        self.totals.add_line(line)

    @property
    def currency(self) -> str | None:
        return self.totals.currency


def group_lines(lines: Iterable[BillingLine], key, label) -> list[GroupRow]:
    """Group priced lines into rows, in order of first appearance."""
    rows: dict[object, GroupRow] = {}
    for line in lines:
        k = key(line)
        row = rows.get(k)
        if row is None:
            row = rows[k] = GroupRow(key=k, label=label(line))
        row.add(line)
    return list(rows.values())


def client_rows(lines: Iterable[BillingLine]) -> list[GroupRow]:
    """One row per client; a client's row shows the terms of its newest part."""
    rows = group_lines(lines, key=lambda ln: ln.terms.client_id, label=lambda ln: ln.terms.name)
    for row in rows:
        row.terms = max(row.lines, key=lambda ln: ln.terms.effective_from).terms
    return sorted(rows, key=lambda r: (r.label.lower(), r.terms.slug))


def consultant_rows(lines: Iterable[BillingLine]) -> list[GroupRow]:
    """One row per consultant and currency (a consultant may work for clients in several)."""
    rows = group_lines(lines, key=lambda ln: (ln.user_id, ln.currency), label=lambda ln: ln.username)
    return sorted(rows, key=lambda r: (r.label.lower(), r.currency or ""))


def currency_totals(rows: Iterable[GroupRow]) -> list[Totals]:
    """One total per currency, in currency order: never a sum across currencies."""
    by: dict[str, Totals] = {}
    for row in rows:
        by.setdefault(row.currency or BASE_CURRENCY, Totals()).add_totals(row.totals)
    return [by[c] for c in sorted(by)]


def grand_total(rows: Iterable[GroupRow]) -> Totals:
    """The total of rows in one currency; MixedCurrencies if they are in several."""
    total = Totals()
    for row in rows:
        total.add_totals(row.totals)
    return total
