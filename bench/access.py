"""Benchmark the access rule on the turn's hot path: owner-only versus owner-or-invited.

Shared sessions widened `ChatSession.objects.for_user` from `user = me` to `user = me OR a live
invitation for me exists`. Every chat turn's claim (`services.claims._quick_claim`: one UPDATE
filtered through `for_user`) and every session read (`session_get_for_user`) run it, so this
times both shapes of both statements, interleaved in rounds on the same data, and reports
latency (p50/p95) and CPU per call: this process's, and on PostgreSQL the server backend's.

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
from django.utils import timezone  # noqa: E402

from billing.models import ClientDomain  # noqa: E402
from sessions_app.models import ChatSession, SessionInvitation  # noqa: E402


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


def old_rule(user):
    return ChatSession.objects.filter(user=user)


def new_rule(user):
    return ChatSession.objects.for_user(user)


def claim(rule, pk, user) -> None:
    """The shape of `_quick_claim`: one conditional UPDATE through the access rule."""
    rule(user).filter(pk=pk, status="active", invoice__isnull=True, turn_started_at__isnull=True).update(
        last_activity_at=timezone.now()
    )


def read(rule, pk, user) -> None:
    """The shape of `session_get_for_user`."""
    rule(user).select_related("domain", "brand").filter(pk=pk).first()


def run(args) -> dict:
    rng = random.Random(15)
    pairs = load(args, rng)
    owned, guests = pairs[:200], pairs[200:]
    server = backend_pid()
    me = os.getpid()
    variants = {"owner_only": old_rule, "owner_or_invited": new_rule}
    results: dict = {}
    for statement, call in (("claim_update", claim), ("session_read", read)):
        samples = {name: [] for name in variants}
        cpu = {name: [0.0, 0.0, 0] for name in variants}
        for _ in range(args.rounds):
            for name, rule in variants.items():  # interleaved: the machine's swings hit both alike
                # The old rule cannot reach a guest's session; time it on owned ones only, both alike.
                batch = [rng.choice(owned) for _ in range(args.calls)]
                mine0, server0 = proc_cpu(me), proc_cpu(server) if server else 0.0
                for pk, user in batch:
                    start = time.perf_counter()
                    call(rule, pk, user)
                    samples[name].append((time.perf_counter() - start) * 1000)
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
        old, new = results[statement]["owner_only"], results[statement]["owner_or_invited"]
        results[statement]["p50_ratio_new_over_old"] = round(new["p50_ms"] / old["p50_ms"], 3)
    # A guest's read, which only the new rule allows (for the record; no old figure to compare).
    values = []
    for pk, user in guests * 2:
        start = time.perf_counter()
        read(new_rule, pk, user)
        values.append((time.perf_counter() - start) * 1000)
    results["guest_session_read_p50_ms"] = round(statistics.median(values), 3)
    results["new_rule_sql"] = str(new_rule(owned[0][1]).filter(pk=owned[0][0]).query)
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
    for statement in ("claim_update", "session_read"):
        row = figures[statement]
        for variant in ("owner_only", "owner_or_invited"):
            f = row[variant]
            print(
                f"{statement:<13} {variant:<17} p50 {f['p50_ms']:.3f} ms  p95 {f['p95_ms']:.3f} ms  "
                f"CPU {f['client_cpu_us_per_call']} µs here"
                + (f", {f['server_cpu_us_per_call']} µs server" if f["server_cpu_us_per_call"] is not None else "")
            )
        print(f"{statement:<13} p50 new/old {row['p50_ratio_new_over_old']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
