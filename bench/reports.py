"""Benchmark the billing reports on PostgreSQL: bulk-load a year of work, time the reports and CSV.

    createdb -h 127.0.0.1 -U postgres bench_reports   # once
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/bench_reports \\
        .venv/bin/python bench/reports.py [--messages 1000000] [--sessions 100000] [--clients 100]

Loads (with COPY) `--clients` clients (`--eur-share` of them billed in EUR, with a rate per
day), `--consultants` users, `--sessions` sessions spread over
the last `--days` days (10 % of them switch client half-way, so they have two segments) and
`--messages` messages (half user, half assistant; assistant costs from three price levels,
1 % of assistant calls with an unknown price). Then times, with the real selectors and view:

- the per-client 30-day report (`/reports/clients/<slug>/`, one client's drill-down), and the
  all-clients 30-day report (`/reports/`): p50/p95 over `--runs` runs after a warm-up;
- the full CSV export over the whole loaded span (`/reports/?format=csv`, streamed):
  rows per second and peak RSS growth while streaming (read from /proc/self/status).

Prints the figures and writes bench/results/reports.json. `--reuse` skips the load when the
database already holds the requested numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Benchmarks run with DEBUG off (DEBUG keeps every query in memory) and throwaway secrets.
os.environ["DEBUG"] = "0"
os.environ.setdefault("SECRET_KEY", "bench-only-not-secret")
os.environ.setdefault("SESSION_SIGNING_KEY", "YmVuY2gtc2lnbmluZy1rZXktMzItYnl0ZXMtbG9uZyE=")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("ALLOWED_HOSTS", "testserver,localhost")

import django  # noqa: E402

django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.test import RequestFactory  # noqa: E402
from django.utils import timezone  # noqa: E402

from billing import pg_reports, views  # noqa: E402
from billing.models import ClientDomain, ExchangeRate  # noqa: E402
from billing.reports import PERIOD_CUSTOM, Period, parse_tz  # noqa: E402
from billing.selectors import client_drilldown, report_for_period  # noqa: E402
from sessions_app.models import ChatSession, SessionMessage  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "reports.json"
MODELS = [
    ("ollama", "ollama:llama3.2", Decimal("0"), Decimal("0")),
    ("openai", "openai:gpt-4o", Decimal("2.50"), Decimal("10.00")),
    ("anthropic", "anthropic:claude-sonnet-4", Decimal("3.00"), Decimal("15.00")),
]
MTOK = Decimal(1_000_000)


def rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _backend_pid() -> int:
    with connection.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return cur.fetchone()[0]


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a local process has used; 0 if it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ts(value: dt.datetime) -> str:
    return value.isoformat()


def load(args, rng: random.Random) -> dict:
    """Empty the tables and COPY fresh data in; returns what was loaded."""
    if connection.vendor != "postgresql":
        raise SystemExit("bench/reports.py needs PostgreSQL: set DATABASE_URL=postgres://…/bench_reports")
    call_command("migrate", verbosity=0, interactive=False)
    t0 = time.perf_counter()
    with connection.cursor() as cur:
        cur.execute(
            "TRUNCATE invoice_lines, invoices, user_llm_usage, ollama_context_streams, session_segments, "
            "session_message_totals, exchange_rates, invoice_sequences, "
            "ollama_session_messages, ollama_streaming_sessions, user_brands, domain_portfolio CASCADE"
        )
    User = get_user_model()
    User.objects.filter(username__startswith="bench-").delete()
    users = User.objects.bulk_create(
        [User(username=f"bench-{i:03d}", email=f"bench-{i}@example.com") for i in range(args.consultants)]
    )
    staff = User.objects.filter(username="bench-staff").first() or User.objects.create(
        username="bench-staff", is_staff=True, is_superuser=True
    )
    clients = ClientDomain.objects.bulk_create(
        [
            ClientDomain(
                name=f"Client {i:03d}",
                slug=f"client-{i:03d}",
                hourly_rate=Decimal(100 + (i % 7) * 25),
                llm_markup_percent=Decimal(i % 4 * 5),
                billing_increment_minutes=(6, 10, 15)[i % 3],
                # A share of clients bill in EUR: their calls are converted at daily rates.
                currency="EUR" if i < round(args.clients * args.eur_share) else "USD",
            )
            for i in range(args.clients)
        ]
    )
    start_day = (timezone.now() - dt.timedelta(days=args.days + 2)).replace(hour=0, minute=0, second=0, microsecond=0)
    if args.eur_share > 0:
        ExchangeRate.objects.bulk_create(
            ExchangeRate(
                currency="EUR",
                usd_rate=Decimal("0.9") + Decimal(rng.randrange(0, 5000)) / Decimal(100000),
                effective_from=start_day + dt.timedelta(days=d),
                source="bench",
            )
            for d in range(args.days + 4)
        )
    now = timezone.now().replace(microsecond=0)
    span = dt.timedelta(days=args.days)
    per_session = max(args.messages // args.sessions, 1)
    extra = args.messages - per_session * args.sessions  # spread the remainder over the first sessions

    raw = connection.connection
    session_cols = (
        "session_id, user_id, domain_id, name, system_prompt, started_at, ended_at, duration_seconds, status, "
        "end_reason, primary_model, current_model, last_activity_at, total_messages, total_tokens, "
        "estimated_cost_usd, source"
    )
    message_cols = (
        "message_id, session_id, seq, role, content, timestamp, model, provider, domain_id, prompt_tokens, "
        "completion_tokens, tokens, token_source, cost_usd, status, error_text, shared_to_domains, "
        "shared_to_models, hash, is_imported, context_omitted"
    )
    segment_cols = "id, session_id, domain_id, model, started_at, ended_at"
    n_messages = n_segments = 0
    bulk_tables = ("ollama_streaming_sessions", "session_segments", "ollama_session_messages")
    with connection.cursor() as cur:
        # Bulk-load the usual way: secondary indexes dropped and rebuilt after, FK triggers off
        # during COPY (the generator only writes rows whose references exist).
        cur.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = ANY(%s) AND indexname NOT IN "
            "(SELECT conname FROM pg_constraint)",
            [list(bulk_tables)],
        )
        indexes = cur.fetchall()
        for name, _ in indexes:
            cur.execute(f'DROP INDEX IF EXISTS "{name}"')
        cur.execute("SET session_replication_role = replica")
    with raw.cursor() as cur:
        # One COPY at a time per connection: sessions, then segments, then messages.
        plan = []
        with cur.copy(f"COPY ollama_streaming_sessions ({session_cols}) FROM STDIN") as s_copy:
            for i in range(args.sessions):
                client = clients[rng.randrange(len(clients))]
                user = users[rng.randrange(len(users))]
                provider, model, pin, pout = MODELS[rng.randrange(len(MODELS))]
                started = now - span + dt.timedelta(seconds=rng.randrange(int(span.total_seconds()) - 4 * 3600))
                seconds = rng.randrange(60, 90 * 60)
                ended = started + dt.timedelta(seconds=seconds)
                count = per_session + (1 if i < extra else 0)
                switch = clients[rng.randrange(len(clients))] if rng.random() < 0.10 else None
                sid = uuid.uuid4()
                plan.append((sid, client, switch, user, provider, model, pin, pout, started, seconds, count))
                s_copy.write_row(
                    (
                        sid, user.pk, (switch or client).pk, f"Bench session {i}", "", ts(started), ts(ended),
                        seconds, "ended", "user", model, model, ts(ended), count, 0, "0", "web",
                    )
                )  # fmt: skip
        with cur.copy(f"COPY session_segments ({segment_cols}) FROM STDIN") as g_copy:
            for sid, client, switch, _user, _provider, model, _pin, _pout, started, seconds, _count in plan:
                ended = started + dt.timedelta(seconds=seconds)
                if switch is None:
                    g_copy.write_row((uuid.uuid4(), sid, client.pk, model, ts(started), ts(ended)))
                    n_segments += 1
                else:
                    half = started + dt.timedelta(seconds=seconds // 2)
                    g_copy.write_row((uuid.uuid4(), sid, client.pk, model, ts(started), ts(half)))
                    g_copy.write_row((uuid.uuid4(), sid, switch.pk, model, ts(half), ts(ended)))
                    n_segments += 2
        with cur.copy(f"COPY ollama_session_messages ({message_cols}) FROM STDIN") as m_copy:
            for sid, client, switch, _user, provider, model, pin, pout, started, seconds, count in plan:
                step = seconds / max(count, 1)
                for seq in range(1, count + 1):
                    at = started + dt.timedelta(seconds=int(step * (seq - 1)))
                    domain = switch if (switch is not None and seq > count // 2) else client
                    if seq % 2:
                        row = (
                            uuid.uuid4(), sid, seq, "user", "Please review clause 4.2.", ts(at), model, provider,
                            domain.pk, 0, 0, 12, "estimated", "0", "complete", "", "[]", "[]", "", False, 0,
                        )  # fmt: skip
                    else:
                        prompt, completion = rng.randrange(200, 4000), rng.randrange(50, 1200)
                        cost = (prompt * pin + completion * pout) / MTOK
                        unknown = provider != "ollama" and rng.random() < 0.01
                        row = (
                            uuid.uuid4(), sid, seq, "assistant", "Clause 4.2 limits liability to fees paid.", ts(at),
                            model, provider, domain.pk, prompt, completion, prompt + completion, "provider",
                            None if unknown else f"{cost:.6f}", "complete", "", "[]", "[]", "", False, 0,
                        )  # fmt: skip
                    m_copy.write_row(row)
                    n_messages += 1
    t_copy = time.perf_counter() - t0
    with connection.cursor() as cur:
        cur.execute("SET session_replication_role = DEFAULT")
        for _, definition in indexes:
            cur.execute(definition)
    # COPY with triggers off skipped the per-message totals the reports read: sum them once.
    pg_reports.rebuild_message_totals()
    with connection.cursor() as cur:
        # What autovacuum does to a loaded table (visibility map for index-only scans, statistics).
        cur.execute(
            "VACUUM (ANALYZE) ollama_streaming_sessions, ollama_session_messages, session_segments, "
            "session_message_totals, domain_portfolio"
        )
    return {
        "clients": len(clients),
        "consultants": len(users),
        "sessions": args.sessions,
        "segments": n_segments,
        "messages": n_messages,
        "days": args.days,
        "load_seconds": round(time.perf_counter() - t0, 1),
        "copy_seconds": round(t_copy, 1),
        "staff": staff.pk,
    }


def percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    k = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def timed(fn, runs: int) -> dict:
    """Wall-clock p50/p95 over `runs`, and the CPU the work took (this process + its backend).

    On a busy machine the wall clock includes waiting for a core; the CPU figure is what
    the same work costs on an idle one (parallel query workers not included).
    """
    fn()  # warm-up: plans cached, pages in memory
    backend = _backend_pid()
    samples, cpu = [], []
    for _ in range(runs):
        c0, s0 = time.process_time(), _proc_cpu(backend)
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0 + _proc_cpu(backend) - s0) * 1000)
    return {
        "runs": runs,
        "p50_ms": round(statistics.median(samples), 1),
        "p95_ms": round(percentile(samples, 95), 1),
        "max_ms": round(max(samples), 1),
        "cpu_p50_ms": round(statistics.median(cpu), 1),
        "cpu_p95_ms": round(percentile(cpu, 95), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--sessions", type=int, default=None, help="default: messages / 10")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--consultants", type=int, default=50)
    parser.add_argument("--days", type=int, default=365, help="the span the sessions are spread over")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--reuse", action="store_true", help="skip the load if the data is already there")
    parser.add_argument(
        "--eur-share", type=float, default=0.2, help="share of clients billed in EUR, converted at daily rates"
    )
    args = parser.parse_args()
    args.sessions = args.sessions or max(args.messages // 10, 1)
    rng = random.Random(args.seed)

    have = SessionMessage.objects.count() if args.reuse else -1
    if args.reuse and have == args.messages and ChatSession.objects.count() == args.sessions:
        loaded = {"messages": have, "sessions": args.sessions, "reused": True}
    else:
        print(
            f"loading {args.messages:,} messages in {args.sessions:,} sessions for {args.clients} clients …", flush=True
        )
        loaded = load(args, rng)
        print(f"loaded in {loaded['load_seconds']} s", flush=True)

    User = get_user_model()
    staff = User.objects.get(username="bench-staff")
    tz = parse_tz("UTC", "UTC")
    today = timezone.now().astimezone(tz).date()
    last30 = Period(kind=PERIOD_CUSTOM, first_day=today - dt.timedelta(days=29), last_day=today, tz=tz)
    whole = Period(
        kind=PERIOD_CUSTOM, first_day=today - dt.timedelta(days=min(args.days + 1, 399)), last_day=today, tz=tz
    )
    client = ClientDomain.objects.order_by("slug").first()

    factory = RequestFactory()
    query30 = f"period=custom&start={last30.first_day}&end={last30.last_day}&tz=UTC"

    def page(view, path, *args):
        request = factory.get(f"{path}?{query30}")
        request.user = staff
        response = view(request, *args)
        assert response.status_code == 200, response.status_code
        return response

    # What a user waits for: the whole page (queries, math, charts, template).
    per_client = timed(lambda: page(views.client_report, f"/reports/clients/{client.slug}/", client.slug), args.runs)
    per_client_selector = timed(lambda: client_drilldown(period=last30, client=client, user=staff), args.runs)
    all_clients = timed(lambda: page(views.report, "/reports/"), args.runs)
    all_clients_python = timed(lambda: report_for_period(period=last30, user=staff), max(args.runs // 6, 3))
    sample = report_for_period(period=last30, user=staff)
    one = client_drilldown(period=last30, client=client, user=staff)

    # The full CSV export, through the real view, streamed and consumed as a client would.
    query = f"period=custom&start={whole.first_day}&end={whole.last_day}&tz=UTC&format=csv"
    request = factory.get(f"/reports/?{query}")
    request.user = staff
    base_rss = rss_kb()
    peak_rss = base_rss
    backend = _backend_pid()
    server_cpu0, client_cpu0 = _proc_cpu(backend), time.process_time()
    t0 = time.perf_counter()
    response = views.report(request)
    lines = 0
    size = 0
    for n, chunk in enumerate(response.streaming_content):
        lines += chunk.count(b"\n")
        size += len(chunk)
        if n % 50 == 0:
            peak_rss = max(peak_rss, rss_kb())
    elapsed = time.perf_counter() - t0
    client_cpu = time.process_time() - client_cpu0
    server_cpu = _proc_cpu(backend) - server_cpu0
    peak_rss = max(peak_rss, rss_kb())
    rows = lines - 1  # the header; the generated names hold no line breaks
    csv_figures = {
        "rows": rows,
        "bytes": size,
        "seconds": round(elapsed, 2),
        "rows_per_second": round(rows / elapsed),
        "client_cpu_seconds": round(client_cpu, 2),
        "server_cpu_seconds": round(server_cpu, 2),
        "rows_per_cpu_second": round(rows / max(client_cpu + server_cpu, 1e-9)),
        "rss_growth_mb": round((peak_rss - base_rss) / 1024, 1),
        "period": f"{whole.first_day}..{whole.last_day}",
    }

    load_average = Path("/proc/loadavg").read_text().split()[:3]
    result = {
        "database": connection.vendor,
        "machine": {"cpus": os.cpu_count(), "load_average_1_5_15": load_average},
        "generated_at": timezone.now().isoformat(),
        "loaded": loaded,
        "per_client_30_day_report": {
            "what": "GET /reports/clients/<slug>/ (HTML page, 30 days)",
            **per_client,
            "selector_only": per_client_selector,
            "client": client.slug,
            "sessions": one.report.total.sessions,
            "messages": one.report.total.messages,
        },
        "all_clients_30_day_report": {
            "what": "GET /reports/ (HTML page, 30 days, rows summed by PostgreSQL)",
            **all_clients,
            "python_reference_path": all_clients_python,
            "rows": len(sample.rows),
            "sessions": sum(t.sessions for t in sample.totals),  # one total per currency
            "messages": sum(t.messages for t in sample.totals),
        },
        "csv_export": csv_figures,
        "targets": {"report_p95_ms": 100, "csv_rows_per_second": 50_000, "csv_memory_growth_mb": 100},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
