"""Client budgets: the monthly limit on paid-model cost (and optionally hours), warnings and refusals.

The rule, in one place (docs/BILLING.md states it for people):

- A client's budget for a month is the newest `ClientBudget` set for that month or an earlier
  one, in the client's currency. Months are calendar months on the billing desk's calendar
  (settings.TIME_ZONE).
- *Used* is the month's paid-model cost as it will be billed: each billable call's USD cost
  converted at the rate in force at its time, plus the client's markup in force now, rounded
  to the cent. Hours used are the time worked for the client in the month.
- At 80 % of either limit the consultant (chat page) and staff (monitoring page, admin) see a
  warning, and an email goes out once per client, month, measure and threshold (80 and 100).
- At 100 % of the cost limit paid models are refused for the client in every front end (a
  turn's start, a session's start on a paid model, a switch to one) with `BudgetExceeded`
  (HTTP 402, code `budget_exceeded`) until staff raise the budget; Ollama stays usable. The
  hours limit warns but never refuses: refusing paid models would not stop the hours.

The check at a paid turn's start is the hot path: with no budget for the client it costs no
query of its own (the budgets, clients, terms and rates are cached per process, and every
change to them gives the `budgets` row of `model_catalogue_version` a new version in the same
transaction; the gateway reads it in the statement that reads the token, `budgets_at`); with
one, it costs one aggregate query.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import functools
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import Count, DateTimeField, F, Q, Sum, Value
from django.db.models.functions import Greatest, Least
from django.utils import timezone

from billing.models import (
    BUDGETS_KEY,
    BudgetAlert,
    ClientBudget,
    ClientDomain,
    ClientTerms,
    ExchangeRate,
    new_version,
    stored_version,
    version_column,
)
from billing.money import format_money, format_plain, quantize, quantize_cents, to_decimal
from billing.reports import BASE_CURRENCY, HUNDRED, ZERO, RateBook, TermsBook, billing_tz, month_bounds
from billing.selectors import rate_in_force
from config import statements
from providers.naming import parse_model
from sessions_app.errors import SessionError
from sessions_app.models import SessionMessage, SessionSegment

log = logging.getLogger(__name__)

WARN_AT = 80
STOP_AT = 100
CACHE_SECONDS = 300  # a backstop: changes are seen at once through the version

ERR_BUDGET_EXCEEDED = (
    "{client} has used {used} of its {limit} paid-model budget for {month}: paid models are paused "
    "for this client until staff raise the budget. Local (Ollama) models still work."
)
WARN_BUDGET = "{client} has used {percent}% of its {limit} paid-model budget for {month} ({used})."
WARN_HOURS = "{client} has used {percent}% of its {limit} h budget for {month} ({used} h)."
ALERT_SUBJECT = "[Budget] {client}: {percent}% of the {measure} budget for {month}"


class BudgetExceeded(SessionError):
    """A paid model asked for a client whose monthly cost budget is used up."""

    code, status = "budget_exceeded", 402

    def __init__(self, message: str, *, state: BudgetState | None = None) -> None:
        super().__init__(message)
        self.state = state


def month_of(now: dt.datetime) -> dt.date:
    return now.astimezone(billing_tz()).date().replace(day=1)


def month_range(month: dt.date) -> tuple[dt.datetime, dt.datetime]:
    first, last = month_bounds(month)
    tz = billing_tz()
    start = dt.datetime.combine(first, dt.time(), tzinfo=tz)
    end = dt.datetime.combine(last + dt.timedelta(days=1), dt.time(), tzinfo=tz)
    return start, end


@dataclass
class BudgetState:
    """A client's budget and use for one month."""

    client_id: object
    client_name: str
    currency: str
    month: dt.date
    limit: Decimal
    hours_limit: Decimal | None
    used: Decimal
    unconverted: int = 0
    hours_used: Decimal | None = None

    @property
    def percent(self) -> int:
        if self.limit <= 0:
            return STOP_AT if self.used >= self.limit else 0
        return int(self.used * 100 / self.limit)

    @property
    def hours_percent(self) -> int | None:
        if self.hours_limit is None or self.hours_used is None:
            return None
        if self.hours_limit <= 0:
            return STOP_AT
        return int(self.hours_used * 100 / self.hours_limit)

    @property
    def exceeded(self) -> bool:
        return self.used >= self.limit

    @property
    def level(self) -> str:
        """ok, warning (80 % of a limit) or exceeded (100 % of the cost limit)."""
        if self.exceeded:
            return "exceeded"
        if self.percent >= WARN_AT or (self.hours_percent or 0) >= WARN_AT:
            return "warning"
        return "ok"

    @property
    def month_label(self) -> str:
        return f"{self.month:%B %Y}"

    def used_text(self) -> str:
        return format_money(self.used, self.currency)

    def limit_text(self) -> str:
        return format_money(self.limit, self.currency)

    def message(self) -> str:
        """What the consultant and staff read: the refusal, the warning, or the plain use."""
        if self.exceeded:
            return ERR_BUDGET_EXCEEDED.format(
                client=self.client_name, used=self.used_text(), limit=self.limit_text(), month=self.month_label
            )
        parts = [
            WARN_BUDGET.format(
                client=self.client_name,
                percent=self.percent,
                limit=self.limit_text(),
                month=self.month_label,
                used=self.used_text(),
            )
        ]
        if self.hours_percent is not None:
            parts.append(
                WARN_HOURS.format(
                    client=self.client_name,
                    percent=self.hours_percent,
                    limit=format_plain(self.hours_limit),
                    month=self.month_label,
                    used=format_plain(self.hours_used),
                )
            )
        return " ".join(parts)

    def as_dict(self) -> dict:
        """For the chat page (json_script) and the API: figures as strings, never floats."""
        return {
            "client": self.client_name,
            "currency": self.currency,
            "month": self.month.isoformat(),
            "limit": format_money(self.limit, self.currency),
            "used": format_money(self.used, self.currency),
            "percent": self.percent,
            "hours_limit": None if self.hours_limit is None else format_plain(self.hours_limit),
            "hours_used": None if self.hours_used is None else format_plain(self.hours_used),
            "hours_percent": self.hours_percent,
            "level": self.level,
            "message": self.message(),
        }


# --- The per-process cache ----------------------------------------------------------------

_lock = threading.Lock()
_NOT_LOADED = object()
_local: dict = {"version": _NOT_LOADED, "loaded": 0.0, "budgets": {}, "clients": {}, "rates": None}
# The version a caller has read with its own statement (`budgets_at`); _NOT_LOADED: read it.
_pinned: contextvars.ContextVar = contextvars.ContextVar("budgets_version", default=_NOT_LOADED)


def budgets_changed(**_kwargs) -> None:
    """In the writer's transaction (connected to the saves of budgets, clients, terms and rates):
    every process's cached copies go stale with it."""
    new_version(BUDGETS_KEY)
    with _lock:
        _local["version"] = _NOT_LOADED


def budgets_version_column() -> statements.Scalar:
    """The budgets' version as a column of another statement (`statements.select_row(also=...)`)."""
    return version_column(BUDGETS_KEY)


@contextlib.contextmanager
def budgets_at(version: object) -> Iterator[None]:
    """A block in which budget checks use `version`, read with `budgets_version_column()`."""
    token = _pinned.set(version)
    try:
        yield
    finally:
        _pinned.reset(token)


def read_version() -> object:
    """The budgets' version as stored now (one prepared statement)."""
    return stored_version(BUDGETS_KEY)


def one_version(func):
    """`func` reads the budgets' version once, whatever it uses of the cache (not at all when a
    caller pinned one with `budgets_at`)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if _pinned.get() is not _NOT_LOADED:
            return func(*args, **kwargs)
        with budgets_at(read_version()):
            return func(*args, **kwargs)

    return wrapper


def _fresh() -> dict:
    """The cached budgets per client, reloaded when any process changed them (or after a while)."""
    version = _pinned.get()
    if version is _NOT_LOADED:
        version = read_version()
    with _lock:
        stale = _local["version"] is _NOT_LOADED or version != _local["version"]
        if stale or time.monotonic() - _local["loaded"] > CACHE_SECONDS:
            budgets: dict = {}
            for row in ClientBudget.objects.order_by("client_id", "-month").values(
                "client_id", "month", "llm_limit", "hours_limit"
            ):
                budgets.setdefault(row["client_id"], []).append(row)
            _local.update(version=version, loaded=time.monotonic(), budgets=budgets, clients={}, rates=None)
        return _local


def _budget_for(client_id, month: dt.date) -> dict | None:
    for row in _fresh()["budgets"].get(client_id, []):  # newest month first
        if row["month"] <= month:
            return row
    return None


def _client_info(client_id) -> tuple[str, str, Decimal]:
    """(name, currency, markup % in force now), cached until budgets, clients or terms change."""
    local = _fresh()
    found = local["clients"].get(client_id)
    if found is None:
        client = ClientDomain.objects.get(pk=client_id)
        terms = TermsBook({client.pk: client}, ClientTerms.objects.filter(client=client))
        found = (client.name, client.currency, terms.at(client.pk, timezone.now()).llm_markup_percent)
        local["clients"][client_id] = found
    return found


def _rates() -> RateBook:
    local = _fresh()
    if local["rates"] is None:
        local["rates"] = RateBook(ExchangeRate.objects.values_list("currency", "effective_from", "usd_rate"))
    return local["rates"]


# --- Use -----------------------------------------------------------------------------------


def _used(client_id, currency: str, markup: Decimal, start: dt.datetime, end: dt.datetime) -> tuple[Decimal, int]:
    """(the month's paid-model cost as billed, calls that could not be converted): one query."""
    messages = SessionMessage.objects.billable().filter(domain_id=client_id, timestamp__gte=start, timestamp__lt=end)
    if currency == BASE_CURRENCY:
        usd = to_decimal(messages.aggregate(cost=Sum("cost_usd"))["cost"]) or ZERO
        converted, unconverted = usd, 0
    else:
        rows = (
            messages.annotate(rate_from=rate_in_force())
            .values("rate_from")
            .annotate(cost=Sum("cost_usd"), calls=Count("pk", filter=Q(cost_usd__gt=0)))
            .order_by()
        )
        rates = _rates()
        converted, unconverted = ZERO, 0
        for row in rows:
            rate = rates.rate(currency, row["rate_from"])
            usd = to_decimal(row["cost"]) or ZERO
            if rate is None:
                unconverted += row["calls"] if usd > 0 else 0
            else:
                converted += usd * rate
    return quantize_cents(converted * (HUNDRED + markup) / HUNDRED), unconverted


def _hours_used(client_id, start: dt.datetime, end: dt.datetime, now: dt.datetime) -> Decimal:
    """Hours worked for the client inside the month (open segments up to now)."""
    cap = min(now, end)
    spans = (
        SessionSegment.objects.filter(domain_id=client_id, started_at__lt=cap)
        .filter(Q(ended_at__isnull=True) | Q(ended_at__gt=start))
        .annotate(
            lo=Greatest("started_at", Value(start, output_field=DateTimeField())),
            hi=Least(F("ended_at"), Value(cap, output_field=DateTimeField())),
        )
        .values_list("lo", "hi", "ended_at")
    )
    seconds = 0
    for lo, hi, ended in spans:
        stop = hi if ended is not None else cap
        seconds += max(int((stop - lo).total_seconds()), 0)
    return quantize(Decimal(seconds) / Decimal(3600), 2)


@one_version
def budget_state(*, client_id, now: dt.datetime | None = None, with_hours: bool = False) -> BudgetState | None:
    """The client's budget and use this month, or None when it has no budget."""
    now = now or timezone.now()
    month = month_of(now)
    budget = _budget_for(client_id, month)
    if budget is None:
        return None
    name, currency, markup = _client_info(client_id)
    start, end = month_range(month)
    used, unconverted = _used(client_id, currency, markup, start, end)
    state = BudgetState(
        client_id=client_id,
        client_name=name,
        currency=currency,
        month=month,
        limit=Decimal(budget["llm_limit"]),
        hours_limit=None if budget["hours_limit"] is None else Decimal(budget["hours_limit"]),
        used=used,
        unconverted=unconverted,
    )
    if with_hours and state.hours_limit is not None:
        state.hours_used = _hours_used(client_id, start, end, now)
    return state


def budget_check(*, client_id, model: str, now: dt.datetime | None = None) -> BudgetState | None:
    """Before a paid model is used for a client: BudgetExceeded when its cost budget is used up.

    Free (Ollama) models pass without a look; a client without a budget costs no query.
    """
    try:
        ref = parse_model(model)
    except ValueError:
        return None
    if not ref.paid:
        return None
    state = budget_state(client_id=client_id, now=now)
    if state is not None and state.exceeded:
        raise BudgetExceeded(state.message(), state=state)
    return state


def budget_check_turn(*, client_id, model: str, now: dt.datetime | None = None) -> BudgetState | None:
    """`budget_check` at a turn's start, inside its first transaction: a warning due goes out with it."""
    state = budget_check(client_id=client_id, model=model, now=now)
    if state is not None and state.level != "ok" and _due(state):
        budget_alerts_send(state)
    return state


def alerts_on_refusal(func):
    """Send the 100 % warning when `func` is refused for a budget (outside the transaction it rolled back)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except BudgetExceeded as exc:
            budget_alerts_send(exc.state)
            raise

    return wrapper


# --- Alerts ---------------------------------------------------------------------------------

_sent: set[tuple] = set()  # alerts this process knows went out: no query to learn it again


def _due(state: BudgetState) -> list[tuple]:
    """The (measure, threshold, key) warnings a state has crossed that this process has not seen go out."""
    due = []
    for measure, percent in (
        (BudgetAlert.Measure.COST, state.percent),
        (BudgetAlert.Measure.HOURS, state.hours_percent),
    ):
        if percent is None:
            continue
        for threshold in (WARN_AT, STOP_AT):
            key = (state.client_id, state.month, measure, threshold)
            if percent >= threshold and key not in _sent:
                due.append((measure, threshold, key))
    return due


def _recipients() -> list[str]:
    if settings.BUDGET_ALERT_EMAILS:
        return list(settings.BUDGET_ALERT_EMAILS)
    users = get_user_model().objects.filter(is_staff=True, is_active=True).exclude(email="")
    return sorted(set(users.values_list("email", flat=True)))


def budget_alerts_send(state: BudgetState | None) -> list[BudgetAlert]:
    """Email the warnings a state has crossed (80 %, 100 %), once per client, month, measure and threshold."""
    if state is None:
        return []
    sent = []
    for measure, threshold, key in _due(state):
        recipients = _recipients()
        used, limit = (
            (state.used, state.limit) if measure == BudgetAlert.Measure.COST else (state.hours_used, state.hours_limit)
        )
        try:
            with transaction.atomic():
                alert = BudgetAlert.objects.create(
                    client_id=state.client_id,
                    month=state.month,
                    measure=measure,
                    threshold=threshold,
                    used=used,
                    limit=limit,
                    recipients=", ".join(recipients),
                )
        except IntegrityError:
            _sent.add(key)  # another process sent it
            continue
        _sent.add(key)
        subject = ALERT_SUBJECT.format(
            client=state.client_name, percent=threshold, measure=measure.label.lower(), month=state.month_label
        )
        body = (
            f"{state.message()}\n\n"
            f"Budgets are set per client and month in the admin (Billing → Client budgets); raising this "
            f"month's budget lets paid models run again at once.\n"
        )
        if recipients:
            transaction.on_commit(
                lambda subject=subject, body=body, recipients=recipients: _deliver(subject, body, recipients)
            )
        sent.append(alert)
    return sent


def _deliver(subject: str, body: str, recipients: list[str]) -> None:
    try:
        send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, recipients, fail_silently=False)
    except Exception:  # a mail server that is down must not break a chat turn
        log.exception("budget alert email could not be sent: %s", subject)


@one_version
def budget_overview(*, now: dt.datetime | None = None) -> list[BudgetState]:
    """Every client with a budget this month, with cost and hours used (monitoring page, admin)."""
    now = now or timezone.now()
    states = []
    for client_id in list(_fresh()["budgets"]):
        state = budget_state(client_id=client_id, now=now, with_hours=True)
        if state is not None:
            states.append(state)
    states.sort(key=lambda s: (-max(s.percent, s.hours_percent or 0), s.client_name.lower()))
    return states


def budget_set(
    *, client: ClientDomain, month: dt.date, llm_limit: Decimal, hours_limit: Decimal | None, user
) -> ClientBudget:
    """Set (or raise) a client's budget from `month` on."""
    month = month.replace(day=1)
    budget, _created = ClientBudget.objects.update_or_create(
        client=client,
        month=month,
        defaults={"llm_limit": llm_limit, "hours_limit": hours_limit, "updated_by": user},
    )
    return budget
