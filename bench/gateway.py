"""Latency the gateway adds over calling the provider simulator directly.

    .venv/bin/python bench/gateway.py [--requests 200] [--concurrency 1 50] [--port 18700]
    .venv/bin/python bench/gateway.py --app-root /tmp/base --only-phases --out /tmp/base.json   # A/B

`--app-root` serves daphne (and migrates) from another checkout of the project, so two
versions can be measured in one interleaved run on the same minutes of this shared machine;
`--only-phases` skips the floor, relay and stage figures. Each gateway phase also reports
daphne's CPU time per call, read from /proc, beside the latencies.

Starts the simulator (`manage.py simulate_providers`, no token pacing) and daphne serving the
project with DEBUG off, then sends the same Ollama `/api/chat` conversations to both: each
worker is one consultant with their own client-bound token, continuing one conversation
(the whole history resent every call, as real clients do) for ten turns, then starting a
new one. For streaming the latency is the time to the first content chunk, and the time to
the last; without streaming, the time to the whole answer. "Added" is the gateway's
percentile minus the direct percentile at the same concurrency.

The unthrottled simulator answers in about a millisecond, so 50 concurrent workers keep the
gateway's one process busy all the time: that phase measures queueing at saturation (its
throughput is printed too). The paced phases (`--paced-rate`, default 50 tokens a second,
answers of `--paced-words` words) model 50 consultants waiting on a real model's pace, where
each answer takes seconds, which is the load the gateway actually serves.

The database is DATABASE_URL (as for the app; default: a fresh SQLite file in a temporary
directory). Figures are printed and written to bench/results/gateway.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "gateway.json"
MODEL = "llama3.2"
TURNS_PER_CONVERSATION = 10
TARGET_P50_MS = 5.0
TARGET_P99_MS = 30.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def server_env(args, db_url: str, sim_port: int) -> dict[str, str]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DEBUG": "0",
        "SECRET_KEY": "bench-" + secrets.token_urlsafe(32),
        "SESSION_SIGNING_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "DATABASE_URL": db_url,
        "OLLAMA_HOST": f"http://127.0.0.1:{sim_port}",
        "LOG_LEVEL": "ERROR",
        "PYTHONUNBUFFERED": "1",
    }
    return env


def wait_for(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        time.sleep(0.1)
    raise SystemExit(f"{url} did not come up within {timeout:.0f}s")


def json_from(args: list[str], env: dict[str, str], *, timeout: float, cwd: Path = ROOT):
    """Run a Python child with the servers' environment; its last line of output is JSON."""
    out = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, check=True, capture_output=True, text=True, timeout=timeout
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def prepare_database(env: dict[str, str], workers: int, root: Path = ROOT) -> list[str]:
    """Migrate and create one consultant, one client and a client-bound token per worker."""
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=root, env=env, check=True, timeout=300
    )
    script = f"""
import json
from django.contrib.auth import get_user_model
from billing.models import ClientDomain
from sessions_app.models import ApiToken
user, _ = get_user_model().objects.get_or_create(username="bench")
client, _ = ClientDomain.objects.get_or_create(slug="bench", defaults={{"name": "Bench client"}})
print(json.dumps([ApiToken.issue(user=user, client=client, name=f"bench {{i}}")[1] for i in range({workers})]))
"""
    return json_from(["manage.py", "shell", "-c", script], env, timeout=120, cwd=root)


async def one_call(client: httpx.AsyncClient, url: str, headers: dict, messages: list, stream: bool, model: str):
    """Return (first-content seconds, total seconds, answer text)."""
    body = {"model": model, "messages": messages, "stream": stream}
    started = time.perf_counter()
    first = None
    parts: list[str] = []
    if stream:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                raise RuntimeError(f"{url}: {response.status_code} {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line:
                    continue
                chunk = json.loads(line)
                if "error" in chunk:
                    raise RuntimeError(f"{url}: {chunk['error']}")
                text = chunk.get("message", {}).get("content", "")
                if text and first is None:
                    first = time.perf_counter() - started
                parts.append(text)
    else:
        response = await client.post(url, json=body, headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {response.text[:200]}")
        parts.append(response.json()["message"]["content"])
    total = time.perf_counter() - started
    return (first if first is not None else total), total, "".join(parts)


async def run_phase(
    base: str,
    tokens: list[str] | None,
    concurrency: int,
    requests: int,
    stream: bool,
    model: str = MODEL,
    pid: int | None = None,
    *,
    call=one_call,
    path: str = "/api/chat",
    probe=None,
) -> dict:
    """`requests` calls spread over `concurrency` workers; each worker continues its own conversation.

    `call` speaks the wire protocol (`one_call`: Ollama's); `probe("start")` and `probe("end")`,
    when given, bracket the measured calls (after the warm-up), e.g. to read CPU counters.
    """
    url = f"{base}{path}"
    per_worker = max(1, requests // concurrency)
    firsts: list[float] = []
    totals: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=concurrency + 5, max_keepalive_connections=concurrency + 5)
    async with httpx.AsyncClient(timeout=60.0, limits=limits) as client:

        async def worker(index: int, count: int, record: bool) -> None:
            headers = {"Authorization": f"Bearer {tokens[index]}"} if tokens else {}
            history: list[dict] = []
            for turn in range(count):
                if len(history) >= 2 * TURNS_PER_CONVERSATION:
                    history = []
                messages = [*history, {"role": "user", "content": f"Worker {index} question {turn}"}]
                try:
                    first, total, text = await call(client, url, headers, messages, stream, model)
                except (RuntimeError, httpx.HTTPError) as exc:
                    errors.append(str(exc)[:200])
                    history = []
                    continue
                history = [*messages, {"role": "assistant", "content": text}]
                if record:
                    firsts.append(first)
                    totals.append(total)

        # Warm up connections, pools and the first session of every worker.
        await asyncio.gather(*(worker(i, 2, False) for i in range(concurrency)))
        if probe is not None:
            probe("start")
        cpu_before = cpu_seconds(pid) if pid else None
        started = time.perf_counter()
        await asyncio.gather(*(worker(i, per_worker, True) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(pid) - cpu_before if pid else None
        if probe is not None:
            probe("end")
    summary = {
        "requests": len(totals),
        "errors": len(errors),
        "seconds": round(elapsed, 3),
        "requests_per_second": round(len(totals) / elapsed, 1) if elapsed else None,
    }
    if cpu is not None and totals:
        summary["server_cpu_ms_per_call"] = round(cpu / len(totals) * 1000, 3)
    if errors:
        summary["first_error"] = errors[0]
    for name, values in (("first_ms", firsts), ("total_ms", totals)):
        summary[name] = {q: round(percentile(values, float(q[1:])) * 1000, 3) for q in ("p50", "p90", "p99")}
    return summary


async def run_floor(base: str, requests: int) -> dict:
    """GET /api/version one at a time: what daphne and Django cost before any gateway work."""
    timings: list[float] = []
    async with httpx.AsyncClient(timeout=10.0) as client:
        for index in range(requests + 20):
            started = time.perf_counter()
            (await client.get(f"{base}/api/version")).raise_for_status()
            if index >= 20:
                timings.append(time.perf_counter() - started)
    return {q: round(percentile(timings, float(q[1:])) * 1000, 3) for q in ("p50", "p90", "p99")}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_relay_cost(base: str, token: str, daphne_pid: int, model: str) -> dict:
    """Daphne's CPU time per streamed chunk over one long answer (the gateway's relay cost)."""
    async with httpx.AsyncClient(timeout=120.0) as client:
        headers = {"Authorization": f"Bearer {token}"}
        body = {"model": model, "messages": [{"role": "user", "content": "A long answer, please."}]}
        before = cpu_seconds(daphne_pid)
        started = time.perf_counter()
        chunks = 0
        async with client.stream("POST", f"{base}/api/chat", json=body, headers=headers) as response:
            async for line in response.aiter_lines():
                chunks += bool(line)
        seconds = time.perf_counter() - started
        cpu = cpu_seconds(daphne_pid) - before
    return {
        "model": model,
        "chunks": chunks,
        "seconds": round(seconds, 3),
        "daphne_cpu_us_per_chunk": round(cpu / chunks * 1e6, 1),
    }


def added(gateway: dict, direct: dict) -> dict:
    return {
        metric: {q: round(gateway[metric][q] - direct[metric][q], 3) for q in gateway[metric]}
        for metric in ("first_ms", "total_ms")
    }


STAGES_CHILD = "--stages-child"


def stages_child(token: str, calls: int) -> None:
    """In-process: time each stage of a streamed turn (run as a child with the server's environment)."""
    import django

    sys.path.insert(0, str(ROOT))
    django.setup()
    from asgiref.sync import sync_to_async

    from sessions_app import services
    from sessions_app.gateway import ollama_wire, views

    timings: dict[str, list[float]] = {}

    def timed(module, name: str) -> None:
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timings.setdefault(name, []).append(time.perf_counter() - started)

        setattr(module, name, wrapper)

    for module, name in (
        (views, "authenticate_raw"),
        (views, "gateway_join"),
        (services, "begin_turn"),
        (services, "_finish_turn"),
    ):
        timed(module, name)

    async def turns() -> None:
        history: list[dict] = []
        for index in range(calls + 3):
            messages = [*history, {"role": "user", "content": f"Stage question {index}"}]
            body = json.dumps({"model": MODEL, "messages": messages}).encode()
            started = time.perf_counter()
            token_, _data, chat, session, start = await sync_to_async(views._prepare)(
                token, body, ollama_wire.parse_chat
            )
            prepared = time.perf_counter()
            events = services.session_chat(session_id=session.pk, user=token_.user, message=chat.message, start=start)
            parts = [(await anext(events)).text]
            first = time.perf_counter()
            async for event in events:
                parts.append(getattr(event, "text", ""))
            done = time.perf_counter()
            if index >= 3:  # warm-up turns are not counted
                timings.setdefault("prepare and begin (one thread hop)", []).append(prepared - started)
                timings.setdefault("provider call to first token", []).append(first - prepared)
                timings.setdefault("first token to the stored answer", []).append(done - first)
            history = [*messages, {"role": "assistant", "content": "".join(parts)}]
            if len(history) >= 2 * TURNS_PER_CONVERSATION:
                history = []

    asyncio.run(turns())
    print(json.dumps({name: round(percentile(values[3:] or values, 50) * 1000, 3) for name, values in timings.items()}))


def stage_breakdown(env: dict[str, str], token: str, calls: int) -> dict:
    return json_from([__file__, STAGES_CHILD, token, str(calls)], env, timeout=300)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == STAGES_CHILD:
        stages_child(sys.argv[2], int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="measured calls per phase (default 200)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--port", type=int, default=18700, help="simulator port; daphne uses the next one")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--paced-rate", type=int, default=50, help="tokens/s of the paced phases (0: skip them)")
    parser.add_argument("--paced-words", type=int, default=150, help="answer length in the paced phases")
    parser.add_argument("--paced-concurrency", type=int, default=50)
    parser.add_argument("--app-root", type=Path, default=ROOT, help="serve this checkout of the project (A/B)")
    parser.add_argument("--only-phases", action="store_true", help="skip the floor, relay and stage figures")
    args = parser.parse_args()
    app_root = args.app_root.resolve()

    load_before = [round(x, 2) for x in os.getloadavg()]
    sim_port, app_port = args.port, args.port + 1
    workdir = tempfile.mkdtemp(prefix="gateway-bench-")
    db_url = os.environ.get("DATABASE_URL") or f"sqlite:///{workdir}/bench.sqlite3"
    env = server_env(args, db_url, sim_port)
    tokens = prepare_database(
        env, max(*args.concurrency, args.paced_concurrency if args.paced_rate > 0 else 1), app_root
    )

    processes = [
        subprocess.Popen(
            [sys.executable, "manage.py", "simulate_providers", "--port", str(sim_port), "--tokens-per-second", "0"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(app_port), "config.asgi:application"],
            cwd=app_root,
            env=env,
            stdout=subprocess.DEVNULL,
        ),
    ]
    try:
        direct_base, gateway_base = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{app_port}"
        wait_for(f"{direct_base}/api/version")
        wait_for(f"{gateway_base}/api/version")
        results: dict = {}
    except BaseException:
        for process in processes:
            process.kill()
        raise
    try:
        if not args.only_phases:
            extras(args, results, direct_base, gateway_base, tokens, processes[1].pid, env)
        daphne = processes[1].pid
        for concurrency in args.concurrency:
            for stream in (True, False):
                label = f"{'stream' if stream else 'no_stream'}_c{concurrency}"
                direct = asyncio.run(run_phase(direct_base, None, concurrency, args.requests, stream))
                gateway = asyncio.run(run_phase(gateway_base, tokens, concurrency, args.requests, stream, pid=daphne))
                results[label] = {"direct": direct, "gateway": gateway, "added": added(gateway, direct)}
                delta = results[label]["added"]["first_ms" if stream else "total_ms"]
                print(
                    f"{label:>14}: added p50 {delta['p50']:7.2f} ms  p99 {delta['p99']:7.2f} ms   "
                    f"(gateway p50 {gateway['total_ms']['p50']:.2f} / p99 {gateway['total_ms']['p99']:.2f} ms total, "
                    f"direct p50 {direct['total_ms']['p50']:.2f} / p99 {direct['total_ms']['p99']:.2f} ms; "
                    f"{gateway['requests_per_second']} req/s; daphne CPU {gateway.get('server_cpu_ms_per_call')} ms a call)"
                    + (f"  ERRORS: {gateway['errors']}" if gateway["errors"] else ""),
                    flush=True,
                )
        if args.paced_rate > 0:
            model = f"{MODEL}-rate-{args.paced_rate}-words-{args.paced_words}"
            concurrency = args.paced_concurrency
            requests = max(concurrency, min(args.requests, 4 * concurrency))
            for stream in (True, False):
                label = f"{'stream' if stream else 'no_stream'}_c{concurrency}_paced"
                direct = asyncio.run(run_phase(direct_base, None, concurrency, requests, stream, model))
                gateway = asyncio.run(run_phase(gateway_base, tokens, concurrency, requests, stream, model, daphne))
                results[label] = {"model": model, "direct": direct, "gateway": gateway, "added": added(gateway, direct)}
                delta = results[label]["added"]["first_ms" if stream else "total_ms"]
                print(
                    f"{label:>14}: added p50 {delta['p50']:7.2f} ms  p99 {delta['p99']:7.2f} ms   "
                    f"({args.paced_words} words at {args.paced_rate} tokens/s; "
                    f"gateway p50 {gateway['total_ms']['p50']:.0f} ms total, {gateway['requests_per_second']} req/s)"
                    + (f"  ERRORS: {gateway['errors']}" if gateway["errors"] else ""),
                    flush=True,
                )
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
    write_report(args, db_url, load_before, results)


def extras(args, results: dict, direct_base: str, gateway_base: str, tokens: list[str], daphne: int, env) -> None:
    """The floor (`/api/version`), the relay cost per chunk and the in-process stage timings."""
    floor_direct = asyncio.run(run_floor(direct_base, args.requests))
    floor_gateway = asyncio.run(run_floor(gateway_base, args.requests))
    results["version_c1"] = {
        "direct": floor_direct,
        "gateway": floor_gateway,
        "added": {q: round(floor_gateway[q] - floor_direct[q], 3) for q in floor_gateway},
    }
    print(
        f"{'version_c1':>14}: added p50 {results['version_c1']['added']['p50']:7.2f} ms  "
        f"p99 {results['version_c1']['added']['p99']:7.2f} ms   (daphne + Django, no gateway work)",
        flush=True,
    )
    relay = [
        asyncio.run(run_relay_cost(gateway_base, tokens[0], daphne, f"{MODEL}-words-4000")),
        asyncio.run(run_relay_cost(gateway_base, tokens[0], daphne, f"{MODEL}-rate-500-words-1000")),
    ]
    results["relay_cost"] = relay
    for item in relay:
        print(
            f"    relay cost: {item['daphne_cpu_us_per_chunk']:.0f} µs of daphne CPU a chunk "
            f"({item['chunks']} chunks of {item['model']} in {item['seconds']} s)",
            flush=True,
        )
    stages = stage_breakdown(env, tokens[-1], min(args.requests, 100))
    results["stages_p50_ms"] = stages
    print("   stages p50: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in stages.items()), flush=True)


def write_report(args, db_url: str, load_before: list[float], results: dict) -> None:
    report = {
        "what": "latency added by the gateway (Ollama /api/chat) over calling the simulator directly",
        "latency": "stream: time to first content chunk; no_stream: time to the whole answer",
        "targets_ms": {"p50": TARGET_P50_MS, "p99": TARGET_P99_MS},
        "database": db_url.split("://", 1)[0],
        "app_root": str(args.app_root.resolve()),
        "requests_per_phase": args.requests,
        "turns_per_conversation": TURNS_PER_CONVERSATION,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            # Other work on the machine inflates every figure; the load says how much there was.
            "load_average_before": load_before,
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
