"""The live chat's streaming path: what the WebSocket adds over calling the simulator directly.

    .venv/bin/python bench/streaming.py [--port-base 18510] [--rounds 4] [--idle 1000]
                                        [--baseline REV] [--cpu-rounds 3]

Starts, in their own processes, a provider simulator pacing answers at 800 tokens a second
(`manage.py simulate_providers`) and daphne serving the app (`config.asgi:application`) on a
fresh SQLite database (on /dev/shm when there is one; REDIS_URL, if set, is passed on, so the
channel layer is Redis). Sessions are seeded and a consultant signed in through the tree's own
`manage.py`; the chat WebSocket is driven by a small hand-written client (no extra dependency).
It measures:

- time to first token (TTFT) over the WebSocket (chat frame sent → first `token` frame) and
  directly against the simulator (POST /api/chat → first NDJSON delta), for 1 stream and for
  50 concurrent streams; the added time is the difference of the percentiles (p50/p95/p99).
  Targets: added p50 <= 10 ms and p95 <= 30 ms at 50 streams.
- delivered rate of one stream fed at 800 tokens a second: tokens a second reaching the
  socket, as a share of the rate read directly from the simulator (target: >= 99 %), and
  the `token` frames a second the socket received (target: <= 30).
- daphne CPU per token frame (utime + stime from /proc, divided by the token frames the
  sockets received) for 50 concurrent short answers and for the one stream at 800 tokens a
  second. With `--baseline REV`, the same runs against a second daphne serving that revision
  (exported with `git archive`), in interleaved rounds (A B, B A, ...), so the two are compared
  as ratios on the same machine at the same time.
- resume: time for a reconnecting tab to show everything it missed (`resume` sent → `resumed`
  received, the catch-up frames before it), p50/p99 at 1 and 50 concurrent streams of paced
  answers (30 tokens a second, like a real model). Target: p99 <= 100 ms.
- checkpoint writes per answer: UPDATEs of the partial answer, counted by an SQLite trigger,
  against the seconds the answers streamed. Target: at most one per 2 s of streaming (the
  final store is not a checkpoint).
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
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
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
    "resume_p99_ms": 100.0,
    "checkpoints_per_streaming_second_max": 0.5,
}
PHASE_TIMEOUT = 180.0
# Resume runs on answers paced like a real model: 30 tokens a second for ten seconds.
RESUME_MODEL = "llama3.2-rate-30-words-300"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


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


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


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


async def answer_all(sockets: list[Socket], tag: str) -> tuple[int, list[float]]:
    """Every socket asks at once: the token frames received until each answer is done, and the TTFTs (ms)."""

    async def one(ws: Socket, index: int) -> tuple[int, float]:
        started = time.perf_counter()
        await ws.send({"type": "chat", "message": f"{tag} {index}"})
        frames, first = 0, None
        while True:
            frame = await ws.receive()
            if frame["type"] == "token":
                frames += 1
                first = first or time.perf_counter()
            elif frame["type"] == "message.done":
                return frames, (first - started) * 1000
            elif frame["type"] == "error":
                raise RuntimeError(f"error frame: {frame}")

    done = await asyncio.gather(*(one(ws, i) for i, ws in enumerate(sockets)))
    return sum(frames for frames, _ in done), [ttft for _, ttft in done]


async def resume_times(host: str, port: int, cookie: str, sids: list[str], tag: str) -> dict:
    """Each session: a tab watches, leaves mid-answer, comes back and resumes; how long to catch up."""

    async def one(sid: str) -> tuple[float, float]:
        path = f"/ws/sessions/{sid}/"
        asker = await Socket.open(host, port, path, cookie)
        await asker.until("ready")
        tab = await Socket.open(host, port, path, cookie)
        await tab.until("ready")
        turn = f"{tag}{sid[:8]}"
        await asker.send({"type": "chat", "message": f"resume {tag}", "turn": turn})
        have = 0
        while have < 10:  # the tab watches the first ten frames...
            frame = await tab.receive()
            if frame["type"] == "token":
                have = frame["n"]
        tab.close()
        await asyncio.sleep(0.5)  # ...leaves, and misses half a second of the answer
        reconnected = time.perf_counter()
        tab = await Socket.open(host, port, path, cookie)
        await tab.until("ready")
        began = time.perf_counter()
        await tab.send({"type": "resume", "turn": turn, "after": have})
        await tab.until("resumed")
        done = time.perf_counter()
        tab.close()
        await asker.until("message.done")
        asker.close()
        return (done - began) * 1000, (done - reconnected) * 1000

    results = await asyncio.gather(*(one(sid) for sid in sids))
    return {"resume_ms": [r[0] for r in results], "reconnect_and_resume_ms": [r[1] for r in results]}


# --- Servers -----------------------------------------------------------------------------------

SEED = """
import json
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client
from billing.models import ClientDomain
from sessions_app import services
user = get_user_model().objects.create_user("bench", password="bench-only-pw-1")
client = ClientDomain.objects.create(name="Bench Client", slug="bench")
def start(model, count):
    return [str(services.session_start(user=user, client=client, model=f"ollama:{model}").pk) for _ in range(count)]
browser = Client()
browser.force_login(user)
print(json.dumps({
    "cookie": f"{settings.SESSION_COOKIE_NAME}={browser.cookies[settings.SESSION_COOKIE_NAME].value}",
    "short": start(%(short)r, 50),
    "long": start(%(long)r, %(long_count)d),
    "resume": start(%(resume)r, 50),
}))
"""

CHECKPOINT_TRIGGER = """
CREATE TABLE bench_checkpoints (session_id TEXT, at TEXT);
CREATE TRIGGER bench_count_checkpoints AFTER UPDATE OF turn_checkpoint_at ON ollama_streaming_sessions
WHEN NEW.turn_checkpoint_at IS NOT NULL
BEGIN INSERT INTO bench_checkpoints VALUES (NEW.session_id, NEW.turn_checkpoint_at); END;
"""


@dataclass
class Tree:
    """One revision of the app, served by its own daphne on its own database."""

    name: str
    root: Path
    port: int
    database: Path
    env: dict = field(default_factory=dict)
    cookie: str = ""
    short: list[str] = field(default_factory=list)
    long: list[str] = field(default_factory=list)
    resume: list[str] = field(default_factory=list)
    daphne: subprocess.Popen | None = None
    checkpoints: bool = False

    def prepare(self, base_env: dict, log, long_count: int) -> None:
        self.env = {**base_env, "DATABASE_URL": f"sqlite:///{self.database}"}
        manage = [sys.executable, str(self.root / "manage.py")]
        subprocess.run(
            [*manage, "migrate", "--noinput", "-v", "0"], cwd=self.root, env=self.env, check=True, timeout=300
        )
        script = SEED % {
            "short": SHORT_MODEL,
            "long": f"llama3.2-words-{LONG_WORDS}",
            "long_count": long_count,
            "resume": RESUME_MODEL,
        }
        out = subprocess.run(
            [*manage, "shell", "-v", "0", "-c", script],
            cwd=self.root,
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
        seeded = json.loads(out.stdout.strip().splitlines()[-1])
        self.cookie, self.short, self.long, self.resume = (seeded[k] for k in ("cookie", "short", "long", "resume"))
        with contextlib.closing(sqlite3.connect(self.database)) as db:
            columns = {row[1] for row in db.execute("PRAGMA table_info(ollama_streaming_sessions)")}
            if "turn_checkpoint_at" in columns:
                db.executescript(CHECKPOINT_TRIGGER)
                self.checkpoints = True
        self.daphne = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port), "config.asgi:application"],
            cwd=self.root,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def answer_seconds(self, sids: list[str]) -> list[float]:
        """How long each answer of these sessions streamed, claim to store, as its usage row says."""
        with contextlib.closing(sqlite3.connect(self.database)) as db:
            marks = ",".join("?" * len(sids))
            ids = [sid.replace("-", "") for sid in sids]
            rows = db.execute(f"SELECT duration_ms FROM user_llm_usage WHERE session_id IN ({marks})", ids)
            return [ms / 1000 for (ms,) in rows]

    def checkpoint_count(self, sids: list[str]) -> int:
        with contextlib.closing(sqlite3.connect(self.database)) as db:
            marks = ",".join("?" * len(sids))
            ids = [sid.replace("-", "") for sid in sids]  # SQLite stores UUIDs as 32 hex digits
            return db.execute(f"SELECT count(*) FROM bench_checkpoints WHERE session_id IN ({marks})", ids).fetchone()[
                0
            ]


def export_tree(rev: str, into: Path) -> Path:
    """The files of revision `rev`, to serve it beside the working tree."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


# --- Measurements across trees -----------------------------------------------------------------


async def cpu_round(tree: Tree, host: str, tag: str, long_sid: str) -> dict:
    """CPU per token frame for 50 concurrent short answers, then for one 800 tokens/s answer."""
    pid = tree.daphne.pid
    sockets = [await Socket.open(host, tree.port, f"/ws/sessions/{sid}/", tree.cookie) for sid in tree.short]
    await asyncio.gather(*(ws.until("ready") for ws in sockets))
    before = cpu_seconds(pid)
    frames, ttfts = await asyncio.wait_for(answer_all(sockets, tag), PHASE_TIMEOUT)
    fifty = {"cpu_seconds": cpu_seconds(pid) - before, "frames": frames, "ttft_ms": summary(ttfts)}
    for ws in sockets:
        ws.close()
    ws = await Socket.open(host, tree.port, f"/ws/sessions/{long_sid}/", tree.cookie)
    await ws.until("ready")
    before = cpu_seconds(pid)
    rate = await asyncio.wait_for(websocket_rate(ws), PHASE_TIMEOUT)
    one = {"cpu_seconds": cpu_seconds(pid) - before, "frames": rate["frames"], "tokens": rate["tokens"]}
    ws.close()
    for phase in (fifty, one):
        phase["cpu_ms_per_frame"] = round(phase["cpu_seconds"] * 1000 / max(1, phase["frames"]), 3)
        phase["cpu_seconds"] = round(phase["cpu_seconds"], 3)
    one["cpu_us_per_token"] = round(one["cpu_seconds"] * 1e6 / max(1, one["tokens"]), 1)
    return {"50_short_answers": fifty, "one_stream_at_800": one}


async def compare_cpu(trees: list[Tree], host: str, rounds: int) -> dict:
    """Interleaved rounds (A B, B A, ...): CPU per token frame of each tree, and after/before ratios."""
    runs: dict[str, list[dict]] = {tree.name: [] for tree in trees}
    for round_ in range(rounds):
        for tree in trees if round_ % 2 == 0 else list(reversed(trees)):
            runs[tree.name].append(await cpu_round(tree, host, f"cpu{round_}", tree.long[round_ + 1]))
    out: dict = {"rounds": runs}
    for phase in ("50_short_answers", "one_stream_at_800"):
        medians = {name: statistics.median(r[phase]["cpu_ms_per_frame"] for r in rs) for name, rs in runs.items()}
        out[phase] = {"median_cpu_ms_per_frame": medians}
        if "after" in medians and "before" in medians:
            out[phase]["ratio_after_to_before"] = round(medians["after"] / medians["before"], 3)
    ttft = {
        name: {q: statistics.median(r["50_short_answers"]["ttft_ms"][q] for r in rs) for q in ("p50", "p95")}
        for name, rs in runs.items()
    }
    out["50_short_answers"]["median_ttft_ms"] = ttft
    return out


async def measure(args, host: str, tree: Tree, sim_url: str) -> dict:
    results: dict = {"ttft_ms": {}}
    for concurrency in (1, 50):
        rounds = args.rounds * (15 if concurrency == 1 else 1)
        direct = await asyncio.wait_for(direct_ttft(sim_url, SHORT_MODEL, concurrency, rounds), PHASE_TIMEOUT)
        sockets = [
            await Socket.open(host, tree.port, f"/ws/sessions/{sid}/", tree.cookie) for sid in tree.short[:concurrency]
        ]
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
    ws = await Socket.open(host, tree.port, f"/ws/sessions/{tree.long[0]}/", tree.cookie)
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

    results["resume"] = {}
    resumed_sids: list[str] = []
    for concurrency in (1, 50):
        samples: dict = {"resume_ms": [], "reconnect_and_resume_ms": []}
        for round_ in range(args.resume_rounds):
            sids = tree.resume[:concurrency]
            got = await asyncio.wait_for(
                resume_times(host, tree.port, tree.cookie, sids, f"r{concurrency}x{round_}"), PHASE_TIMEOUT
            )
            for key in samples:
                samples[key] += got[key]
            resumed_sids += sids
        r, c = summary(samples["resume_ms"]), summary(samples["reconnect_and_resume_ms"])
        results["resume"][f"{concurrency}_streams"] = {"resume_to_caught_up_ms": r, "reconnect_to_caught_up_ms": c}
        print(
            f"Resume, {concurrency:>2} stream(s) at 30 tokens/s: resume sent -> caught up p50/p99 {r['p50']}/{r['p99']} ms; "
            f"socket opened -> caught up {c['p50']}/{c['p99']} ms (n={r['n']})"
        )

    if tree.checkpoints:
        durations = tree.answer_seconds(sorted(set(resumed_sids)))
        answers = len(durations)
        count = tree.checkpoint_count(sorted(set(resumed_sids)))
        seconds = sum(durations)
        long_count = tree.checkpoint_count(tree.long[:1])
        results["checkpoints"] = {
            "paced_answers": answers,
            "streaming_seconds": round(seconds, 1),
            "checkpoints": count,
            "per_answer": round(count / answers, 2),
            "per_streaming_second": round(count / seconds, 3),
            "one_stream_at_800": {"seconds": rate["seconds_to_done"], "checkpoints": long_count},
        }
        print(
            f"Checkpoints: {count} for {answers} answers streaming {seconds:.0f} s in all "
            f"({count / answers:.2f} an answer, {count / seconds:.3f} a second; target <= 0.5), "
            f"{long_count} for the {rate['seconds_to_done']} s answer at 800 tokens/s"
        )

    idle = await asyncio.wait_for(
        idle_sockets(host, tree.port, f"/ws/sessions/{tree.short[0]}/", tree.cookie, args.idle, tree.daphne.pid),
        PHASE_TIMEOUT,
    )
    results["idle_sockets"] = idle
    print(
        f"{idle['sockets']} idle sockets: daphne RSS {idle['daphne_rss_with_sockets_bytes'] / 2**20:.1f} MiB "
        f"(before {idle['daphne_rss_before_bytes'] / 2**20:.1f} MiB, {idle['per_socket_bytes'] / 1024:.1f} KiB a socket)"
    )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port-base", type=int, default=0, help="simulator on this port, daphne on the next ones")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of 50 concurrent answers (1 stream: 15x)")
    parser.add_argument("--idle", type=int, default=1000, help="idle sockets to hold open")
    parser.add_argument("--baseline", help="a git revision to compare CPU per token frame with (interleaved)")
    parser.add_argument("--cpu-rounds", type=int, default=3, help="interleaved rounds of the CPU comparison")
    parser.add_argument("--resume-rounds", type=int, default=2, help="rounds of the resume measurement")
    args = parser.parse_args()

    shm = Path("/dev/shm")
    workdir = Path(tempfile.mkdtemp(prefix="bench-streaming-", dir=shm if shm.is_dir() else None))
    host = "127.0.0.1"
    sim_port = free_port(args.port_base)
    sim_url = f"http://{host}:{sim_port}"
    base_env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        # As in production: DEBUG on would wrap every cursor to record each query.
        "DEBUG": "0",
        "SECRET_KEY": "bench-" + secrets.token_urlsafe(32),
        "LOG_LEVEL": "WARNING",
        "ALLOWED_HOSTS": f"{host},localhost",
        "OLLAMA_HOST": sim_url,
        "SESSION_SIGNING_KEY": base64.b64encode(b"bench-signing-key-32-bytes-long!").decode(),
        "PYTHONUNBUFFERED": "1",
    }
    trees = [Tree("after", ROOT, free_port(args.port_base + 1 if args.port_base else 0), workdir / "after.sqlite3")]
    if args.baseline:
        source = export_tree(args.baseline, workdir / "baseline")
        trees.append(
            Tree("before", source, free_port(args.port_base + 2 if args.port_base else 0), workdir / "before.sqlite3")
        )
    processes: list[subprocess.Popen] = []
    log = (workdir / "servers.log").open("w")
    try:
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "manage.py"),
                    "simulate_providers",
                    "--port",
                    str(sim_port),
                    "--tokens-per-second",
                    str(SOURCE_RATE),
                ],
                cwd=ROOT,
                env=base_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        for tree in trees:
            tree.prepare(base_env, log, long_count=args.cpu_rounds + 1)
            processes.append(tree.daphne)
        deadline = time.monotonic() + 90
        wait_http(f"{sim_url}/api/version", deadline)
        for tree in trees:
            wait_http(f"http://{host}:{tree.port}/accounts/login/", deadline)

        started = time.perf_counter()
        results = asyncio.run(measure(args, host, trees[0], sim_url))
        cpu = asyncio.run(compare_cpu(trees, host, args.cpu_rounds))
        results["cpu_per_token_frame"] = cpu
        for phase in ("50_short_answers", "one_stream_at_800"):
            medians = cpu[phase]["median_cpu_ms_per_frame"]
            ratio = cpu[phase].get("ratio_after_to_before")
            print(
                f"daphne CPU per token frame, {phase.replace('_', ' ')}: "
                + ", ".join(f"{name} {value:.3f} ms" for name, value in medians.items())
                + (f" (after/before {ratio})" if ratio is not None else "")
            )
        ttft = cpu["50_short_answers"]["median_ttft_ms"]
        print(
            "TTFT of 50 concurrent short answers, median of rounds: "
            + ", ".join(f"{name} p50/p95 {v['p50']:.1f}/{v['p95']:.1f} ms" for name, v in ttft.items())
        )
        at50 = results["ttft_ms"]["50_streams"]["added"]
        rate = results["stream_at_800"]
        checks = {
            "added_ttft_p50_ms_at_50": at50["p50"] <= TARGETS["added_ttft_p50_ms_at_50"],
            "added_ttft_p95_ms_at_50": at50["p95"] <= TARGETS["added_ttft_p95_ms_at_50"],
            "delivered_share_min": rate["delivered_share"] >= TARGETS["delivered_share_min"],
            "frames_per_second_max": rate["frames_per_second"] <= TARGETS["frames_per_second_max"],
            "idle_rss_max_bytes": results["idle_sockets"]["daphne_rss_with_sockets_bytes"]
            < TARGETS["idle_rss_max_bytes"],
            "resume_p99_ms": all(
                r["resume_to_caught_up_ms"]["p99"] <= TARGETS["resume_p99_ms"] for r in results["resume"].values()
            ),
        }
        if "checkpoints" in results:
            checks["checkpoints_per_streaming_second_max"] = (
                results["checkpoints"]["per_streaming_second"] <= TARGETS["checkpoints_per_streaming_second_max"]
            )
        results.update(
            {
                "targets": TARGETS,
                "met": checks,
                "baseline": args.baseline,
                "source_rate_tokens_per_second": SOURCE_RATE,
                "channel_layer": "redis" if base_env.get("REDIS_URL") else "in-memory",
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
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
