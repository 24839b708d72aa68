"""Report reads: querysets in the report vocabulary, composed with who may see what.

Every report is built from the same few bounded queries (the sessions billed in the period,
their segments, their message totals per client and exchange rate, archived message totals,
the clients with their dated terms and rates, and the invoices that billed each part), then
priced by `billing/reports.py`. The number of queries does not grow with the number of rows.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings
from django.db.models import (
    Case,
    Count,
    DateTimeField,
    Exists,
    Max,
    Min,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Sum,
    Value,
    When,
)
from django.db.models.functions import TruncDate
from django.utils import timezone

from billing import csv_export, pg_reports
from billing.models import (
    ArchivedMessageCost,
    ClientDomain,
    ExchangeRate,
    InvoiceLine,
    LLMUsage,
)
from billing.models import (
    ClientTerms as ClientTermsRow,
)
from billing.money import quantize, to_decimal
from billing.reports import (
    ERR_MIXED_CURRENCIES,
    ZERO,
    BillingLine,
    GroupRow,
    LLMCharge,
    MixedCurrencies,
    Period,
    RateBook,
    TermsBook,
    Totals,
    allocate_seconds,
    client_rows,
    consultant_rows,
    currency_totals,
)
from sessions_app.models import ChatSession, ContextStream, SessionMessage, SessionSegment, SessionStatus, stale_turn_q
from sessions_app.models import turn_stale_after as session_turn_stale_after

# A call counts as "unknown price" when a priced kind of message carries no cost. User
# messages are what the consultant typed; their input cost is on the answer's call.
UNPRICED = Q(cost_usd__isnull=True) & ~Q(role="user")
CALLS = ~Q(role="user")
SESSION_FIELDS = (
    "session_id",
    "name",
    "user_id",
    "user__username",
    "started_at",
    "ended_at",
    "status",
    "archived_at",
    "invoice_id",
)
STREAM_CHUNK = 5000


# --- Querysets in the report vocabulary ---------------------------------------------------


def billable_messages() -> QuerySet:
    """Messages whose cost counts (not branch copies, not imports)."""
    return SessionMessage.objects.billable()


def messages_for_period(start: dt.datetime, end: dt.datetime) -> QuerySet:
    """Billable messages sent in [start, end): usage over time (charts, monitoring), not billing."""
    return billable_messages().for_period(start, end)


def sessions_billed_in(period: Period, *, now: dt.datetime, ended_only: bool = False) -> QuerySet:
    """Sessions whose parts the period bills: those that ended in it, and (open) those running now if it holds now."""
    billed = Q(ended_at__gte=period.start, ended_at__lt=period.end)
    if not ended_only and period.holds(now):
        billed |= Q(ended_at__isnull=True)
    return ChatSession.objects.filter(billed)


def sessions_billing(client: ClientDomain) -> Q:
    """Sessions with a part for `client`: time on it, or billable (live or archived) messages billed to it."""
    return (
        Q(pk__in=SessionSegment.objects.filter(domain=client).values("session_id"))
        | Q(pk__in=billable_messages().filter(domain=client).values("session_id"))
        | Q(pk__in=ArchivedMessageCost.objects.filter(domain=client).values("session_id"))
    )


def with_unpriced_flag(sessions: QuerySet) -> QuerySet:
    """Sessions annotated `has_unpriced`: a call with no known price is missing from their total."""
    unpriced = billable_messages().filter(UNPRICED, session=OuterRef("pk"))
    return sessions.annotate(has_unpriced=Exists(unpriced))


def with_totals(qs: QuerySet, *group_by: str) -> QuerySet:
    """Message counts, tokens, summed cost and unknown-price calls, grouped by `group_by`."""
    return qs.values(*group_by).annotate(
        n_messages=Count("pk"),
        n_tokens=Sum("tokens"),
        cost=Sum("cost_usd"),
        n_unpriced=Count("pk", filter=UNPRICED),
    )


def rate_in_force(timestamp: str = "timestamp") -> Case:
    """SQL for the `effective_from` of the client's exchange rate in force at the message's time.

    NULL for a USD client without running the lookup (CASE evaluates only the branch it takes):
    most calls need no rate at all.
    """
    lookup = Subquery(
        ExchangeRate.objects.filter(currency=OuterRef("domain__currency"), effective_from__lte=OuterRef(timestamp))
        .order_by("-effective_from")
        .values("effective_from")[:1]
    )
    return Case(When(domain__currency="USD", then=Value(None)), default=lookup, output_field=DateTimeField())


def charge_totals(qs: QuerySet) -> QuerySet:
    """Per (session, client, rate in force): messages, calls, tokens, USD cost, unknown prices, first/last time."""
    return (
        qs.annotate(rate_from=rate_in_force())
        .values("session_id", "domain_id", "rate_from")
        .annotate(
            n_messages=Count("pk"),
            n_calls=Count("pk", filter=CALLS),
            n_tokens=Sum("tokens"),
            cost=Sum("cost_usd"),
            n_unpriced=Count("pk", filter=UNPRICED),
            first=Min("timestamp"),
            last=Max("timestamp"),
        )
        .order_by()
    )


def visible_to(qs: QuerySet, *, user, mine: bool, session_path: str = "session__") -> QuerySet:
    """The permission filter: a consultant's own report sees only their own sessions.

    Staff reports are gated by the view (staff only); `mine=True` narrows any viewer,
    staff included, to their own sessions.
    """
    if mine or not user.is_staff:
        return qs.filter(**{f"{session_path}user": user})
    return qs


# --- Billing lines ------------------------------------------------------------------------


@dataclass
class ReportData:
    """Everything a report page or CSV needs, from a bounded number of queries."""

    period: Period
    lines: list[BillingLine]
    rows: list[GroupRow]
    totals: list[Totals]  # one per currency, never summed across currencies

    @property
    def total(self) -> Totals:
        """The one total of a single-currency report (an empty Totals for an empty one)."""
        if not self.totals:
            return Totals()
        if len(self.totals) > 1:
            raise MixedCurrencies(
                ERR_MIXED_CURRENCIES.format(currencies=", ".join(t.currency or "?" for t in self.totals))
            )
        return self.totals[0]

    @property
    def unpriced(self) -> int:
        return sum(t.unpriced for t in self.totals)

    @property
    def unconverted(self) -> int:
        return sum(t.unconverted for t in self.totals)

    @property
    def open_sessions(self) -> int:
        return sum(t.open_sessions for t in self.totals)


def price_books(client_ids) -> tuple[dict, TermsBook, RateBook]:
    """The clients, their dated terms and the exchange rates of their currencies (three queries)."""
    clients = ClientDomain.objects.in_bulk(list(client_ids))
    terms = TermsBook(clients, ClientTermsRow.objects.filter(client_id__in=list(clients)))
    currencies = {c.currency for c in clients.values()} - {"USD"}
    rates = RateBook(
        ExchangeRate.objects.filter(currency__in=currencies).values_list("currency", "effective_from", "usd_rate")
        if currencies
        else []
    )
    return clients, terms, rates


def billed_numbers(session_ids) -> dict[tuple, str]:
    """(session, client) → the number of the issued invoice that billed that part."""
    rows = (
        InvoiceLine.objects.billed()
        .filter(session_id__in=session_ids)
        .values_list("session_id", "client_id", "invoice__number")
        .distinct()
        .order_by("invoice__number")
    )
    found: dict[tuple, str] = {}
    for session_id, client_id, number in rows:
        found.setdefault((session_id, client_id), number)
    return found


def _new_slot() -> dict:
    return {"seconds": 0, "messages": 0, "tokens": 0, "cost": ZERO, "unpriced": 0, "charges": {}}


def _add_charges(found: dict, rows) -> None:
    for row in rows:
        slot = found.setdefault((row["session_id"], row["domain_id"]), _new_slot())
        cost = to_decimal(row["cost"]) or ZERO
        slot["messages"] += row["n_messages"]
        slot["tokens"] += row["n_tokens"] or 0
        slot["cost"] += cost
        slot["unpriced"] += row["n_unpriced"]
        charge = slot["charges"].setdefault(row["rate_from"], [0, 0, 0, ZERO, 0, None, None])
        charge[0] += row["n_messages"]
        charge[1] += row["n_calls"]
        charge[2] += row["n_tokens"] or 0
        charge[3] += cost
        charge[4] += row["n_unpriced"]
        charge[5] = row["first"] if charge[5] is None else min(charge[5], row["first"])
        charge[6] = row["last"] if charge[6] is None else max(charge[6], row["last"])


def segment_seconds(rows, sessions: dict, now: dt.datetime) -> Iterator[tuple]:
    """(session, client, model, seconds) per segment, cut as the session summary cuts them.

    `rows` are (session_id, domain_id, model, started_at, ended_at) ordered by session, start, id.
    """
    for session_id, group in itertools.groupby(rows, key=lambda r: r[0]):
        info = sessions[session_id]
        until = info["ended_at"] or now
        segments = list(group)
        spans = [(seg[3], seg[4] or until) for seg in segments]
        for seg, seconds in zip(segments, allocate_seconds(spans, info["started_at"]), strict=True):
            yield session_id, seg[1], seg[2], seconds


def lines_for_sessions(
    sessions: QuerySet,
    *,
    now: dt.datetime,
    client: ClientDomain | None = None,
    unbilled_only: bool = False,
    model_seconds: dict | None = None,
) -> list[BillingLine]:
    """The priced parts of these sessions (only `client`'s when given), whole, as the period rule bills them.

    `model_seconds`, when given, is filled with the seconds per model of the parts billed.
    """
    info = {row["session_id"]: row for row in sessions.values(*SESSION_FIELDS).order_by()}
    if not info:
        return []
    ids = list(info)
    found: dict[tuple, dict] = {}
    segments = SessionSegment.objects.filter(session_id__in=ids).order_by("session_id", "started_at", "id")
    rows = segments.values_list("session_id", "domain_id", "model", "started_at", "ended_at")
    for session_id, client_id, model, seconds in segment_seconds(rows, info, now):
        found.setdefault((session_id, client_id), _new_slot())["seconds"] += seconds
        if model_seconds is not None and (client is None or client_id == client.pk):
            model_seconds[model] = model_seconds.get(model, 0) + seconds
    messages = billable_messages().filter(session_id__in=ids)
    if client is not None:
        messages = messages.filter(domain=client)
    _add_charges(found, charge_totals(messages))
    archived_ids = [sid for sid, row in info.items() if row["archived_at"] is not None]
    if archived_ids:  # only archived sessions keep message figures there
        archived = ArchivedMessageCost.objects.filter(session_id__in=archived_ids)
        _add_charges(found, charge_totals(archived.filter(domain=client) if client is not None else archived))
    if client is not None:
        found = {key: slot for key, slot in found.items() if key[1] == client.pk}
    _clients, terms, rates = price_books({cid for _, cid in found})
    # Only a session with an invoice link has a part on an issued invoice (issuing sets it,
    # voiding moves it to another issued invoice or clears it).
    invoiced = [sid for sid, row in info.items() if row["invoice_id"] is not None]
    numbers = billed_numbers(invoiced) if invoiced else {}

    lines = []
    for (session_id, client_id), slot in found.items():
        if slot["seconds"] == 0 and slot["messages"] == 0:
            continue
        number = numbers.get((session_id, client_id))
        if unbilled_only and number is not None:
            continue
        row = info[session_id]
        part_terms = terms.at(client_id, row["ended_at"] or now)
        charges = [
            LLMCharge(
                currency=part_terms.currency,
                rate=rates.rate(part_terms.currency, rate_from),
                rate_from=rate_from,
                messages=n,
                calls=calls,
                tokens=tokens,
                usd=cost,
                unpriced=unpriced,
                first_at=first,
                last_at=last,
            )
            for rate_from, (n, calls, tokens, cost, unpriced, first, last) in slot["charges"].items()
        ]
        lines.append(
            BillingLine(
                terms=part_terms,
                session_id=session_id,
                session_name=row["name"] or f"Session {str(session_id)[:8]}",
                user_id=row["user_id"],
                username=row["user__username"],
                started_at=row["started_at"],
                ended_at=row["ended_at"],
                status=row["status"],
                invoice_number=number,
                seconds=slot["seconds"],
                messages=slot["messages"],
                tokens=slot["tokens"],
                llm_cost_raw=slot["cost"],
                unpriced=slot["unpriced"],
                charges=charges,
                archived=row["archived_at"] is not None,
            ).price()
        )
    return lines


def _scoped(period: Period, *, now, user, mine: bool, client, ended_only: bool = False) -> QuerySet:
    sessions = sessions_billed_in(period, now=now, ended_only=ended_only)
    if user is not None:
        sessions = visible_to(sessions, user=user, mine=mine, session_path="")
    if client is not None:
        sessions = sessions.filter(sessions_billing(client))
    return sessions


def billing_lines(
    *,
    period: Period,
    user=None,
    mine: bool = False,
    client: ClientDomain | None = None,
    now: dt.datetime | None = None,
    unbilled_only: bool = False,
    ended_only: bool = False,
) -> list[BillingLine]:
    """Priced billing lines (one per session and client) the period bills, newest session first."""
    now = now or timezone.now()
    sessions = _scoped(period, now=now, user=user, mine=mine, client=client, ended_only=ended_only)
    lines = lines_for_sessions(sessions, now=now, client=client, unbilled_only=unbilled_only)
    lines.sort(key=lambda ln: (ln.started_at, str(ln.session_id), ln.terms.slug), reverse=True)
    return lines


def iter_billing_lines(
    *,
    period: Period,
    user=None,
    mine: bool = False,
    client: ClientDomain | None = None,
    now: dt.datetime | None = None,
    chunk: int = STREAM_CHUNK,
) -> Iterator[BillingLine]:
    """The same lines as `billing_lines`, in session-start order, a chunk of sessions at a time.

    For exports of any size: memory holds one chunk of lines, not the whole period.
    """
    now = now or timezone.now()
    sessions = _scoped(period, now=now, user=user, mine=mine, client=client)
    ids = list(sessions.order_by("started_at", "session_id").values_list("session_id", flat=True))
    for i in range(0, len(ids), chunk):
        part = ChatSession.objects.filter(pk__in=ids[i : i + chunk])
        lines = lines_for_sessions(part, now=now, client=client)
        lines.sort(key=lambda ln: (ln.started_at, str(ln.session_id), ln.terms.slug))
        yield from lines


def staff_report(*, period: Period, user, now=None) -> ReportData:
    """The staff report's client rows: summed by PostgreSQL when it is the database.

    Same figures as `report_for_period` (tested), without loading every line into Python.
    """
    if pg_reports.available():
        rows = pg_reports.client_rows(period=period, now=now or timezone.now())
        return ReportData(period=period, lines=[], rows=rows, totals=currency_totals(rows))
    return report_for_period(period=period, user=user, now=now)


def report_csv_chunks(*, period: Period, user, mine: bool = False, client=None, now=None) -> Iterator[str]:
    """The report CSV as text chunks, one row per billing line; COPY-streamed on PostgreSQL."""
    if pg_reports.available():
        owner = user if (mine or not user.is_staff) else None
        header = csv_export.header_line(csv_export.REPORT_HEADER)
        lines = pg_reports.csv_lines(period=period, now=now or timezone.now(), client=client, user=owner)
        return itertools.chain([header], lines)
    found = iter_billing_lines(period=period, user=user, mine=mine, client=client, now=now)
    return csv_export.stream_rows(csv_export.REPORT_HEADER, csv_export.report_rows(found, period))


def report_for_period(*, period: Period, user, mine: bool = False, now=None) -> ReportData:
    """The per-client report: one row per client, one total per currency, each the sum of its rows."""
    lines = billing_lines(period=period, user=user, mine=mine, now=now)
    rows = client_rows(lines)
    return ReportData(period=period, lines=lines, rows=rows, totals=currency_totals(rows))


@dataclass
class ClientDrilldown:
    report: ReportData
    consultants: list[GroupRow]
    models: list[dict]


def client_drilldown(*, period: Period, client: ClientDomain, user, mine: bool = False, now=None) -> ClientDrilldown:
    """One client's period: its lines by consultant, by model, and by session."""
    now = now or timezone.now()
    sessions = _scoped(period, now=now, user=user, mine=mine, client=client)
    model_seconds: dict[str, int] = {}
    lines = lines_for_sessions(sessions, now=now, client=client, model_seconds=model_seconds)
    lines.sort(key=lambda ln: (ln.started_at, str(ln.session_id)), reverse=True)
    rows = client_rows(lines)
    report = ReportData(period=period, lines=lines, rows=rows, totals=currency_totals(rows))

    by_model: dict[str, dict] = defaultdict(_new_slot)
    for model, seconds in model_seconds.items():
        by_model[model]["seconds"] += seconds
    sources = [billable_messages()]
    if any(ln.archived for ln in lines):
        sources.append(ArchivedMessageCost.objects.all())
    for source in sources:
        qs = source.filter(session__in=sessions.values("pk"), domain=client).exclude(model="")
        for agg in with_totals(qs, "model").order_by():
            slot = by_model[agg["model"]]
            slot["messages"] += agg["n_messages"]
            slot["tokens"] += agg["n_tokens"] or 0
            slot["cost"] += to_decimal(agg["cost"]) or ZERO
            slot["unpriced"] += agg["n_unpriced"]
    models = [
        {"model": name, **slot} for name, slot in sorted(by_model.items(), key=lambda kv: (-kv[1]["cost"], kv[0]))
    ]
    return ClientDrilldown(report=report, consultants=consultant_rows(lines), models=models)


def daily_cost(*, period: Period, user, mine: bool = False, client: ClientDomain | None = None, by: str = "domain_id"):
    """Provider cost in USD per local day and client (or model), for the stacked chart: {day: {key: Decimal}}.

    Usage over time by each call's own day, in the one currency every call is stored in; the
    billed amounts in each client's currency are in the tables.
    """
    qs = visible_to(messages_for_period(period.start, period.end), user=user, mine=mine)
    if client is not None:
        qs = qs.billed_to(client)
    rows = (
        qs.annotate(day=TruncDate("timestamp", tzinfo=period.tz))
        .values("day", by)
        .annotate(cost=Sum("cost_usd"))
        .order_by()
    )
    out: dict[dt.date, dict] = defaultdict(dict)
    for row in rows:
        day = row["day"]
        if isinstance(day, dt.datetime):
            day = day.date()
        out[day][row[by]] = (out[day].get(row[by]) or ZERO) + (to_decimal(row["cost"]) or ZERO)
    return out


# --- Monitoring ---------------------------------------------------------------------------

DURATION_BUCKETS = [
    ("under 5 min", 0, 5 * 60),
    ("5–15 min", 5 * 60, 15 * 60),
    ("15–30 min", 15 * 60, 30 * 60),
    ("30–60 min", 30 * 60, 60 * 60),
    ("1–2 h", 60 * 60, 2 * 3600),
    ("2–4 h", 2 * 3600, 4 * 3600),
    ("4 h and more", 4 * 3600, None),
]
STUCK_LIMIT = 50
UNPRICED_LIMIT = 50


def turn_stale_after() -> dt.timedelta:
    """How long a streaming turn may go unheard of before it counts as stuck (TURN_STALE_SECONDS)."""
    return session_turn_stale_after()


def duration_distribution(*, period: Period) -> list[dict]:
    """Ended sessions started in the period, counted by duration bucket (one query)."""
    aggregates = {}
    for i, (_, lo, hi) in enumerate(DURATION_BUCKETS):
        cond = Q(duration_seconds__gte=lo)
        if hi is not None:
            cond &= Q(duration_seconds__lt=hi)
        aggregates[f"b{i}"] = Count("pk", filter=cond)
    counts = ChatSession.objects.filter(
        started_at__gte=period.start, started_at__lt=period.end, status=SessionStatus.ENDED
    ).aggregate(**aggregates)
    return [{"label": label, "count": counts[f"b{i}"]} for i, (label, _, _) in enumerate(DURATION_BUCKETS)]


def context_carry_stats(*, period: Period) -> dict:
    """How often context is carried to another client or model."""
    sessions = ChatSession.objects.filter(started_at__gte=period.start, started_at__lt=period.end).aggregate(
        total=Count("pk", distinct=True),
        carried=Count("pk", filter=Q(context_streams__isnull=False), distinct=True),
    )
    by_reason = list(
        ContextStream.objects.filter(streamed_at__gte=period.start, streamed_at__lt=period.end)
        .values("reason")
        .annotate(n=Count("pk"), tokens=Sum("total_tokens"), cost=Sum("cost_usd"))
        .order_by("-n")
    )
    share = (Decimal(sessions["carried"]) * 100 / sessions["total"]) if sessions["total"] else ZERO
    return {
        "sessions": sessions["total"],
        "carried": sessions["carried"],
        "share_percent": quantize(share, 1),
        "streams": sum(r["n"] for r in by_reason),
        "by_reason": by_reason,
    }


def stuck_sessions(*, now: dt.datetime | None = None) -> QuerySet:
    """Active sessions idle past SESSION_IDLE_TIMEOUT, or with a turn streaming for too long."""
    now = now or timezone.now()
    idle_cutoff = now - dt.timedelta(seconds=settings.SESSION_IDLE_TIMEOUT)
    return (
        ChatSession.objects.active()
        .filter(Q(last_activity_at__lt=idle_cutoff) | stale_turn_q(now))
        .select_related("user", "domain")
        .order_by("last_activity_at")
    )


def unpriced_calls(*, period: Period) -> QuerySet:
    return (
        LLMUsage.objects.unpriced()
        .for_period(period.start, period.end)
        .select_related("user", "client")
        .order_by("-created_at")
    )


def unpriced_by_model(*, period: Period) -> list[dict]:
    return list(
        LLMUsage.objects.unpriced()
        .for_period(period.start, period.end)
        .values("provider", "model")
        .annotate(n=Count("pk"), last=Max("created_at"))
        .order_by("-n", "provider", "model")
    )


def cost_per_client(*, period: Period) -> list[dict]:
    """LLM cost per client from billable messages (raw, six decimals), unknown prices counted."""
    rows = with_totals(messages_for_period(period.start, period.end), "domain_id", "domain__name", "domain__slug")
    return sorted(rows, key=lambda r: (-(r["cost"] or ZERO), r["domain__name"]))
