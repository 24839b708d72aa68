"""PostgreSQL fast paths for the two heavy reads: the all-clients report and the full CSV.

The rules are those of `billing/reports.py`, computed by the database in exact `numeric`
arithmetic: time per (session, client) clipped to the period and floored to whole seconds,
rounded up to the client's increment; amounts rounded to the cent once per line
(`ROUND(numeric, 2)` rounds half away from zero, which is ROUND_HALF_UP for these
non-negative amounts); totals are sums of rounded lines. The CSV is produced by
`COPY … TO STDOUT` and streamed row by row, so an export of any size runs at database speed
in constant memory.

The Python path (`billing/selectors.py`) stays the reference and serves SQLite; the tests
on PostgreSQL check that both give the same figures and byte-identical CSV.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from decimal import Decimal

import psycopg
from django.db import DatabaseError, connection, transaction

from billing.csv_export import FORMULA_STARTS, iso
from billing.models import ClientDomain
from billing.reports import ClientTerms, GroupRow, Period, Totals, grand_total

ROWS_PER_CHUNK = 500
# For this transaction only: sort and hash a year of lines in memory rather than on disk, and
# skip JIT compilation, which costs more than it saves on these queries.
QUERY_SETTINGS = "SELECT set_config('work_mem', '64MB', true), set_config('jit', 'off', true)"


def available() -> bool:
    return connection.vendor == "postgresql"


def _formula_starts() -> str:
    return ", ".join(
        "E'" + c.replace("\t", "\\t").replace("\r", "\\r").replace("'", "\\'") + "'" for c in FORMULA_STARTS
    )


def _esc(expr: str) -> str:
    """SQL twin of `csv_export.escape_cell`, with '' as NULL so COPY writes it unquoted."""
    return f"NULLIF(CASE WHEN left({expr}, 1) IN ({_formula_starts()}) THEN '''' || {expr} ELSE {expr} END, '')"


def _iso(expr: str) -> str:
    """SQL twin of `datetime.astimezone(tz).isoformat()`, with the session's TimeZone set to tz.

    Local time to the second, microseconds only when there are any (as Python does), then
    the offset as ±hh:mm: one to_char per value.
    """
    return (
        f"CASE WHEN date_trunc('second', {expr}) = {expr}"
        f" THEN to_char({expr}, 'YYYY-MM-DD\"T\"HH24:MI:SSTZH:TZM')"
        f" ELSE to_char({expr}, 'YYYY-MM-DD\"T\"HH24:MI:SS.USTZH:TZM') END"
    )


def _lines_sql(*, client_id=None, user_id=None) -> str:
    """The priced billing lines as a CTE chain ending in `priced` (one row per session and client).

    Message totals come from `session_message_totals` for every (session, client) whose
    messages all lie inside the period (their bounds do), and are summed from the messages
    themselves only for the few pairs that straddle the period's start or end.
    """
    seg_filter = tot_filter = msg_filter = ""
    seg_join = tot_join = msg_join = ""
    if client_id is not None:
        seg_filter += " AND s.domain_id = %(client)s"
        tot_filter += " AND t.domain_id = %(client)s"
        msg_filter += " AND m.domain_id = %(client)s"
    if user_id is not None:
        seg_join = "JOIN ollama_streaming_sessions su ON su.session_id = s.session_id AND su.user_id = %(user)s"
        tot_join = "JOIN ollama_streaming_sessions tu ON tu.session_id = t.session_id AND tu.user_id = %(user)s"
        msg_join = "JOIN ollama_streaming_sessions mu ON mu.session_id = m.session_id AND mu.user_id = %(user)s"
    # Only constant fragments are interpolated; every value is a bound parameter.
    return f"""
    WITH seg AS (
        SELECT s.session_id, s.domain_id,
               FLOOR(EXTRACT(EPOCH FROM SUM(
                   LEAST(COALESCE(s.ended_at, %(cap)s), %(cap)s) - GREATEST(s.started_at, %(start)s)
               )))::bigint AS secs
        FROM session_segments s {seg_join}
        WHERE s.started_at < %(end)s AND (s.ended_at IS NULL OR s.ended_at > %(start)s){seg_filter}
        GROUP BY s.session_id, s.domain_id
    ), inside AS (
        SELECT t.session_id, t.domain_id, t.messages::bigint AS messages, t.tokens, t.cost,
               t.unpriced::bigint AS unpriced
        FROM session_message_totals t {tot_join}
        WHERE t.first_at >= %(start)s AND t.last_at < %(end)s AND t.messages > 0{tot_filter}
    ), straddling AS (
        SELECT t.session_id, t.domain_id
        FROM session_message_totals t {tot_join}
        WHERE t.first_at < %(end)s AND t.last_at >= %(start)s
          AND (t.first_at < %(start)s OR t.last_at >= %(end)s){tot_filter}
    ), msg AS (
        SELECT * FROM inside
        UNION ALL
        SELECT m.session_id, m.domain_id, COUNT(*) AS messages, COALESCE(SUM(m.tokens), 0) AS tokens,
               COALESCE(SUM(m.cost_usd), 0) AS cost,
               COUNT(*) FILTER (WHERE m.cost_usd IS NULL AND m.role <> 'user') AS unpriced
        FROM straddling x
        JOIN ollama_session_messages m ON m.session_id = x.session_id AND m.domain_id = x.domain_id {msg_join}
        WHERE m."timestamp" >= %(start)s AND m."timestamp" < %(end)s
          AND m.copied_from_id IS NULL AND NOT m.is_imported{msg_filter}
        GROUP BY m.session_id, m.domain_id
    ), raw AS (
        SELECT COALESCE(seg.session_id, msg.session_id) AS session_id,
               COALESCE(seg.domain_id, msg.domain_id) AS domain_id,
               GREATEST(COALESCE(seg.secs, 0), 0) AS secs, COALESCE(msg.messages, 0) AS messages,
               COALESCE(msg.tokens, 0) AS tokens, COALESCE(msg.cost, 0) AS cost,
               COALESCE(msg.unpriced, 0) AS unpriced
        FROM seg FULL OUTER JOIN msg ON seg.session_id = msg.session_id AND seg.domain_id = msg.domain_id
    ), lines AS (
        SELECT raw.*, c.billing_increment_minutes AS inc, c.hourly_rate, c.llm_markup_percent,
               CASE WHEN raw.secs > 0
                    THEN ((raw.secs + c.billing_increment_minutes * 60 - 1) / (c.billing_increment_minutes * 60))
                         * c.billing_increment_minutes
                    ELSE 0 END AS minutes
        FROM raw JOIN domain_portfolio c ON c.id = raw.domain_id
        WHERE raw.secs > 0 OR raw.messages > 0
    ), priced AS (
        SELECT lines.*,
               ROUND(hourly_rate * minutes / 60.0, 2) AS time_amount,
               ROUND(cost, 2) AS llm_cost,
               ROUND(cost * llm_markup_percent / 100, 2) AS markup
        FROM lines
    )
    """  # noqa: S608  (constant fragments only; every value is a bound parameter)


def _params(period: Period, cap: dt.datetime, client=None, user=None) -> dict:
    return {
        "start": period.start,
        "end": period.end,
        "cap": cap,
        "tz": period.tz.key,
        "client": getattr(client, "pk", None),
        "user": getattr(user, "pk", None),
    }


def client_rows(*, period: Period, now: dt.datetime) -> tuple[list[GroupRow], Totals]:
    """The staff report's rows (one per client) and total, summed by the database."""
    cap = min(now, period.end)
    totals_sql = """
    SELECT p.domain_id, COUNT(*), SUM(p.secs), SUM(p.minutes), SUM(p.messages), SUM(p.tokens), SUM(p.cost),
           SUM(p.unpriced), SUM(p.time_amount), SUM(p.llm_cost), SUM(p.markup),
           COUNT(*) FILTER (WHERE ss.ended_at IS NULL)
    FROM priced p JOIN ollama_streaming_sessions ss ON ss.session_id = p.session_id
    GROUP BY p.domain_id
    """
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(QUERY_SETTINGS)
        cur.execute(_lines_sql() + totals_sql, _params(period, cap))
        found = cur.fetchall()
    clients = {c.pk: c for c in ClientDomain.objects.filter(pk__in=[r[0] for r in found])}
    rows = []
    for cid, sessions, secs, minutes, messages, tokens, cost, unpriced, time_amount, llm, markup, open_ in found:
        totals = Totals(
            sessions=sessions,
            seconds=int(secs),
            billable_minutes=int(minutes),
            messages=int(messages),
            tokens=int(tokens),
            llm_cost_raw=Decimal(cost),
            unpriced=int(unpriced),
            open_sessions=open_,
            time_amount=Decimal(time_amount),
            llm_cost=Decimal(llm),
            markup=Decimal(markup),
        )
        totals.total = totals.time_amount + totals.llm_cost + totals.markup
        client = clients[cid]
        rows.append(GroupRow(key=cid, label=client.name, terms=ClientTerms.of(client), totals=totals))
    rows.sort(key=lambda r: (r.label.lower(), r.terms.slug))
    return rows, grand_total(rows)


def csv_lines(*, period: Period, now: dt.datetime, client=None, user=None) -> Iterator[str]:
    """The report CSV's data rows (no header), straight from `COPY … TO STDOUT`, in batches of rows."""
    cap = min(now, period.end)
    params = _params(period, cap, client, user)
    params["period_start"] = iso(period.start, period.tz)
    params["period_end"] = iso(period.end, period.tz)
    # A session's name is escaped per row (its fallback never needs it); a client's cells and a
    # consultant's once each.
    name = (
        "CASE WHEN ss.name = '' THEN 'Session ' || left(ss.session_id::text, 8)"
        f" WHEN left(ss.name, 1) IN ({_formula_starts()}) THEN '''' || ss.name ELSE ss.name END"
    )
    select = f"""
    , cl AS MATERIALIZED (
        SELECT id, slug, {_esc("slug")} AS slug_cell, {_esc("name")} AS name_cell, ROUND(hourly_rate, 2) AS rate,
               ROUND(llm_markup_percent, 2) AS markup_percent, {_esc("currency")} AS currency_cell
        FROM domain_portfolio
    ), us AS MATERIALIZED (
        SELECT id, {_esc("username")} AS username_cell FROM auth_user
    )
    SELECT cl.slug_cell, cl.name_cell, p.session_id::text, {name}, us.username_cell,
           {_iso("ss.started_at")}, {_iso("ss.ended_at")}, %(period_start)s, %(period_end)s,
           p.secs, p.minutes, ROUND(p.minutes / 60.0, 4), cl.rate, p.time_amount,
           p.messages, p.tokens, p.unpriced, p.llm_cost, cl.markup_percent, p.markup,
           p.time_amount + p.llm_cost + p.markup, cl.currency_cell, {_esc("i.number")}
    FROM priced p
    JOIN cl ON cl.id = p.domain_id
    JOIN ollama_streaming_sessions ss ON ss.session_id = p.session_id
    JOIN us ON us.id = ss.user_id
    LEFT JOIN invoices i ON i.id = ss.invoice_id
    ORDER BY ss.started_at, ss.session_id, cl.slug COLLATE "C"
    """  # noqa: S608
    query = _lines_sql(client_id=params["client"], user_id=params["user"]) + select
    # The zone is set for this transaction only and put back afterwards, so nothing else on
    # the connection (Django reads timestamps as UTC) ever sees it, even inside an outer
    # transaction or when the download is cut short.
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute("SELECT current_setting('TimeZone'), set_config('TimeZone', %s, true)", [period.tz.key])
        previous = cur.fetchone()[0]
        cur.execute(QUERY_SETTINGS)
        try:
            # Django's cursor wrapper has no copy(); its psycopg cursor does.
            raw = cur.cursor
            # COPY takes no parameters: bind them client-side, whichever binding the connection uses.
            sql = psycopg.ClientCursor(raw.connection).mogrify(query, params)
            with raw.copy(f"COPY ({sql}) TO STDOUT WITH (FORMAT csv)") as copy:
                # COPY hands over one row per message; pass them on in batches.
                batch: list[bytes] = []
                for chunk in copy:
                    batch.append(bytes(chunk))
                    if len(batch) >= ROWS_PER_CHUNK:
                        yield b"".join(batch).decode()
                        batch.clear()
                if batch:
                    yield b"".join(batch).decode()
        finally:
            # After a cut download the transaction is aborted and rolls back, which undoes it too.
            with contextlib.suppress(DatabaseError):
                cur.execute("SELECT set_config('TimeZone', %s, true)", [previous])


def rebuild_message_totals() -> int:
    """Recompute `session_message_totals` from the messages; returns the number of pairs.

    The trigger keeps the table exact on every write; this is for loads that bypass triggers
    (a bulk COPY with `session_replication_role = replica`) and for checking the trigger.
    Writers to the messages wait while it runs.
    """
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute("LOCK TABLE ollama_session_messages IN SHARE ROW EXCLUSIVE MODE")
        cur.execute("DELETE FROM session_message_totals")
        cur.execute(TOTALS_FROM_MESSAGES)
        return cur.rowcount


TOTALS_FROM_MESSAGES = """
INSERT INTO session_message_totals (id, session_id, domain_id, messages, tokens, cost, unpriced, first_at, last_at)
SELECT gen_random_uuid(), session_id, domain_id, COUNT(*), COALESCE(SUM(tokens), 0), COALESCE(SUM(cost_usd), 0),
       COUNT(*) FILTER (WHERE cost_usd IS NULL AND role <> 'user'), MIN("timestamp"), MAX("timestamp")
FROM ollama_session_messages WHERE copied_from_id IS NULL AND NOT is_imported
GROUP BY session_id, domain_id
"""
