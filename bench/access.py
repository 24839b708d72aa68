"""Benchmark the access rule on the turn's hot path: owner-only versus owner-or-invited.

Shared sessions widened `ChatSession.objects.for_user` from `user = me` to `user = me OR a live
invitation for me exists`. Building that subquery costs the ORM about as much again as the rest
of the query, and every chat turn's claim and every session read ran `for_user`, so both now try
the owner's own cheap query first (`owned_by`) and use the full rule only when that finds
nothing. This times, interleaved in rounds on the same data, the read and the claim before
shared sessions, as shipped, and (for the read) the plain one-query alternative, for an owner;
and as shipped for a guest. It reports latency (p50/p95) and CPU per call: this process's, and
on PostgreSQL the server backend's.

    .venv/bin/python bench/access.py                       # a throwaway SQLite file
    createdb -h 127.0.0.1 -U postgres bench_access          # once
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/bench_access .venv/bin/python bench/access.py

Options: --sessions (20000), --users (100), --invited (share of sessions shared, 0.2),
--rounds (20), --calls (100 per round per variant). Prints the figures and writes
bench/results/access[-sqlite].json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["DEBUG"] = "0"  # DEBUG keeps every query in memory
os.environ.setdefault("SECRET_KEY", "bench-only-not-secret")
os.environ.setdefault("SESSION_SIGNING_KEY", "YmVuY2gtc2lnbmluZy1rZXktMzItYnl0ZXMtbG9uZyE=")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
if not os.environ.get("DATABASE_URL"):
    os.environ["DATABASE_URL"] = f"sqlite:///{tempfile.mkdtemp()}/bench_access.sqlite3"

import django  # noqa: E402

django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection, transaction  # noqa: E402
from django.db.models import F  # noqa: E402
from django.utils import timezone  # noqa: E402

from billing.models import ClientDomain  # noqa: E402
from sessions_app import selectors  # noqa: E402
from sessions_app.models import ChatSession, SessionInvitation  # noqa: E402
from sessions_app.services import claims  # noqa: E402


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def backend_pid() -> int | None:
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return cur.fetchone()[0]


def load(args, rng: random.Random) -> list[tuple]:
    """Fresh tables: users, a client, sessions (a share of them shared); returns (session, user) pairs to time."""
    call_command("migrate", verbosity=0, interactive=False)
    with transaction.atomic():
        SessionInvitation.objects.all().delete()
        ChatSession.objects.all().delete()
        User = get_user_model()
        User.objects.filter(username__startswith="bench-").delete()
        users = User.objects.bulk_create([User(username=f"bench-{i}") for i in range(args.users)])
        client, _ = ClientDomain.objects.get_or_create(slug="bench", defaults={"name": "Bench"})
        now = timezone.now()
        sessions = ChatSession.objects.bulk_create(
            [
                ChatSession(
                    user=rng.choice(users),
                    domain=client,
                    primary_model="ollama:x",
                    current_model="ollama:x",
                    started_at=now,
                    last_activity_at=now,
                )
                for _ in range(args.sessions)
            ],
            batch_size=2000,
        )
        shared = rng.sample(sessions, int(len(sessions) * args.invited))
        invitations = []
        for session in shared:
            guest = rng.choice([u for u in users[:10] if u.pk != session.user_id])
            invitations.append(SessionInvitation(session=session, user=guest, created_at=now))
        SessionInvitation.objects.bulk_create(invitations, batch_size=2000)
    # Time what a turn does: the owner's own sessions (the common case) and a guest's.
    owned = [(s.pk, s.user) for s in rng.sample(sessions, 200)]
    guests = [(inv.session_id, inv.user) for inv in rng.sample(invitations, min(200, len(invitations)))]
    return owned + guests


def read_before(pk, user) -> None:
    """`session_get_for_user` before shared sessions: the owner's sessions only."""
    ChatSession.objects.filter(user=user).select_related("domain", "brand").get(pk=pk)


def read_now(pk, user) -> None:
    selectors.session_get_for_user(session_id=pk, user=user)


def read_one_query(pk, user) -> None:
    """The straightforward alternative: one query through the full rule (what the fast path avoids)."""
    ChatSession.objects.for_user(user).select_related("domain", "brand").get(pk=pk)


def _release(pk) -> None:
    # Give the session back as a failed-before-streaming turn would, and undo the message count.
    ChatSession.objects.filter(pk=pk).update(turn_started_at=None, total_messages=F("total_messages") - 1)


def claim_before(pk, user) -> None:
    """`_quick_claim` before shared sessions, verbatim but for the owner-only filter."""
    now = timezone.now()
    with transaction.atomic():
        ChatSession.objects.filter(user=user).filter(
            claims._no_live_turn(now), pk=pk, status="active", invoice__isnull=True
        ).update(**claims._claim_fields(now))
    _release(pk)


def claim_now(pk, user) -> None:
    """The turn's claim as shipped (`_claim_turn`): the owner's one UPDATE, a guest's general path."""
    now = timezone.now()
    with transaction.atomic():
        claims._claim_turn(pk, user, now)
    _release(pk)


def timed(call, pairs, rounds_of: int) -> list[float]:
    values = []
    for pk, user in pairs[:rounds_of]:
        start = time.perf_counter()
        call(pk, user)
        values.append((time.perf_counter() - start) * 1000)
    return values


def run(args) -> dict:
    rng = random.Random(15)
    pairs = load(args, rng)
    owned, guests = pairs[:200], pairs[200:]
    server = backend_pid()
    me = os.getpid()
    plans = {
        "session_read": {"before": read_before, "now": read_now, "one_query_full_rule": read_one_query},
        "turn_claim": {"before": claim_before, "now": claim_now},
    }
    results: dict = {}
    for statement, variants in plans.items():
        samples = {name: [] for name in variants}
        cpu = {name: [0.0, 0.0, 0] for name in variants}
        for _ in range(args.rounds):
            for name, call in variants.items():  # interleaved: the machine's swings hit all alike
                batch = [rng.choice(owned) for _ in range(args.calls)]
                mine0, server0 = proc_cpu(me), proc_cpu(server) if server else 0.0
                samples[name] += timed(call, batch, len(batch))
                cpu[name][0] += proc_cpu(me) - mine0
                cpu[name][1] += (proc_cpu(server) - server0) if server else 0.0
                cpu[name][2] += len(batch)
        results[statement] = {
            name: {
                "calls": len(values),
                "p50_ms": round(statistics.median(values), 3),
                "p95_ms": round(statistics.quantiles(values, n=20)[18], 3),
                "client_cpu_us_per_call": round(cpu[name][0] / cpu[name][2] * 1e6, 1),
                "server_cpu_us_per_call": round(cpu[name][1] / cpu[name][2] * 1e6, 1) if server else None,
            }
            for name, values in samples.items()
        }
        base = results[statement]["before"]["p50_ms"]
        for name in variants:
            results[statement][name]["p50_ratio_to_before"] = round(results[statement][name]["p50_ms"] / base, 3)
        # A guest's call (only possible now): the general path, for the record.
        guest_values = timed(variants["now"], guests * 2, len(guests) * 2)
        results[statement]["guest_now_p50_ms"] = round(statistics.median(guest_values), 3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--invited", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()
    figures = run(args)
    report = {
        "database": connection.vendor,
        "machine": {"cpus": os.cpu_count(), "load_average_1_5_15": Path("/proc/loadavg").read_text().split()[:3]},
        "generated_at": timezone.now().isoformat(),
        "loaded": {"sessions": args.sessions, "users": args.users, "shared_share": args.invited},
        **figures,
    }
    name = "access.json" if connection.vendor == "postgresql" else "access-sqlite.json"
    out = ROOT / "bench" / "results" / name
    out.write_text(json.dumps(report, indent=2) + "\n")
    for statement in ("session_read", "turn_claim"):
        row = figures[statement]
        for variant, f in row.items():
            if not isinstance(f, dict):
                continue
            print(
                f"{statement:<12} {variant:<20} p50 {f['p50_ms']:.3f} ms ({f['p50_ratio_to_before']:.2f}x)  "
                f"p95 {f['p95_ms']:.3f} ms  CPU {f['client_cpu_us_per_call']} µs here"
                + (f", {f['server_cpu_us_per_call']} µs server" if f["server_cpu_us_per_call"] is not None else "")
            )
        print(f"{statement:<12} a guest's call now: p50 {row['guest_now_p50_ms']:.3f} ms")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
