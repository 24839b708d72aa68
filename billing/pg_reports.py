"""PostgreSQL fast paths for the two heavy reads: the all-clients report and the full CSV.

The rules are those of `billing/reports.py`, computed by the database in exact `numeric`
arithmetic: the sessions that ended in the period (and, if it holds now, those still
running); each session–client part's whole seconds cut at cumulative boundaries from the
session's start (window functions, as `allocate_seconds`), rounded up to the increment of the
terms in force at the session's end; billable hours to four decimals × rate, to the cent; LLM
cost per exchange rate in force at each call's time (`ROUND(usd × rate, 2)`), its markup on
that rounded cost. `ROUND(numeric, 2)` rounds half away from zero, which is ROUND_HALF_UP for
these non-negative amounts; totals are sums of rounded lines. A USD client's message figures
come from `session_message_totals` (one row per part, kept by a trigger); other currencies need
each call's time for its rate and are summed from the messages. The CSV is produced by
`COPY … TO STDOUT` and streamed row by row, so an export of any size runs at database speed in
constant memory.

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
from billing.models import ClientTerms as ClientTermsRow
from billing.reports import ClientTerms, GroupRow, Period, TermsBook, Totals

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
    """The priced parts as a CTE chain ending in `priced` (one row per session and client).

    `sess` holds the sessions the period bills, `seg` their parts' seconds, `charge_raw` their
    parts' calls per exchange rate in force, `terms` each part's terms, `priced` the lines.
    """
    sess_filter = tot_filter = arch_filter = part_filter = ""
    if user_id is not None:
        sess_filter += " AND s.user_id = %(user)s"
    if client_id is not None:
        sess_filter += (
            " AND (EXISTS (SELECT 1 FROM session_segments g WHERE g.session_id = s.session_id"
            " AND g.domain_id = %(client)s)"
            " OR EXISTS (SELECT 1 FROM ollama_session_messages m WHERE m.session_id = s.session_id"
            " AND m.domain_id = %(client)s AND m.copied_from_id IS NULL AND NOT m.is_imported)"
            " OR EXISTS (SELECT 1 FROM archived_message_costs a WHERE a.session_id = s.session_id"
            " AND a.domain_id = %(client)s))"
        )
        tot_filter = " AND t.domain_id = %(client)s"
        arch_filter = " AND a.domain_id = %(client)s"
        # Every segment counts for the cut of seconds; only the client's parts are billed.
        part_filter = " WHERE domain_id = %(client)s"
    # Only constant fragments are interpolated; every value is a bound parameter.
    return f"""
    WITH sess AS MATERIALIZED (
        SELECT s.session_id, s.user_id, s.name, s.started_at, s.ended_at, s.archived_at,
               COALESCE(s.ended_at, %(now)s) AS until
        FROM ollama_streaming_sessions s
        WHERE ((s.ended_at >= %(start)s AND s.ended_at < %(end)s) OR (%(open)s AND s.ended_at IS NULL)){sess_filter}
    ), seg_run AS (
        SELECT g.session_id, g.domain_id, g.started_at, g.id,
               GREATEST(0, MAX(FLOOR(EXTRACT(EPOCH FROM COALESCE(g.ended_at, x.until) - x.started_at))) OVER (
                   PARTITION BY g.session_id ORDER BY g.started_at, g.id ROWS UNBOUNDED PRECEDING)) AS running
        FROM session_segments g JOIN sess x ON x.session_id = g.session_id
    ), seg AS (
        SELECT session_id, domain_id, SUM(secs)::bigint AS secs
        FROM (SELECT session_id, domain_id,
                     running - COALESCE(LAG(running) OVER (
                         PARTITION BY session_id ORDER BY started_at, id), 0) AS secs
              FROM seg_run) cut
        GROUP BY session_id, domain_id
    ), tot AS (
        SELECT t.session_id, t.domain_id, c.currency, t.messages, t.tokens, t.cost, t.unpriced, t.first_at, t.last_at
        FROM session_message_totals t
        JOIN sess x ON x.session_id = t.session_id
        JOIN domain_portfolio c ON c.id = t.domain_id
        WHERE t.messages > 0{tot_filter}
    ), one_rate AS (
        -- A part whose calls all fall under one rate (a rate is in force at its first call and no
        -- other takes effect until its last: a session is short, rates change daily) is taken
        -- whole from the trigger-kept totals; USD needs no rate at all.
        SELECT t.session_id, t.domain_id,
               CASE WHEN t.currency = 'USD' THEN NULL ELSE (
                   SELECT e.effective_from FROM exchange_rates e
                   WHERE e.currency = t.currency AND e.effective_from <= t.first_at
                   ORDER BY e.effective_from DESC LIMIT 1) END AS rate_from,
               t.messages::bigint AS messages, NULL::bigint AS calls, t.tokens::bigint AS tokens, t.cost AS usd,
               t.unpriced::bigint AS unpriced
        FROM tot t
        WHERE t.currency = 'USD' OR (
            EXISTS (SELECT 1 FROM exchange_rates e WHERE e.currency = t.currency AND e.effective_from <= t.first_at)
            AND NOT EXISTS (SELECT 1 FROM exchange_rates e WHERE e.currency = t.currency
                            AND e.effective_from > t.first_at AND e.effective_from <= t.last_at))
    ), msg_rows AS (
        -- The other parts (across a rate change, or with no rate at all) call by call.
        SELECT m.session_id, m.domain_id, m.at, m.role, m.tokens, m.cost_usd
        FROM (SELECT session_id, domain_id FROM tot EXCEPT SELECT session_id, domain_id FROM one_rate) r
        CROSS JOIN LATERAL (
            SELECT m.session_id, m.domain_id, m."timestamp" AS at, m.role, m.tokens, m.cost_usd
            FROM ollama_session_messages m
            WHERE m.session_id = r.session_id AND m.domain_id = r.domain_id
              AND m.copied_from_id IS NULL AND NOT m.is_imported
            OFFSET 0  -- a few parts through the (session, seq) index, never a scan of every message
        ) m
        UNION ALL
        SELECT a.session_id, a.domain_id, a."timestamp", a.role, a.tokens, a.cost_usd
        FROM archived_message_costs a
        JOIN sess x ON x.session_id = a.session_id AND x.archived_at IS NOT NULL
        WHERE TRUE{arch_filter}
    ), other_calls AS (
        SELECT r.session_id, r.domain_id, c.currency, r.at, r.role, r.tokens, r.cost_usd
        FROM msg_rows r JOIN domain_portfolio c ON c.id = r.domain_id
    ), tagged AS (
        -- Each call's rate in force is the newest rate at or before it: sort the calls and the
        -- rates of their currencies together and carry the last rate forward, instead of one
        -- index lookup per call. A rate sorts before a call at the same instant (it is in force).
        SELECT session_id, domain_id, currency, at, role, tokens, cost_usd, NULL::timestamptz AS rate_at, 1 AS kind
        FROM other_calls
        UNION ALL
        SELECT NULL, NULL, e.currency, e.effective_from, NULL, NULL, NULL, e.effective_from, 0
        FROM exchange_rates e WHERE e.currency IN (SELECT DISTINCT currency FROM other_calls)
    ), carried AS (
        SELECT tagged.*,
               CASE WHEN currency = 'USD' THEN NULL ELSE MAX(rate_at) OVER (
                   PARTITION BY currency ORDER BY at, kind ROWS UNBOUNDED PRECEDING) END AS rate_from
        FROM tagged
    ), other_parts AS (
        SELECT session_id, domain_id, rate_from, COUNT(*) AS messages,
               COUNT(*) FILTER (WHERE role <> 'user') AS calls, COALESCE(SUM(tokens), 0)::bigint AS tokens,
               COALESCE(SUM(cost_usd), 0) AS usd,
               COUNT(*) FILTER (WHERE cost_usd IS NULL AND role <> 'user') AS unpriced
        FROM carried WHERE kind = 1
        GROUP BY session_id, domain_id, rate_from
    ), charge_raw AS (
        SELECT * FROM one_rate UNION ALL SELECT * FROM other_parts
    ), parts AS (
        SELECT session_id, domain_id FROM (
            SELECT session_id, domain_id FROM seg
            UNION
            SELECT session_id, domain_id FROM charge_raw
        ) found{part_filter}
    ), terms AS (
        SELECT p.session_id, p.domain_id, c.currency, tr.effective_from AS terms_from,
               COALESCE(tr.hourly_rate, c.hourly_rate) AS hourly_rate,
               COALESCE(tr.llm_markup_percent, c.llm_markup_percent) AS pct,
               COALESCE(tr.billing_increment_minutes, c.billing_increment_minutes) AS inc
        FROM parts p
        JOIN sess x ON x.session_id = p.session_id
        JOIN domain_portfolio c ON c.id = p.domain_id
        LEFT JOIN LATERAL (
            -- The row in force at the session's end; before a client's first row, that row.
            SELECT t.effective_from, t.hourly_rate, t.llm_markup_percent, t.billing_increment_minutes
            FROM client_terms t WHERE t.client_id = p.domain_id
            ORDER BY (t.effective_from <= x.until) DESC,
                     CASE WHEN t.effective_from <= x.until THEN t.effective_from END DESC NULLS LAST,
                     t.effective_from
            LIMIT 1
        ) tr ON TRUE
    ), charge AS (
        SELECT ch.session_id, ch.domain_id, ch.rate_from, ch.messages, ch.tokens, ch.usd, ch.unpriced,
               rate.usd_rate AS rate,
               CASE WHEN rate.usd_rate IS NULL THEN 0 ELSE ROUND(ch.usd * rate.usd_rate, 2) END AS cost,
               CASE WHEN rate.usd_rate IS NULL THEN 0
                    ELSE ROUND(ROUND(ch.usd * rate.usd_rate, 2) * tm.pct / 100, 2) END AS markup,
               CASE WHEN rate.usd_rate IS NULL AND ch.usd > 0 THEN ch.calls - ch.unpriced ELSE 0 END AS unconverted
        FROM (
            -- One charge per part and rate, whichever source its calls came from.
            SELECT session_id, domain_id, rate_from, SUM(messages) AS messages, SUM(calls) AS calls,
                   SUM(tokens) AS tokens, SUM(usd) AS usd, SUM(unpriced) AS unpriced
            FROM charge_raw GROUP BY session_id, domain_id, rate_from
        ) ch
        JOIN terms tm ON tm.session_id = ch.session_id AND tm.domain_id = ch.domain_id
        CROSS JOIN LATERAL (
            SELECT CASE WHEN tm.currency = 'USD' THEN 1::numeric(14, 6)
                        ELSE (SELECT e.usd_rate FROM exchange_rates e
                              WHERE e.currency = tm.currency AND e.effective_from = ch.rate_from) END AS usd_rate
        ) rate
    ), llm AS (
        SELECT session_id, domain_id, SUM(messages)::bigint AS messages, SUM(tokens)::bigint AS tokens,
               SUM(usd) AS usd, SUM(unpriced)::bigint AS unpriced, SUM(unconverted)::bigint AS unconverted,
               SUM(cost) AS cost, SUM(markup) AS markup,
               string_agg(rate::numeric(14, 6)::text, ';' ORDER BY rate_from NULLS LAST)
                   FILTER (WHERE usd > 0 AND rate IS NOT NULL) AS rates
        FROM charge GROUP BY session_id, domain_id
    ), lines AS (
        SELECT tm.session_id, tm.domain_id, tm.currency, tm.terms_from, tm.hourly_rate, tm.pct, tm.inc,
               GREATEST(COALESCE(seg.secs, 0), 0) AS secs,
               COALESCE(llm.messages, 0) AS messages, COALESCE(llm.tokens, 0) AS tokens,
               COALESCE(llm.usd, 0)::numeric(18, 6) AS usd, COALESCE(llm.unpriced, 0) AS unpriced,
               COALESCE(llm.unconverted, 0) AS unconverted, COALESCE(llm.cost, 0)::numeric(14, 2) AS llm_cost,
               COALESCE(llm.markup, 0)::numeric(14, 2) AS markup, llm.rates
        FROM terms tm
        LEFT JOIN seg ON seg.session_id = tm.session_id AND seg.domain_id = tm.domain_id
        LEFT JOIN llm ON llm.session_id = tm.session_id AND llm.domain_id = tm.domain_id
    ), priced AS (
        SELECT lines.*, m.minutes, ROUND(m.minutes / 60.0, 4) AS hours,
               ROUND(ROUND(m.minutes / 60.0, 4) * lines.hourly_rate, 2) AS time_amount
        FROM lines
        CROSS JOIN LATERAL (
            SELECT CASE WHEN lines.secs > 0
                        THEN ((lines.secs + lines.inc * 60 - 1) / (lines.inc * 60)) * lines.inc
                        ELSE 0 END AS minutes
        ) m
        WHERE lines.secs > 0 OR lines.messages > 0
    )
    """  # noqa: S608  (constant fragments only; every value is a bound parameter)


def _params(period: Period, now: dt.datetime, client=None, user=None) -> dict:
    return {
        "start": period.start,
        "end": period.end,
        "now": now,
        "open": period.holds(now),
        "tz": period.tz.key,
        "client": getattr(client, "pk", None),
        "user": getattr(user, "pk", None),
    }


def client_rows(*, period: Period, now: dt.datetime) -> list[GroupRow]:
    """The staff report's rows (one per client, each in its client's currency), summed by the database."""
    totals_sql = """
    SELECT p.domain_id, COUNT(*), SUM(p.secs), SUM(p.minutes), SUM(p.messages), SUM(p.tokens), SUM(p.usd),
           SUM(p.unpriced), SUM(p.unconverted), SUM(p.time_amount), SUM(p.llm_cost), SUM(p.markup),
           COUNT(*) FILTER (WHERE x.ended_at IS NULL), MAX(p.terms_from)
    FROM priced p JOIN sess x ON x.session_id = p.session_id
    GROUP BY p.domain_id
    """
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(QUERY_SETTINGS)
        cur.execute(_lines_sql() + totals_sql, _params(period, now))
        found = cur.fetchall()
    clients = ClientDomain.objects.in_bulk([r[0] for r in found])
    book = TermsBook(clients, ClientTermsRow.objects.filter(client_id__in=list(clients))) if clients else None
    rows = []
    for (cid, sessions, secs, minutes, messages, tokens, usd, unpriced, unconverted, time_amount, llm, markup,
         open_, terms_from) in found:  # fmt: skip
        client = clients[cid]
        totals = Totals(
            currency=client.currency,
            sessions=sessions,
            seconds=int(secs),
            billable_minutes=int(minutes),
            messages=int(messages),
            tokens=int(tokens),
            llm_cost_raw=Decimal(usd),
            unpriced=int(unpriced),
            unconverted=int(unconverted),
            open_sessions=open_,
            time_amount=Decimal(time_amount),
            llm_cost=Decimal(llm),
            markup=Decimal(markup),
        )
        totals.total = totals.time_amount + totals.llm_cost + totals.markup
        terms = book.at(cid, terms_from) if terms_from is not None else ClientTerms.of(client)
        rows.append(GroupRow(key=cid, label=client.name, terms=terms, totals=totals))
    rows.sort(key=lambda r: (r.label.lower(), r.terms.slug))
    return rows


def csv_lines(*, period: Period, now: dt.datetime, client=None, user=None) -> Iterator[str]:
    """The report CSV's data rows (no header), straight from `COPY … TO STDOUT`, in batches of rows."""
    params = _params(period, now, client, user)
    params["period_start"] = iso(period.start, period.tz)
    params["period_end"] = iso(period.end, period.tz)
    # A session's name is escaped per row (its fallback never needs it); a client's cells and a
    # consultant's once each.
    name = (
        "CASE WHEN x.name = '' THEN 'Session ' || left(x.session_id::text, 8)"
        f" WHEN left(x.name, 1) IN ({_formula_starts()}) THEN '''' || x.name ELSE x.name END"
    )
    select = f"""
    , cl AS MATERIALIZED (
        SELECT id, slug, {_esc("slug")} AS slug_cell, {_esc("name")} AS name_cell, {_esc("currency")} AS currency_cell
        FROM domain_portfolio
    ), us AS MATERIALIZED (
        SELECT id, {_esc("username")} AS username_cell FROM auth_user
    ), billed AS (
        SELECT DISTINCT ON (l.session_id, l.client_id) l.session_id, l.client_id, i.number
        FROM invoice_lines l JOIN invoices i ON i.id = l.invoice_id
        WHERE i.status = 'issued' AND i.kind = 'invoice' AND l.kind IN ('time', 'llm', 'markup')
          AND l.session_id IN (SELECT session_id FROM sess)
        ORDER BY l.session_id, l.client_id, i.number
    )
    SELECT cl.slug_cell, cl.name_cell, p.session_id::text, {name}, us.username_cell,
           {_iso("x.started_at")}, {_iso("x.ended_at")}, %(period_start)s, %(period_end)s,
           p.secs, p.minutes, p.hours, ROUND(p.hourly_rate, 2), p.time_amount,
           p.messages, p.tokens, p.unpriced, p.usd, p.rates, p.unconverted, p.llm_cost,
           ROUND(p.pct, 2), p.markup, p.time_amount + p.llm_cost + p.markup, cl.currency_cell, {_esc("b.number")}
    FROM priced p
    JOIN cl ON cl.id = p.domain_id
    JOIN sess x ON x.session_id = p.session_id
    JOIN us ON us.id = x.user_id
    LEFT JOIN billed b ON b.session_id = p.session_id AND b.client_id = p.domain_id
    ORDER BY x.started_at, x.session_id, cl.slug COLLATE "C"
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
