"""Side by side on one machine: the simulator direct, LiteLLM's proxy, and the product's gateway.

    make bench-peers                                   # one process each side
    make bench-peers PEERS_ARGS="--processes 2"        # LiteLLM with 2 workers, 2 daphnes behind HAProxy
    make bench-peers PEERS_ARGS="--profile"            # py-spy over the product's gateway path

The same client (httpx, OpenAI's /v1/chat/completions, ~50-token answers, each worker one
consultant continuing its own conversation) calls three targets that share one upstream,
the provider simulator (unpaced, so the proxies' own costs show):

- direct: the simulator itself, the floor every "added" figure is measured from;
- LiteLLM: its proxy (`litellm --config`, a master key, no database), from bench/.peers-venv;
- the product: daphne with DEBUG off on PostgreSQL, a client-bound API token per worker;
  with --processes N, N daphnes behind HAProxy (scripts/serve_multi.py) and LiteLLM with N workers.

One interleaved run: every phase runs against the three targets in turn (the order rotates
each repetition), three repetitions, so the machine's swings hit all three alike. CPU per call
is read from /proc around the measured calls only: LiteLLM's process tree; the product's
daphnes, HAProxy and the PostgreSQL backends serving its database. Each cell is printed with
its range over the repetitions and the ratio product/LiteLLM, worked out within each
repetition. Results go to bench/results/peers.json (peers-2p.json with two processes).

--profile instead runs py-spy (from the bench venv) on one daphne while 600 streamed and
then 600 non-streamed calls run at concurrency 10, and prints where the CPU goes: by
library, by what the project's code calls, and by function. The collapsed stacks are kept
(gzipped) in bench/results/profiles/ for flame graphs; the summary goes to bench/results/peers-profile.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
# bench/gateway.py: the phase runner, percentiles and /proc CPU; scripts/serve_multi.py: the front.
import gateway
import serve_multi

ROOT = gateway.ROOT
RESULTS = ROOT / "bench" / "results"
PEERS_VENV = ROOT / "bench" / ".peers-venv"
LITELLM = PEERS_VENV / "bin" / "litellm"
PYSPY = PEERS_VENV / "bin" / "py-spy"
LITELLM_VERSION = "1.108.7"
DEFAULT_DATABASE = "postgres://postgres@127.0.0.1:5432/bench_peers"

MODEL = "gpt-4o-words-50"  # ~50-token answers
# A real model's pace: 300 ms to the first token, then 50 tokens a second.
PACED_MODEL = "gpt-4o-ttft-300-rate-50-words-50"
HZ = os.sysconf("SC_CLK_TCK")

# figure, phase, metric, direction ("low": lower is better), target ratio product/LiteLLM
ROWS = [
    ("added time to first token, 1 call at a time, p50 (ms)", "stream_c1", "added_first_p50", "low", 1.0),
    ("added total, not streaming, 1 at a time, p50 (ms)", "no_stream_c1", "added_total_p50", "low", None),
    ("added first token, 50 at a time, p50 (ms)", "stream_c50", "added_first_p50", "low", None),
    ("calls/s at 50 concurrent, streaming", "stream_c50", "calls_per_second", "high", 2.0),
    ("calls/s at 50 concurrent, not streaming", "no_stream_c50", "calls_per_second", "high", 1.0),
    ("CPU per streamed call (ms)", "stream_c50", "cpu_ms_per_call", "low", 0.5),
    ("CPU per non-streamed call (ms)", "no_stream_c50", "cpu_ms_per_call", "low", 1.0),
    ("paced model (300 ms to first token), added first token, p50 (ms)", "paced_c1", "added_first_p50", "low", 1.0),
]


# --- the client ---------------------------------------------------------------------------------
async def openai_call(client: httpx.AsyncClient, url: str, headers: dict, messages: list, stream: bool, model: str):
    """One Chat Completions call; return (first-content seconds, total seconds, answer text)."""
    body = {"model": model, "messages": messages, "stream": stream}
    started = time.perf_counter()
    first = None
    parts: list[str] = []
    if stream:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                raise RuntimeError(f"{url}: {response.status_code} {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"{url}: {chunk['error']}")
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content") or ""
                    if text and first is None:
                        first = time.perf_counter() - started
                    parts.append(text)
    else:
        response = await client.post(url, json=body, headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {response.text[:200]}")
        parts.append(response.json()["choices"][0]["message"]["content"] or "")
    total = time.perf_counter() - started
    return (first if first is not None else total), total, "".join(parts)


# --- CPU from /proc -------------------------------------------------------------------------------
def cpu_of(pid: int) -> float:
    """User + system CPU seconds of a live process (0 when it is gone)."""
    try:
        return gateway.cpu_seconds(pid)
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0


def process_tree(root: int) -> list[int]:
    """`root` and every process descended from it (LiteLLM's uvicorn workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / HZ, sum(fields) / HZ


@dataclass
class CpuMeter:
    """CPU seconds a target's processes spend between start() and end(), by part."""

    parts: Callable[[], dict[str, list[int]]]
    before: dict[str, dict[int, float]] = field(default_factory=dict)
    machine_before: tuple[float, float] = (0.0, 0.0)
    wall_before: float = 0.0
    result: dict = field(default_factory=dict)

    def __call__(self, moment: str) -> None:
        if moment == "start":
            self.before = {name: {pid: cpu_of(pid) for pid in pids} for name, pids in self.parts().items()}
            self.machine_before = machine_busy()
            self.wall_before = time.perf_counter()
            return
        wall = time.perf_counter() - self.wall_before
        busy, _total = machine_busy()
        spent = {}
        for name, pids in self.parts().items():
            # A process born during the phase (a new PostgreSQL backend) counts from zero.
            spent[name] = sum(max(0.0, cpu_of(pid) - self.before.get(name, {}).get(pid, 0.0)) for pid in pids)
        self.result = {
            "cpu_seconds": {name: round(value, 4) for name, value in spent.items()},
            "machine_busy_cores": round((busy - self.machine_before[0]) / wall, 2) if wall else None,
        }


# --- the targets ---------------------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    base: str
    tokens: list[str]
    model_prefix: str
    parts: Callable[[], dict[str, list[int]]]

    def model(self, name: str) -> str:
        return self.model_prefix + name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_database(url: str) -> None:
    """Create the benchmark's PostgreSQL database when it does not exist yet."""
    import psycopg

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    with psycopg.connect(urlunsplit(parts._replace(path="/postgres")), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{name}"')


class Backends:
    """PIDs of the PostgreSQL backends connected to the product's database (not this one's)."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.conn = psycopg.connect(url, autocommit=True)

    def pids(self) -> list[int]:
        rows = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND backend_type = 'client backend'"
        ).fetchall()
        # Backends on another machine (or container) have no /proc entry here: they count as 0.
        return [pid for (pid,) in rows if Path(f"/proc/{pid}").exists()]

    def close(self) -> None:
        self.conn.close()


def litellm_config(sim_port: int, models: list[str]) -> str:
    lines = ["model_list:"]
    for model in models:
        lines += [
            f"  - model_name: {model}",
            "    litellm_params:",
            f"      model: openai/{model}",
            f"      api_base: http://127.0.0.1:{sim_port}/v1",
            "      api_key: sk-simulator-not-a-real-key",
        ]
    return "\n".join(lines) + "\n"


def start_litellm(workdir: Path, sim_port: int, port: int, workers: int, master_key: str) -> subprocess.Popen:
    if not LITELLM.exists():
        raise SystemExit(f"{LITELLM} is missing: run `make bench-peers` (it installs LiteLLM {LITELLM_VERSION}).")
    config = workdir / "litellm.yaml"
    config.write_text(litellm_config(sim_port, [MODEL, PACED_MODEL]))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "REDIS_URL"))},
        "LITELLM_MASTER_KEY": master_key,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no network: read the bundled price map
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
    }
    return subprocess.Popen(
        [str(LITELLM), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
        + (["--num_workers", str(workers)] if workers > 1 else []),
        cwd=workdir,
        env=env,
        stdout=(workdir / "litellm.log").open("w"),
        stderr=subprocess.STDOUT,
    )


def product_env(sim_port: int, db_url: str, redis_url: str) -> dict[str, str]:
    env = gateway.server_env(None, db_url, sim_port)
    env.update(
        OPENAI_BASE_URL=f"http://127.0.0.1:{sim_port}/v1",
        OPENAI_API_KEY="sk-simulator-not-a-real-key",
        ANTHROPIC_BASE_URL=f"http://127.0.0.1:{sim_port}",
        ANTHROPIC_API_KEY="sk-ant-simulator-not-a-real-key",
    )
    env.pop("REDIS_URL", None)
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


def prepare_product(env: dict[str, str], workers: int) -> list[str]:
    """Migrate, load prices, and issue a client-bound token per worker (bench/gateway.py's helper)."""
    tokens = gateway.prepare_database(env, workers)
    subprocess.run([sys.executable, "manage.py", "load_prices"], cwd=ROOT, env=env, check=True, capture_output=True)
    return tokens


def wait_until(url: str, process: subprocess.Popen, log: Path | None, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise SystemExit(f"{process.args[0]} exited with {process.returncode} before answering {url}\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        time.sleep(0.2)
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s")


@dataclass
class Bench:
    """The simulator, LiteLLM and the product, started together and stopped together."""

    args: argparse.Namespace
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="peers-bench-")))
    processes: list[subprocess.Popen] = field(default_factory=list)
    front: serve_multi.Front | None = None
    backends: Backends | None = None
    redis: subprocess.Popen | None = None
    targets: list[Target] = field(default_factory=list)
    db_url: str = ""
    redis_url: str = ""

    def start(self, *, with_litellm: bool = True) -> None:
        args = self.args
        sim_port, litellm_port, product_port = free_port(), free_port(), free_port()
        self.db_url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE
        if not self.db_url.startswith(("postgres://", "postgresql://")):
            raise SystemExit(f"The product runs on PostgreSQL here; DATABASE_URL is {self.db_url.split('://')[0]}.")
        ensure_database(self.db_url)
        self.redis_url = os.environ.get("REDIS_URL", "")
        if args.processes > 1 and not self.redis_url:
            self.redis_url = self._start_redis()
        env = product_env(sim_port, self.db_url, self.redis_url)
        workers = max(args.concurrency, 10)
        tokens = prepare_product(env, workers)

        simulator = subprocess.Popen(
            [sys.executable, "manage.py", "simulate_providers", "--port", str(sim_port), "--tokens-per-second", "0"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        self.processes.append(simulator)
        wait_until(f"http://127.0.0.1:{sim_port}/api/version", simulator, None)
        self.targets.append(
            Target("direct", f"http://127.0.0.1:{sim_port}", ["sk-simulator"] * workers, "", lambda: {})
        )
        simulator_pid = simulator.pid
        self.targets[0].parts = lambda: {"simulator": [simulator_pid]}

        if with_litellm:
            key = "sk-bench-" + secrets.token_hex(16)
            litellm = start_litellm(self.workdir, sim_port, litellm_port, args.processes, key)
            self.processes.append(litellm)
            base = f"http://127.0.0.1:{litellm_port}"
            wait_until(f"{base}/health/liveliness", litellm, self.workdir / "litellm.log")
            self.targets.append(
                Target("litellm", base, [key] * workers, "", lambda: {"litellm": process_tree(litellm.pid)})
            )

        self.backends = Backends(self.db_url)
        backends = self.backends
        if args.processes > 1 or args.front:
            self.front = serve_multi.Front(
                processes=args.processes, port=product_port, environ=env, log_dir=self.workdir / "front"
            ).start()
            front = self.front

            def product_parts() -> dict[str, list[int]]:
                return {
                    "daphne": [p.pid for p in front.daphnes],
                    "haproxy": [front.haproxy.pid] if front.haproxy else [],
                    "postgres": backends.pids(),
                }

        else:
            daphne = subprocess.Popen(
                [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(product_port), "config.asgi:application"],
                cwd=ROOT,
                env=env,
                stdout=(self.workdir / "daphne.log").open("w"),
                stderr=subprocess.STDOUT,
            )
            self.processes.append(daphne)

            def product_parts() -> dict[str, list[int]]:
                return {"daphne": [daphne.pid], "postgres": backends.pids()}

        base = f"http://127.0.0.1:{product_port}"
        wait_until(f"{base}/api/version", self.processes[-1] if self.front is None else self.front.haproxy, None)
        self.targets.append(Target("product", base, tokens, "openai:", product_parts))

    def daphne_pids(self) -> list[int]:
        if self.front is not None:
            return [p.pid for p in self.front.daphnes]
        return [self.processes[-1].pid]

    def _start_redis(self) -> str:
        if shutil.which("redis-server") is None:
            raise SystemExit("Several processes need Redis: set REDIS_URL or install redis-server.")
        port = free_port()
        self.redis = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return f"redis://127.0.0.1:{port}/0"
            time.sleep(0.05)
        raise SystemExit("redis-server did not start")

    def stop(self) -> None:
        if self.front is not None:
            self.front.stop()
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        if self.backends is not None:
            self.backends.close()
        if self.redis is not None:
            self.redis.terminate()
            self.redis.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)


# --- the comparison --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    name: str
    concurrency: int
    stream: bool
    model: str
    calls: int


def phases(args) -> list[Phase]:
    return [
        Phase("stream_c1", 1, True, MODEL, args.calls),
        Phase("no_stream_c1", 1, False, MODEL, args.calls),
        Phase(f"stream_c{args.concurrency}", args.concurrency, True, MODEL, args.concurrent_calls),
        Phase(f"no_stream_c{args.concurrency}", args.concurrency, False, MODEL, args.concurrent_calls),
        Phase("paced_c1", 1, True, PACED_MODEL, args.paced_calls),
    ]


def run_phase(target: Target, phase: Phase) -> dict:
    meter = CpuMeter(target.parts)
    summary = asyncio.run(
        gateway.run_phase(
            target.base,
            target.tokens,
            phase.concurrency,
            phase.calls,
            phase.stream,
            target.model(phase.model),
            call=openai_call,
            path="/v1/chat/completions",
            probe=meter,
        )
    )
    summary.update(meter.result)
    calls = summary["requests"]
    summary["cpu_ms_per_call"] = {
        name: round(seconds / calls * 1000, 3) if calls else None
        for name, seconds in meter.result["cpu_seconds"].items()
    }
    summary["cpu_ms_per_call_total"] = (
        round(sum(meter.result["cpu_seconds"].values()) / calls * 1000, 3) if calls else None
    )
    return summary


def metric(results: dict, phase: str, target: str, name: str) -> float | None:
    cell = results[phase][target]
    direct = results[phase]["direct"]
    if name == "added_first_p50":
        return round(cell["first_ms"]["p50"] - direct["first_ms"]["p50"], 2)
    if name == "added_total_p50":
        return round(cell["total_ms"]["p50"] - direct["total_ms"]["p50"], 2)
    if name == "calls_per_second":
        return cell["requests_per_second"]
    if name == "cpu_ms_per_call":
        return cell["cpu_ms_per_call_total"]
    raise KeyError(name)


def span(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    low, high = min(values), max(values)
    fmt = "{:.2f}" if max(abs(low), abs(high)) < 10 else "{:.0f}" if max(abs(low), abs(high)) >= 100 else "{:.1f}"
    return fmt.format(low) if fmt.format(low) == fmt.format(high) else f"{fmt.format(low)}–{fmt.format(high)}"


def table(repetitions: list[dict], concurrency: int) -> tuple[list[dict], str]:
    rows, lines = [], []
    header = "| figure | LiteLLM | product | ratio product/LiteLLM | target | met |"
    lines += [header, "|---|---|---|---|---|---|"]
    for figure, phase, name, direction, target in ROWS:
        phase = phase.replace("c50", f"c{concurrency}")
        figure = figure.replace("50 at", f"{concurrency} at").replace("50 concurrent", f"{concurrency} concurrent")
        litellm = [metric(r, phase, "litellm", name) for r in repetitions]
        product = [metric(r, phase, "product", name) for r in repetitions]
        ratios = [
            round(mine / theirs, 2) if mine is not None and mine >= 0 and theirs is not None and theirs > 0 else None
            for mine, theirs in zip(product, litellm, strict=True)
        ]
        known = [r for r in ratios if r is not None]
        met = None
        if target is not None and known:
            median = statistics.median(known)
            met = median <= target if direction == "low" else median >= target
        rows.append(
            {
                "figure": figure,
                "phase": phase,
                "litellm": litellm,
                "product": product,
                "ratio": ratios,
                "better": direction,
                "target_ratio": target,
                "target_met_by_median": met,
            }
        )
        goal = "" if target is None else (f"≤ {target}×" if direction == "low" else f"≥ {target}×")
        lines.append(
            f"| {figure} | {span(litellm)} | {span(product)} | {span(ratios)}× | {goal} | "
            f"{'' if met is None else ('yes' if met else 'no')} |"
        )
    return rows, "\n".join(lines)


def compare(args) -> None:
    bench = Bench(args)
    load_before = [round(x, 2) for x in os.getloadavg()]
    repetitions: list[dict] = []
    loads: list[list[float]] = []
    started = time.time()
    try:
        bench.start()
        names = [t.name for t in bench.targets]
        print(
            f"targets: {', '.join(names)}; {args.processes} process(es) each side; load average {load_before}",
            flush=True,
        )
        for repetition in range(args.repetitions):
            order = bench.targets[repetition % 3 :] + bench.targets[: repetition % 3]
            results: dict = {}
            for phase in phases(args):
                results[phase.name] = {}
                for target in order:
                    summary = run_phase(target, phase)
                    results[phase.name][target.name] = summary
                    first = summary["first_ms"]["p50"] if phase.stream else summary["total_ms"]["p50"]
                    print(
                        f"  rep {repetition + 1} {phase.name:>14} {target.name:>8}: "
                        f"{'first' if phase.stream else 'total'} p50 {first:8.2f} ms, "
                        f"{summary['requests_per_second']:6.1f} calls/s, "
                        f"CPU {summary['cpu_ms_per_call_total']} ms/call {summary['cpu_ms_per_call']}, "
                        f"machine busy {summary['machine_busy_cores']} cores"
                        + (f"  ERRORS {summary['errors']}: {summary.get('first_error')}" if summary["errors"] else ""),
                        flush=True,
                    )
            loads.append([round(x, 2) for x in os.getloadavg()])
            print(f"  rep {repetition + 1} done; load average {loads[-1]}", flush=True)
            repetitions.append(results)
    finally:
        bench.stop()
    rows, text = table(repetitions, args.concurrency)
    print()
    print(text)
    print(f"\nload average before {load_before}, after each repetition {loads}")
    product_parts = {
        phase: {
            part: span([r[phase]["product"]["cpu_ms_per_call"].get(part) for r in repetitions])
            for part in repetitions[0][phase]["product"]["cpu_ms_per_call"]
        }
        for phase in (f"stream_c{args.concurrency}", f"no_stream_c{args.concurrency}")
    }
    print(f"product CPU per call by process (ms): {product_parts}")
    report = {
        "what": "the simulator direct, LiteLLM's proxy and the product's gateway, side by side (issue 16)",
        "command": "bench/peers.py " + " ".join(sys.argv[1:]),
        "litellm": LITELLM_VERSION,
        "processes_each_side": args.processes,
        "front": "haproxy" if bench.front is not None else None,
        "route": "/v1/chat/completions",
        "models": {"answers": MODEL, "paced": PACED_MODEL},
        "database": "postgresql",
        "redis": bool(bench.redis_url),
        "calls": {"c1": args.calls, "concurrent": args.concurrent_calls, "paced": args.paced_calls},
        "concurrency": args.concurrency,
        "repetitions": args.repetitions,
        "table": rows,
        "product_cpu_ms_per_call_by_process": product_parts,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_before": load_before,
            "load_average_after_each_repetition": loads,
        },
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started),
        "repetitions_detail": repetitions,
    }
    out = args.out or RESULTS / ("peers.json" if args.processes == 1 else f"peers-{args.processes}p.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


# --- the profile -------------------------------------------------------------------------------------------
# (category, pattern on the frame's file as py-spy names it: relative to its sys.path entry),
# first match wins. A standard-library frame counts for its nearest caller that is not
# (json.dumps called by Django is Django's).
CATEGORIES = [
    ("psycopg (driver)", re.compile(r"^psycopg(_pool|_binary|_c)?/")),
    ("Django ORM", re.compile(r"^django/db/")),
    ("Django request/response", re.compile(r"^django/")),
    ("openai SDK", re.compile(r"^openai/")),
    ("anthropic SDK", re.compile(r"^anthropic/")),
    ("pydantic", re.compile(r"^pydantic(_core)?/")),
    ("httpx/httpcore", re.compile(r"^(httpx2?|httpcore2?|h11|anyio|sniffio)/")),
    ("Twisted", re.compile(r"^twisted/")),
    ("daphne", re.compile(r"^daphne/")),
    ("autobahn/txaio", re.compile(r"^(autobahn|txaio)/")),
    ("asgiref", re.compile(r"^asgiref/")),
    ("channels", re.compile(r"^channels(_redis)?/")),
    ("project: sessions_app", re.compile(r"^sessions_app/")),
    ("project: billing", re.compile(r"^billing/")),
    ("project: providers", re.compile(r"^providers/")),
    ("project: config", re.compile(r"^config/")),
]
PROJECT = re.compile(r"^(sessions_app|billing|providers|config)/")
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*)\)$")
# Leaf frames that wait rather than compute (a thread parked on a queue, a lock or a socket):
# py-spy's --gil leaves them out already; any that remain are counted apart.
WAITING = {
    "_worker (concurrent/futures/thread.py)",
    "Condition.wait (threading.py)",
    "Thread._wait_for_tstate_lock (threading.py)",
    "Connection.wait (psycopg/connection.py)",
    "EpollSelector.select (selectors.py)",
    "untilConcludes (twisted/python/util.py)",
}


def frame_parts(frame: str) -> tuple[str, str]:
    match = FRAME.match(frame)
    return (match["func"], match["file"]) if match else (frame, "")


def category_of(path: str) -> str | None:
    """The library a frame's file belongs to; None for the standard library."""
    for name, pattern in CATEGORIES:
        if pattern.search(path):
            return name
    top = path.split("/", 1)[0].removesuffix(".py")
    if path.startswith("<") or top in sys.stdlib_module_names:
        return None
    return f"other: {top}"


def short(path: str) -> str:
    return path.split("/site-packages/", 1)[-1].removeprefix(f"{ROOT}/")


def summarize_profile(collapsed: Path, calls: int, rate: int, cpu_ms_per_call: float) -> dict:
    """Where the samples go: by library (self time), by what project code calls, by function."""
    by_category: Counter = Counter()
    by_callee: Counter = Counter()
    self_time: Counter = Counter()
    project_inclusive: Counter = Counter()
    waiting: Counter = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        count = int(count)
        frames = [frame_parts(f) for f in stack.split(";")]
        frames = [(func, file) for func, file in frames if file]  # drop the thread/process labels
        if not frames:
            continue
        leaf_func, leaf_file = frames[-1]
        leaf = f"{leaf_func} ({short(leaf_file)})"
        if leaf in WAITING:
            waiting[leaf] += count
            continue
        total += count
        self_time[leaf] += count
        # Self time by library: the leaf, or its nearest caller outside the standard library.
        category = None
        for _func, file in reversed(frames):
            category = category_of(file)
            if category:
                break
        by_category[category or "standard library only (event loop, threads)"] += count
        # What the project's code called: the callee of the deepest project frame.
        deepest = max((i for i, (_f, file) in enumerate(frames) if PROJECT.search(file)), default=None)
        if deepest is None:
            outer = next((category_of(file) for _f, file in frames if category_of(file)), None)
            by_callee[f"outside project code: {outer or 'standard library'}"] += count
        elif deepest == len(frames) - 1:
            by_callee[f"project code itself: {frames[deepest][0]} ({short(frames[deepest][1])})"] += count
        else:
            callee = next(
                (category_of(file) for _f, file in frames[deepest + 1 :] if category_of(file)), "standard library"
            )
            caller = f"{frames[deepest][0]} ({short(frames[deepest][1])})"
            by_callee[f"{callee} called from {caller}"] += count
        seen = set()
        for func, file in frames:
            if PROJECT.search(file):
                key = f"{func} ({short(file)})"
                if key not in seen:
                    seen.add(key)
                    project_inclusive[key] += count

    def top(counter: Counter, n: int) -> list[dict]:
        return [
            {
                "what": key,
                "percent": round(100 * value / total, 1),
                "ms_per_call": round(value / rate / calls * 1000, 3),
            }
            for key, value in counter.most_common(n)
        ]

    return {
        "samples": total,
        "rate_hz": rate,
        "calls": calls,
        "sampled_ms_per_call": round(total / rate / calls * 1000, 2),
        "waiting_samples_left_out": dict(waiting),
        "cpu_ms_per_call_from_proc": cpu_ms_per_call,
        "by_library_self": top(by_category, 30),
        "by_what_project_code_calls": top(by_callee, 30),
        "project_functions_inclusive": top(project_inclusive, 30),
        "functions_self": top(self_time, 40),
    }


def profile(args) -> None:
    if not PYSPY.exists():
        raise SystemExit(f"{PYSPY} is missing: run `make bench-peers` (it installs py-spy into bench/.peers-venv).")
    args.processes = 1
    bench = Bench(args)
    folder = RESULTS / "profiles"
    folder.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "what": "py-spy over one daphne serving /v1/chat/completions (product only), concurrency "
        f"{args.profile_concurrency}, {args.profile_calls} calls per mode",
        "command": "bench/peers.py " + " ".join(sys.argv[1:]),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "modes": {},
    }
    try:
        bench.start(with_litellm=False)
        product = bench.targets[-1]
        daphne = bench.daphne_pids()[0]
        for stream in (True, False):
            mode = "stream" if stream else "no_stream"
            collapsed = folder / f"peers-{mode}.txt"
            # Warm up first, so start-up imports and the first connections stay out of the profile.
            run_phase(product, Phase("warm-up", args.profile_concurrency, stream, MODEL, 100))
            spy = subprocess.Popen(
                [
                    str(PYSPY),
                    "record",
                    "--pid",
                    str(daphne),
                    "--rate",
                    str(args.profile_rate),
                    "--format",
                    "raw",
                    "--nolineno",
                    # Only the thread holding the GIL: Python's CPU, not threads parked on I/O.
                    "--gil",
                    "--output",
                    str(collapsed),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            time.sleep(1.0)  # py-spy attaches
            summary = run_phase(product, Phase(mode, args.profile_concurrency, stream, MODEL, args.profile_calls))
            spy.send_signal(signal.SIGINT)
            _out, err = spy.communicate(timeout=60)
            if not collapsed.exists():
                raise SystemExit(f"py-spy wrote nothing: {err.decode()[-500:]}")
            # The idle second before the calls holds no samples of a busy thread; ms per call
            # counts every call py-spy saw: the measured ones and the phase's warm-up.
            calls = summary["requests"] + 2 * args.profile_concurrency
            cpu = summary["cpu_ms_per_call"]
            result = summarize_profile(collapsed, calls, args.profile_rate, cpu)
            # Kept gzipped (a tenth of the size): `zcat … | flamegraph.pl`, or speedscope.
            with collapsed.open("rb") as raw, gzip.open(f"{collapsed}.gz", "wb", compresslevel=9) as packed:
                shutil.copyfileobj(raw, packed)
            collapsed.unlink()
            result["calls_per_second"] = summary["requests_per_second"]
            report["modes"][mode] = result
            print(
                f"\n=== {mode}: {result['samples']} samples, {result['sampled_ms_per_call']} ms of Python per call "
                f"(CPU from /proc: {cpu} ms per call)"
            )
            for title, key in (
                ("by library (self time)", "by_library_self"),
                ("what the project's code spends it on", "by_what_project_code_calls"),
                ("project functions (inclusive)", "project_functions_inclusive"),
                ("functions (self time)", "functions_self"),
            ):
                print(f"  -- {title}")
                for item in result[key][:15]:
                    print(f"    {item['percent']:5.1f} %  {item['ms_per_call']:6.3f} ms/call  {item['what']}")
    finally:
        bench.stop()
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    out = args.out or RESULTS / "peers-profile.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=1, help="processes each side (default 1)")
    parser.add_argument("--front", action="store_true", help="put HAProxy in front even with one process")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--calls", type=int, default=100, help="measured calls of each 1-at-a-time phase")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--concurrent-calls", type=int, default=300, help="measured calls of each concurrent phase")
    parser.add_argument("--paced-calls", type=int, default=10, help="measured calls with the paced model")
    parser.add_argument("--profile", action="store_true", help="profile the product with py-spy instead")
    parser.add_argument("--profile-calls", type=int, default=600)
    parser.add_argument("--profile-concurrency", type=int, default=10)
    parser.add_argument("--profile-rate", type=int, default=250, help="py-spy samples a second")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    (profile if args.profile else compare)(args)


if __name__ == "__main__":
    main()
