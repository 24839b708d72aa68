"""The billing math: periods, time rounding, money rounding, and rows that reconcile to the cent.

Pure functions and dataclasses only (no queries): `billing/selectors.py` feeds them rows.

The rules, stated once (the report pages and docs/BILLING.md quote them):

- A *billing line* is one client's part of one work session inside the period: the
  session's segments for that client, clipped to the period (a segment still open counts up
  to now or the period end, whichever is first), and its billable messages billed to that
  client with a timestamp inside the period.
- Time is rounded **per billing line**: the line's whole seconds are rounded UP to the
  client's `billing_increment_minutes` (6-minute increments: 6:00 bills 6 minutes, 6:01
  bills 12). The invoice's time line for a session is that same rounded figure.
- Money is Decimal throughout and rounded only where it leaves: once per billing line, to
  two decimals, ROUND_HALF_UP (time amount = rate × billable minutes / 60; LLM cost; markup
  = LLM cost × markup %). Every total (client row, report, invoice) is the sum of the
  rounded lines, so a total always equals the sum of the rows shown beneath it.
- A call with an unknown price (cost NULL) adds nothing to the cost and is counted and
  flagged on the line, the client row and the report: never silently free.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from billing.money import quantize, quantize_cents

ZERO = Decimal("0")
MAX_PERIOD_DAYS = 400

ROUNDING_RULE = (
    "Time is rounded up per session and client to the client's billing increment "
    "(with 6-minute increments, 6:00 bills 6 minutes and 6:01 bills 12). Amounts are rounded "
    "to the cent once per session line, half up (ROUND_HALF_UP); every total is the sum of "
    "the rounded lines shown."
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


class PeriodError(ValueError):
    """The period asked for cannot be built; the message says why."""


money = quantize_cents  # rounded where money leaves the system (`billing.money`)


def billable_minutes(seconds: int, increment_minutes: int) -> int:
    """Round whole seconds up to the next increment: 360 s → 6, 361 s → 12 (6-minute steps)."""
    if seconds <= 0:
        return 0
    step = max(int(increment_minutes), 1) * 60
    return math.ceil(seconds / step) * max(int(increment_minutes), 1)


def hours(minutes: int) -> Decimal:
    """Minutes as decimal hours, four places (display and invoice quantity only)."""
    return quantize(Decimal(minutes) / Decimal(60), 4)


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


# --- Lines and rows -----------------------------------------------------------------------


@dataclass(frozen=True)
class ClientTerms:
    """What a client is charged: a snapshot of its rate, markup and increment."""

    client_id: object
    slug: str
    name: str
    hourly_rate: Decimal
    llm_markup_percent: Decimal
    billing_increment_minutes: int
    currency: str

    @classmethod
    def of(cls, client) -> ClientTerms:
        return cls(
            client_id=client.pk,
            slug=client.slug,
            name=client.name,
            hourly_rate=Decimal(client.hourly_rate),
            llm_markup_percent=Decimal(client.llm_markup_percent),
            billing_increment_minutes=int(client.billing_increment_minutes),
            currency=client.currency,
        )


@dataclass
class BillingLine:
    """One client's part of one session in the period, priced and rounded."""

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
    llm_cost_raw: Decimal = ZERO
    unpriced: int = 0
    # Set by price():
    billable_minutes: int = 0
    time_amount: Decimal = ZERO
    llm_cost: Decimal = ZERO
    markup: Decimal = ZERO
    total: Decimal = ZERO

    def price(self) -> BillingLine:
        t = self.terms
        self.billable_minutes = billable_minutes(self.seconds, t.billing_increment_minutes)
        self.time_amount = money(t.hourly_rate * self.billable_minutes / Decimal(60))
        self.llm_cost = money(self.llm_cost_raw)
        self.markup = money(self.llm_cost_raw * t.llm_markup_percent / Decimal(100))
        self.total = self.time_amount + self.llm_cost + self.markup
        return self

    @property
    def billable_hours(self) -> Decimal:
        return hours(self.billable_minutes)

    @property
    def llm_amount(self) -> Decimal:
        """LLM cost with markup: the invoice's LLM line."""
        return self.llm_cost + self.markup

    @property
    def is_open(self) -> bool:
        return self.ended_at is None


@dataclass
class Totals:
    """Sums of already-rounded lines (or rows): nothing is rounded again here."""

    sessions: int = 0
    seconds: int = 0
    billable_minutes: int = 0
    messages: int = 0
    tokens: int = 0
    llm_cost_raw: Decimal = ZERO
    unpriced: int = 0
    open_sessions: int = 0
    time_amount: Decimal = ZERO
    llm_cost: Decimal = ZERO
    markup: Decimal = ZERO
    total: Decimal = ZERO

    def add_line(self, line: BillingLine) -> None:
        self.sessions += 1
        self.open_sessions += int(line.is_open)
        self._add(line)

    def add_totals(self, other: Totals) -> None:
        self.sessions += other.sessions
        self.open_sessions += other.open_sessions
        self._add(other)

    def _add(self, item) -> None:
        self.seconds += item.seconds
        self.billable_minutes += item.billable_minutes
        self.messages += item.messages
        self.tokens += item.tokens
        self.llm_cost_raw += item.llm_cost_raw
        self.unpriced += item.unpriced
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
    rows = group_lines(lines, key=lambda ln: ln.terms.client_id, label=lambda ln: ln.terms.name)
    for row in rows:
        row.terms = row.lines[0].terms
    return sorted(rows, key=lambda r: (r.label.lower(), r.terms.slug))


def consultant_rows(lines: Iterable[BillingLine]) -> list[GroupRow]:
    rows = group_lines(lines, key=lambda ln: ln.user_id, label=lambda ln: ln.username)
    return sorted(rows, key=lambda r: r.label.lower())


def grand_total(rows: Iterable[GroupRow]) -> Totals:
    total = Totals()
    for row in rows:
        total.add_totals(row.totals)
    return total
