"""The live chat's streaming path: what the WebSocket adds over calling the simulator directly.

    .venv/bin/python bench/streaming.py [--port-base 18510] [--rounds 4] [--idle 1000]

Starts, in their own processes, a provider simulator pacing answers at 800 tokens a second
(`manage.py simulate_providers`) and daphne serving the app (`config.asgi:application`) on a
fresh SQLite database (on /dev/shm when there is one; REDIS_URL, if set, is passed on, so the
channel layer is Redis). This process seeds a consultant with sessions, signs in, and drives
the chat WebSocket with a small hand-written client (no extra dependency). It measures:

- time to first token (TTFT) over the WebSocket (chat frame sent → first `token` frame) and
  directly against the simulator (POST /api/chat → first NDJSON delta), for 1 stream and for
  50 concurrent streams; the added time is the difference of the percentiles (p50/p95/p99).
  Targets: added p50 <= 10 ms and p95 <= 30 ms at 50 streams.
- delivered rate of one stream fed at 800 tokens a second: tokens a second reaching the
  socket, as a share of the rate read directly from the simulator (target: >= 99 %), and
  the `token` frames a second the socket received (target: <= 30).
- memory of `--idle` idle sockets: daphne's resident set size with them all open
  (target: under 1 GiB).

Figures are printed and written to bench/results/streaming.json. Every phase has a time limit.
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
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.wsclient import Socket

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "streaming.json"
SOURCE_RATE = 800.0
SHORT_MODEL = "llama3.2-words-20"
LONG_WORDS = 4000
TARGETS = {
    "added_ttft_p50_ms_at_50": 10.0,
    "added_ttft_p95_ms_at_50": 30.0,
    "delivered_share_min": 0.99,
    "frames_per_second_max": 30.0,
    "idle_rss_max_bytes": 1 << 30,
}
PHASE_TIMEOUT = 180.0


# --- Processes ---------------------------------------------------------------------------------


def free_port(preferred: int | None) -> int:
    if preferred:
        return preferred
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code < 500:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in time")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: list[float]) -> dict:
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 2),
        "p95": round(percentile(values, 95), 2),
        "p99": round(percentile(values, 99), 2),
    }


# --- Measurements ------------------------------------------------------------------------------


async def direct_ttft(sim_url: str, model: str, concurrency: int, rounds: int) -> list[float]:
    """Milliseconds from POST /api/chat to the first NDJSON delta, `concurrency` at a time."""
    samples: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=sim_url, timeout=30, limits=limits) as client:

        async def one(index: int) -> float:
            body = {"model": model, "stream": True, "messages": [{"role": "user", "content": f"question {index}"}]}
            started = time.perf_counter()
            first = None
            async with client.stream("POST", "/api/chat", json=body) as response:
                async for line in response.aiter_lines():
                    if first is None and line and json.loads(line).get("message", {}).get("content"):
                        first = time.perf_counter()
            return (first - started) * 1000

        for round_ in range(rounds):
            samples += await asyncio.gather(*(one(round_ * concurrency + i) for i in range(concurrency)))
    return samples


async def websocket_ttft(sockets: list[Socket], rounds: int) -> list[float]:
    """Milliseconds from sending a chat frame to the first token frame, all sockets at once."""
    samples: list[float] = []

    async def one(ws: Socket, index: int) -> float:
        started = time.perf_counter()
        await ws.send({"type": "chat", "message": f"question {index}"})
        first = None
        while True:
            frame = await ws.receive()
            if frame["type"] == "token" and first is None:
                first = time.perf_counter()
            elif frame["type"] == "message.done":
                return (first - started) * 1000
            elif frame["type"] == "error":
                raise RuntimeError(f"error frame: {frame}")

    for round_ in range(rounds):
        samples += await asyncio.gather(*(one(ws, round_ * len(sockets) + i) for i, ws in enumerate(sockets)))
    return samples


async def direct_rate(sim_url: str) -> float:
    """Tokens a second read straight from the simulator for a long answer."""
    body = {
        "model": f"llama3.2-words-{LONG_WORDS}",
        "stream": True,
        "messages": [{"role": "user", "content": "a long answer"}],
    }
    times: list[float] = []
    async with httpx.AsyncClient(base_url=sim_url, timeout=60) as client:
        async with client.stream("POST", "/api/chat", json=body) as response:
            async for line in response.aiter_lines():
                if line and json.loads(line).get("message", {}).get("content"):
                    times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0])


async def websocket_rate(ws: Socket) -> dict:
    """One long answer over the socket: delivered tokens a second and frames a second."""
    await ws.send({"type": "chat", "message": "a long answer"})
    frame_times: list[float] = []
    text: list[str] = []
    while True:
        frame = await ws.receive()
        if frame["type"] == "token":
            frame_times.append(time.perf_counter())
            text.append(frame["text"])
        elif frame["type"] == "message.done":
            done = time.perf_counter()
            tokens = frame["message"]["completion_tokens"]
            break
        elif frame["type"] == "error":
            raise RuntimeError(f"error frame: {frame}")
    words = len("".join(text).split())
    span = frame_times[-1] - frame_times[0]
    return {
        "tokens": tokens,
        "words_received": words,
        "frames": len(frame_times),
        "seconds": round(span, 3),
        "seconds_to_done": round(done - frame_times[0], 3),
        # The first frame carries one token; the rest arrived within `span`.
        "delivered_tokens_per_second": round((words - 1) / span, 1),
        "frames_per_second": round((len(frame_times) - 1) / span, 2),
    }


async def idle_sockets(host: str, port: int, path: str, cookie: str, count: int, daphne_pid: int) -> dict:
    before = rss_bytes(daphne_pid)
    sockets: list[Socket] = []
    batch = 50  # daphne's listen backlog; a busy machine resets connections beyond it
    retries = 0

    async def open_one() -> Socket:
        nonlocal retries
        for attempt in range(5):
            try:
                ws = await Socket.open(host, port, path, cookie)
                await ws.until("ready")
                return ws
            except (ConnectionError, asyncio.IncompleteReadError):
                retries += 1
                await asyncio.sleep(0.2 * (attempt + 1))
        raise RuntimeError("could not open an idle socket after 5 attempts")

    started = time.perf_counter()
    for offset in range(0, count, batch):
        sockets += await asyncio.gather(*(open_one() for _ in range(min(batch, count - offset))))
    open_seconds = time.perf_counter() - started
    await asyncio.sleep(2)
    during = rss_bytes(daphne_pid)
    for ws in sockets:
        ws.close()
    return {
        "sockets": len(sockets),
        "seconds_to_open": round(open_seconds, 2),
        "connection_retries": retries,
        "daphne_rss_before_bytes": before,
        "daphne_rss_with_sockets_bytes": during,
        "per_socket_bytes": round((during - before) / max(1, len(sockets))),
    }


# --- Setup -------------------------------------------------------------------------------------


def seed(sessions: int) -> tuple[str, list[str], str]:
    """A consultant with `sessions` short-answer sessions and one long-answer session; the cookie."""
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.test import Client

    from billing.models import ClientDomain
    from sessions_app import services

    user = get_user_model().objects.create_user("bench", password="bench-only-pw-1")
    client = ClientDomain.objects.create(name="Bench Client", slug="bench")
    short = [
        str(services.session_start(user=user, client=client, model=f"ollama:{SHORT_MODEL}").pk) for _ in range(sessions)
    ]
    long = str(services.session_start(user=user, client=client, model=f"ollama:llama3.2-words-{LONG_WORDS}").pk)
    browser = Client()
    browser.force_login(user)
    return f"{settings.SESSION_COOKIE_NAME}={browser.cookies[settings.SESSION_COOKIE_NAME].value}", short, long


async def measure(args, host: str, port: int, sim_url: str, cookie: str, short: list[str], long: str, daphne_pid: int):
    results: dict = {"ttft_ms": {}}
    for concurrency in (1, 50):
        rounds = args.rounds * (15 if concurrency == 1 else 1)
        direct = await asyncio.wait_for(direct_ttft(sim_url, SHORT_MODEL, concurrency, rounds), PHASE_TIMEOUT)
        sockets = [await Socket.open(host, port, f"/ws/sessions/{sid}/", cookie) for sid in short[:concurrency]]
        await asyncio.gather(*(ws.until("ready") for ws in sockets))
        await websocket_ttft(sockets[:1], 1)  # warm-up: first queries, imports, pooled clients
        over_ws = await asyncio.wait_for(websocket_ttft(sockets, rounds), PHASE_TIMEOUT)
        for ws in sockets:
            ws.close()
        d, w = summary(direct), summary(over_ws)
        results["ttft_ms"][f"{concurrency}_streams"] = {
            "direct": d,
            "websocket": w,
            "added": {k: round(w[k] - d[k], 2) for k in ("p50", "p95", "p99")},
        }
        print(
            f"TTFT, {concurrency:>2} stream(s): direct p50/p95/p99 {d['p50']}/{d['p95']}/{d['p99']} ms, "
            f"websocket {w['p50']}/{w['p95']}/{w['p99']} ms, added "
            + "/".join(str(v) for v in results["ttft_ms"][f"{concurrency}_streams"]["added"].values())
            + f" ms (n={w['n']})"
        )

    source = await asyncio.wait_for(direct_rate(sim_url), PHASE_TIMEOUT)
    ws = await Socket.open(host, port, f"/ws/sessions/{long}/", cookie)
    await ws.until("ready")
    rate = await asyncio.wait_for(websocket_rate(ws), PHASE_TIMEOUT)
    ws.close()
    rate["source_tokens_per_second"] = round(source, 1)
    rate["delivered_share"] = round(rate["delivered_tokens_per_second"] / source, 4)
    results["stream_at_800"] = rate
    print(
        f"One stream fed at {SOURCE_RATE:g} tokens/s: source read directly {source:.1f}/s, delivered over the "
        f"socket {rate['delivered_tokens_per_second']}/s ({rate['delivered_share']:.2%}), "
        f"{rate['frames_per_second']} token frames/s ({rate['frames']} frames for {rate['tokens']} tokens)"
    )

    idle = await asyncio.wait_for(
        idle_sockets(host, port, f"/ws/sessions/{short[0]}/", cookie, args.idle, daphne_pid), PHASE_TIMEOUT
    )
    results["idle_sockets"] = idle
    print(
        f"{idle['sockets']} idle sockets: daphne RSS {idle['daphne_rss_with_sockets_bytes'] / 2**20:.1f} MiB "
        f"(before {idle['daphne_rss_before_bytes'] / 2**20:.1f} MiB, {idle['per_socket_bytes'] / 1024:.1f} KiB a socket)"
    )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port-base", type=int, default=0, help="simulator on this port, daphne on the next")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of 50 concurrent answers (1 stream: 15x)")
    parser.add_argument("--idle", type=int, default=1000, help="idle sockets to hold open")
    args = parser.parse_args()

    shm = Path("/dev/shm")
    workdir = Path(tempfile.mkdtemp(prefix="bench-streaming-", dir=shm if shm.is_dir() else None))
    sim_port = free_port(args.port_base)
    port = free_port(args.port_base + 1 if args.port_base else 0)
    host = "127.0.0.1"
    sim_url = f"http://{host}:{sim_port}"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        # As in production: DEBUG on would wrap every cursor to record each query.
        "DEBUG": "0",
        "SECRET_KEY": "bench-" + secrets.token_urlsafe(32),
        "LOG_LEVEL": "WARNING",
        "ALLOWED_HOSTS": f"{host},localhost",
        "DATABASE_URL": f"sqlite:///{workdir / 'db.sqlite3'}",
        "OLLAMA_HOST": sim_url,
        "SESSION_SIGNING_KEY": base64.b64encode(b"bench-signing-key-32-bytes-long!").decode(),
        "PYTHONUNBUFFERED": "1",
    }
    os.environ.update(
        {k: env[k] for k in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL", "OLLAMA_HOST", "DEBUG", "SECRET_KEY")}
    )
    os.environ["SESSION_SIGNING_KEY"] = env["SESSION_SIGNING_KEY"]
    os.environ["LOG_LEVEL"] = "WARNING"
    sys.path.insert(0, str(ROOT))
    manage = [sys.executable, str(ROOT / "manage.py")]
    processes: list[subprocess.Popen] = []
    log = (workdir / "servers.log").open("w")
    try:
        processes.append(
            subprocess.Popen(
                [*manage, "simulate_providers", "--port", str(sim_port), "--tokens-per-second", str(SOURCE_RATE)],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        subprocess.run([*manage, "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True, timeout=300)
        cookie, short, long = seed(50)
        daphne = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", host, "-p", str(port), "config.asgi:application"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        processes.append(daphne)
        deadline = time.monotonic() + 90
        wait_http(f"{sim_url}/api/version", deadline)
        wait_http(f"http://{host}:{port}/accounts/login/", deadline)

        started = time.perf_counter()
        results = asyncio.run(measure(args, host, port, sim_url, cookie, short, long, daphne.pid))
        at50 = results["ttft_ms"]["50_streams"]["added"]
        rate = results["stream_at_800"]
        checks = {
            "added_ttft_p50_ms_at_50": at50["p50"] <= TARGETS["added_ttft_p50_ms_at_50"],
            "added_ttft_p95_ms_at_50": at50["p95"] <= TARGETS["added_ttft_p95_ms_at_50"],
            "delivered_share_min": rate["delivered_share"] >= TARGETS["delivered_share_min"],
            "frames_per_second_max": rate["frames_per_second"] <= TARGETS["frames_per_second_max"],
            "idle_rss_max_bytes": results["idle_sockets"]["daphne_rss_with_sockets_bytes"]
            < TARGETS["idle_rss_max_bytes"],
        }
        results.update(
            {
                "targets": TARGETS,
                "met": checks,
                "source_rate_tokens_per_second": SOURCE_RATE,
                "channel_layer": "redis" if env.get("REDIS_URL") else "in-memory",
                "database": "sqlite (tmpfs)" if shm.is_dir() else "sqlite",
                "machine": {
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "load_average": [round(x, 2) for x in os.getloadavg()],
                },
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        print("Targets:", ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in checks.items()))
        print(f"Written to {RESULTS.relative_to(ROOT)}")
        return 0
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
