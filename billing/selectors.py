"""Report reads: querysets in the report vocabulary, composed with who may see what.

Every report is built from the same few bounded queries (clients, message totals per
session and client, segments overlapping the period, and only when needed the sessions that
had messages but no time), then priced by `billing/reports.py`. The number of queries does
not grow with the number of rows.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings
from django.db.models import Count, DateTimeField, DurationField, ExpressionWrapper, Max, Q, QuerySet, Sum, Value
from django.db.models.functions import Coalesce, Greatest, Least, TruncDate
from django.utils import timezone

from billing import csv_export, pg_reports
from billing.models import ClientDomain, InvoiceLine, InvoiceStatus, LLMUsage
from billing.reports import (
    ZERO,
    BillingLine,
    ClientTerms,
    GroupRow,
    Period,
    client_rows,
    consultant_rows,
    grand_total,
)
from sessions_app.models import ChatSession, ContextStream, SessionMessage, SessionSegment, SessionStatus, stale_turn_q
from sessions_app.models import turn_stale_after as session_turn_stale_after

# A call counts as "unknown price" when a priced kind of message carries no cost. User
# messages are what the consultant typed; their input cost is on the answer's call.
UNPRICED = Q(cost_usd__isnull=True) & ~Q(role="user")
SESSION_FIELDS = {
    "session__name": "name",
    "session__user_id": "user_id",
    "session__user__username": "username",
    "session__started_at": "started_at",
    "session__ended_at": "ended_at",
    "session__status": "status",
    "session__invoice__number": "invoice_number",
}
IN_CHUNK = 500
STREAM_CHUNK = 5000


# --- Querysets in the report vocabulary ---------------------------------------------------


def billable_messages() -> QuerySet:
    """Messages whose cost counts (not branch copies, not imports)."""
    return SessionMessage.objects.billable()


def messages_for_period(start: dt.datetime, end: dt.datetime) -> QuerySet:
    return billable_messages().for_period(start, end)


def with_totals(qs: QuerySet, *group_by: str) -> QuerySet:
    """Message counts, tokens, summed cost and unknown-price calls, grouped by `group_by`."""
    return qs.values(*group_by).annotate(
        n_messages=Count("pk"),
        n_tokens=Sum("tokens"),
        cost=Sum("cost_usd"),
        n_unpriced=Count("pk", filter=UNPRICED),
    )


def segments_overlapping(start: dt.datetime, end: dt.datetime) -> QuerySet:
    """Segments with any time in [start, end); open segments run until now."""
    return SessionSegment.objects.filter(started_at__lt=end).filter(Q(ended_at__isnull=True) | Q(ended_at__gt=start))


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
    total: object

    @property
    def unpriced(self) -> int:
        return self.total.unpriced


def _client_terms(client_ids=None) -> dict:
    qs = ClientDomain.objects.all()
    if client_ids is not None:
        qs = qs.filter(pk__in=client_ids)
    return {c.pk: ClientTerms.of(c) for c in qs}


def billed_pairs(*, client_ids, first_day: dt.date, last_day: dt.date) -> set[tuple]:
    """(session, client) pairs already on an issued invoice whose period overlaps these days."""
    rows = (
        InvoiceLine.objects.filter(
            invoice__status=InvoiceStatus.ISSUED,
            invoice__client_id__in=client_ids,
            invoice__period_start__lte=last_day,
            invoice__period_end__gte=first_day,
            session__isnull=False,
        )
        .values_list("session_id", "invoice__client_id")
        .distinct()
    )
    return set(rows)


def _filtered(period: Period, *, user, mine: bool, client, ended_only: bool, session_ids=None):
    messages = messages_for_period(period.start, period.end)
    segments = segments_overlapping(period.start, period.end)
    if client is not None:
        messages = messages.billed_to(client)
        segments = segments.filter(domain=client)
    if user is not None:
        messages = visible_to(messages, user=user, mine=mine)
        segments = visible_to(segments, user=user, mine=mine)
    if ended_only:
        messages = messages.filter(session__status=SessionStatus.ENDED)
        segments = segments.filter(session__status=SessionStatus.ENDED)
    if session_ids is not None:
        messages = messages.filter(session_id__in=session_ids)
        segments = segments.filter(session_id__in=session_ids)
    return messages, segments


def _new_slot() -> dict:
    return {"seconds": 0, "messages": 0, "tokens": 0, "cost": ZERO, "unpriced": 0}


def clipped_duration(start: dt.datetime, cap: dt.datetime):
    """SQL for a segment's time inside [start, cap): an open segment runs to `cap`.

    Computed by the database so a report never loads one datetime per segment.
    """
    lo = Greatest("started_at", Value(start, output_field=DateTimeField()))
    hi = Least(Coalesce("ended_at", Value(cap, output_field=DateTimeField())), Value(cap, output_field=DateTimeField()))
    return ExpressionWrapper(hi - lo, output_field=DurationField())


def _seconds(value) -> float:
    if value is None:
        return 0.0
    return max(value.total_seconds(), 0.0) if isinstance(value, dt.timedelta) else max(value / 1_000_000, 0.0)


def _build_lines(
    *,
    period: Period,
    messages: QuerySet,
    segments: QuerySet,
    cap: dt.datetime,
    terms: dict,
    unbilled_only: bool,
) -> list[BillingLine]:
    found: dict[tuple, dict] = {}
    sessions: dict[object, dict] = {}
    time_rows = (
        segments.values("session_id", "domain_id", *SESSION_FIELDS)
        .annotate(clipped=Sum(clipped_duration(period.start, cap)))
        .order_by()
    )
    for row in time_rows:
        slot = found[(row["session_id"], row["domain_id"])] = _new_slot()
        slot["seconds"] = _seconds(row["clipped"])
        sessions[row["session_id"]] = {short: row[long] for long, short in SESSION_FIELDS.items()}

    for agg in with_totals(messages, "session_id", "domain_id").order_by():
        slot = found.get((agg["session_id"], agg["domain_id"]))
        if slot is None:
            slot = found[(agg["session_id"], agg["domain_id"])] = _new_slot()
        slot["messages"] += agg["n_messages"]
        slot["tokens"] += agg["n_tokens"] or 0
        slot["cost"] += agg["cost"] or ZERO
        slot["unpriced"] += agg["n_unpriced"]

    # Sessions with messages but no time in the period (rare): one more query per 500.
    missing = list({sid for sid, _ in found if sid not in sessions})
    for i in range(0, len(missing), IN_CHUNK):
        rows = ChatSession.objects.filter(pk__in=missing[i : i + IN_CHUNK]).values(
            "session_id", *(long.removeprefix("session__") for long in SESSION_FIELDS)
        )
        for row in rows:
            sessions[row["session_id"]] = {
                short: row[long.removeprefix("session__")] for long, short in SESSION_FIELDS.items()
            }

    client_ids = {cid for _, cid in found}
    unknown = client_ids - terms.keys()
    if unknown:
        terms.update(_client_terms(unknown))
    skip = (
        billed_pairs(client_ids=client_ids, first_day=period.first_day, last_day=period.last_day)
        if unbilled_only and client_ids
        else set()
    )

    lines = []
    for (session_id, client_id), slot in found.items():
        if (session_id, client_id) in skip:
            continue
        # Whole seconds, floored: 6:00.4 bills as 6:00 (durations are kept to the second).
        seconds = int(slot["seconds"])
        if seconds == 0 and slot["messages"] == 0:
            continue
        info = sessions[session_id]
        lines.append(
            BillingLine(
                terms=terms[client_id],
                session_id=session_id,
                session_name=info["name"] or f"Session {str(session_id)[:8]}",
                user_id=info["user_id"],
                username=info["username"],
                started_at=info["started_at"],
                ended_at=info["ended_at"],
                status=info["status"],
                invoice_number=info["invoice_number"],
                seconds=seconds,
                messages=slot["messages"],
                tokens=slot["tokens"],
                llm_cost_raw=slot["cost"],
                unpriced=slot["unpriced"],
            ).price()
        )
    return lines


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
    """Priced billing lines (one per session and client) for the period, newest session first."""
    now = now or timezone.now()
    messages, segments = _filtered(period, user=user, mine=mine, client=client, ended_only=ended_only)
    terms = {client.pk: ClientTerms.of(client)} if client is not None else {}
    lines = _build_lines(
        period=period,
        messages=messages,
        segments=segments,
        cap=min(now, period.end),
        terms=terms,
        unbilled_only=unbilled_only,
    )
    lines.sort(key=lambda ln: (ln.started_at, str(ln.session_id)), reverse=True)
    return lines


def sessions_in_period(period: Period) -> QuerySet:
    """Sessions that can have time or messages in the period: started before its end, not ended before its start."""
    return ChatSession.objects.filter(started_at__lt=period.end).filter(
        Q(ended_at__isnull=True) | Q(ended_at__gte=period.start)
    )


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
    cap = min(now, period.end)
    sessions = sessions_in_period(period)
    if user is not None:
        sessions = visible_to(sessions, user=user, mine=mine, session_path="")
    ids = list(sessions.order_by("started_at", "session_id").values_list("session_id", flat=True))
    terms = {client.pk: ClientTerms.of(client)} if client is not None else {}
    for i in range(0, len(ids), chunk):
        part = ids[i : i + chunk]
        messages, segments = _filtered(period, user=user, mine=mine, client=client, ended_only=False, session_ids=part)
        lines = _build_lines(
            period=period, messages=messages, segments=segments, cap=cap, terms=terms, unbilled_only=False
        )
        lines.sort(key=lambda ln: (ln.started_at, str(ln.session_id), ln.terms.slug))
        yield from lines


def staff_report(*, period: Period, user, now=None) -> ReportData:
    """The staff report's client rows: summed by PostgreSQL when it is the database.

    Same figures as `report_for_period` (tested), without loading every line into Python.
    """
    if pg_reports.available():
        rows, total = pg_reports.client_rows(period=period, now=now or timezone.now())
        return ReportData(period=period, lines=[], rows=rows, total=total)
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
    """The per-client report: one row per client, its total the sum of the rows."""
    lines = billing_lines(period=period, user=user, mine=mine, now=now)
    rows = client_rows(lines)
    return ReportData(period=period, lines=lines, rows=rows, total=grand_total(rows))


@dataclass
class ClientDrilldown:
    report: ReportData
    consultants: list[GroupRow]
    models: list[dict]


def client_drilldown(*, period: Period, client: ClientDomain, user, mine: bool = False, now=None) -> ClientDrilldown:
    """One client's period: its lines by consultant, by model, and by session."""
    now = now or timezone.now()
    lines = billing_lines(period=period, user=user, mine=mine, client=client, now=now)
    rows = client_rows(lines)
    report = ReportData(period=period, lines=lines, rows=rows, total=grand_total(rows))

    by_model: dict[str, dict] = defaultdict(_new_slot)
    _, segments = _filtered(period, user=user, mine=mine, client=client, ended_only=False)
    cap = min(now, period.end)
    for row in segments.values("model").annotate(clipped=Sum(clipped_duration(period.start, cap))).order_by():
        by_model[row["model"]]["seconds"] += _seconds(row["clipped"])
    messages = visible_to(messages_for_period(period.start, period.end).billed_to(client), user=user, mine=mine)
    for agg in with_totals(messages.exclude(model=""), "model").order_by():
        slot = by_model[agg["model"]]
        slot["messages"] += agg["n_messages"]
        slot["tokens"] += agg["n_tokens"] or 0
        slot["cost"] += agg["cost"] or ZERO
        slot["unpriced"] += agg["n_unpriced"]
    models = [
        {"model": name, **slot, "seconds": int(slot["seconds"])}
        for name, slot in sorted(by_model.items(), key=lambda kv: (-kv[1]["cost"], kv[0]))
    ]
    return ClientDrilldown(report=report, consultants=consultant_rows(lines), models=models)


def daily_cost(*, period: Period, user, mine: bool = False, client: ClientDomain | None = None, by: str = "domain_id"):
    """LLM cost per local day and client (or model), for the stacked chart: {day: {key: Decimal}}."""
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
        out[day][row[by]] = (out[day].get(row[by]) or ZERO) + (row["cost"] or ZERO)
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
        "share_percent": share.quantize(Decimal("0.1")),
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
