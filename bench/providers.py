"""Per-token overhead of each provider adapter, and the highest rate one stream sustains.

    .venv/bin/python bench/providers.py [--tokens 2000] [--repeats 5] [--port 18190]

Starts two provider simulators (`manage.py simulate_providers`) in their own processes: one
pacing answers at 2,000 tokens a second, one unthrottled. Against the paced one, each adapter
streams an answer of `--tokens` tokens; the CPU time this process spends per token
(`time.process_time`, so the simulator's work is not counted) is compared with a bare
`httpx` client reading the same bytes without parsing them. The difference is the overhead
the adapter adds per token (target: under 50 µs). `stream_chat` (router: alias lookup,
first-token and between-token timeouts) is measured the same way over the Ollama adapter.
Against the unthrottled simulator, the best of three streams of 20,000 tokens per adapter gives
the highest rate a single stream sustains (target: 5,000 tokens a second), next to the rate
this process could take on a CPU of its own (tokens per CPU second).

Figures are printed and written to bench/results/providers.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "providers.json"
TARGET_OVERHEAD_US = 50.0
TARGET_RATE = 5000.0
PACED_RATE = 2000.0
MAX_RATE_TOKENS = 20000
MAX_RATE_RUNS = 3  # the best is kept: the highest rate a stream sustains
CHAT = [
    {"role": "system", "content": "You are a benchmark."},
    {"role": "user", "content": "Count for me, please."},
]


def start_simulator(port: int, rate: float) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "manage.py"),
            "simulate_providers",
            "--port",
            str(port),
            "--tokens-per-second",
            str(rate),
            "--skip-checks",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if " on " not in line:
        process.kill()
        raise SystemExit(f"The simulator did not start on port {port}: {line!r}")
    return process, line.split(" on ", 1)[1].split()[0]


def configure(db_path: str) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("DEBUG", "1")
    os.environ["DATABASE_URL"] = f"sqlite:///{db_path}"
    os.environ["OPENAI_API_KEY"] = "sk-bench"
    os.environ["ANTHROPIC_API_KEY"] = "sk-ant-bench"
    os.environ["LOG_LEVEL"] = "WARNING"
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    call_command("load_prices", stdout=open(os.devnull, "w"))


def point_at(url: str) -> None:
    from django.conf import settings

    from providers.clients import reset_clients

    settings.OLLAMA_HOST = url
    settings.OPENAI_BASE_URL = f"{url}/v1"
    settings.ANTHROPIC_BASE_URL = url
    settings.PROVIDER_FIRST_TOKEN_TIMEOUT = 30.0
    settings.PROVIDER_IDLE_TIMEOUT = 30.0
    reset_clients()


def model_for(provider: str, tokens: int) -> str:
    return {
        "ollama": f"bench-words-{tokens}",
        "openai": f"gpt-4o-words-{tokens}",
        "anthropic": f"claude-bench-words-{tokens}",
    }[provider]


def request_for(provider: str, url: str, tokens: int) -> tuple[str, dict, dict]:
    """The raw HTTP request each adapter makes, for the bare-httpx baseline."""
    model = model_for(provider, tokens)
    if provider == "ollama":
        return f"{url}/api/chat", {"model": model, "messages": CHAT, "stream": True}, {}
    if provider == "openai":
        body = {"model": model, "messages": CHAT, "stream": True, "stream_options": {"include_usage": True}}
        return f"{url}/v1/chat/completions", body, {"Authorization": "Bearer sk-bench"}
    body = {"model": model, "messages": CHAT[1:], "system": CHAT[0]["content"], "max_tokens": 100000, "stream": True}
    return f"{url}/v1/messages", body, {"x-api-key": "sk-bench", "anthropic-version": "2023-06-01"}


async def run_adapter(kind: str, tokens: int) -> tuple[int, float, float]:
    """One stream through an adapter (or the router): tokens seen, CPU seconds, wall seconds."""
    from providers.base import StreamOptions, Usage
    from providers.router import get_adapter, stream_chat

    options = StreamOptions(max_tokens=100000)
    if kind == "router":
        stream = stream_chat(f"ollama:{model_for('ollama', tokens)}", CHAT, options)
    else:
        stream = get_adapter(kind).stream(model_for(kind, tokens), CHAT, options)
    seen = 0
    usage = None
    cpu0, wall0 = time.process_time(), time.perf_counter()
    async for item in stream:
        if isinstance(item, Usage):
            usage = item
        else:
            seen += 1
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    assert usage is not None and usage.completion_tokens == tokens == seen, (kind, seen, usage)
    return seen, cpu, wall


async def run_raw(client, provider: str, url: str, tokens: int) -> tuple[int, float, float]:
    """The same stream read by bare httpx, bytes only: the floor any client pays."""
    target, body, headers = request_for(provider, url, tokens)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    async with client.stream("POST", target, json=body, headers=headers) as response:
        assert response.status_code == 200, response.status_code
        async for _chunk in response.aiter_raw():
            pass
    return tokens, time.process_time() - cpu0, time.perf_counter() - wall0


async def measure(paced_url: str, fast_url: str, tokens: int, repeats: int) -> dict:
    import httpx

    kinds = ["ollama", "openai", "anthropic", "router"]
    results: dict = {"per_token": {}, "max_rate": {}}
    async with httpx.AsyncClient(timeout=60) as raw_client:
        # Warm up clients, imports and connections on both servers.
        for url in (paced_url, fast_url):
            point_at(url)
            for kind in kinds:
                await run_adapter(kind, 20)
            for provider in ("ollama", "openai", "anthropic"):
                await run_raw(raw_client, provider, url, 20)

        point_at(paced_url)
        for kind in kinds:
            provider = "ollama" if kind == "router" else kind
            adapter_us, base_us, walls = [], [], []
            # Interleaved, so both see the same machine load; the median difference is kept.
            for _ in range(repeats):
                base_us.append((await run_raw(raw_client, provider, paced_url, tokens))[1] / tokens * 1e6)
                _, cpu, wall = await run_adapter(kind, tokens)
                adapter_us.append(cpu / tokens * 1e6)
                walls.append(wall)
            added = sorted(a - b for a, b in zip(adapter_us, base_us, strict=True))
            median_added = added[len(added) // 2]
            results["per_token"][kind] = {
                "rate_tokens_per_s": PACED_RATE,
                "tokens": tokens,
                "runs": repeats,
                "cpu_us_per_token": round(sorted(adapter_us)[len(adapter_us) // 2], 2),
                "baseline_httpx_cpu_us_per_token": round(sorted(base_us)[len(base_us) // 2], 2),
                "added_us_per_token": round(median_added, 2),
                "added_us_per_token_range": [round(added[0], 2), round(added[-1], 2)],
                "wall_s": round(min(walls), 3),
                "ideal_wall_s": round(tokens / PACED_RATE, 3),
                "meets_target": median_added < TARGET_OVERHEAD_US,
            }

        point_at(fast_url)
        results["client_cpu_ceiling"] = {}
        for provider in ("ollama", "openai", "anthropic"):
            walls = [(await run_raw(raw_client, provider, fast_url, MAX_RATE_TOKENS))[2] for _ in range(MAX_RATE_RUNS)]
            results["max_rate"][f"httpx_raw_{provider}"] = round(MAX_RATE_TOKENS / min(walls))
        for kind in kinds:
            runs = [await run_adapter(kind, MAX_RATE_TOKENS) for _ in range(MAX_RATE_RUNS)]
            results["max_rate"][kind] = round(MAX_RATE_TOKENS / min(r[2] for r in runs))
            # What this process could take if it had a CPU to itself: tokens per CPU second.
            results["client_cpu_ceiling"][kind] = round(MAX_RATE_TOKENS / min(r[1] for r in runs))
        results["max_rate_meets_target"] = {kind: results["max_rate"][kind] >= TARGET_RATE for kind in kinds}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2000, help="Tokens per paced stream (default 2000: 1 s each).")
    parser.add_argument("--repeats", type=int, default=5, help="Paced streams per adapter (median kept).")
    parser.add_argument(
        "--port", type=int, default=18190, help="Port of the paced simulator; the next one is used too."
    )
    args = parser.parse_args()

    paced, paced_url = start_simulator(args.port, PACED_RATE)
    fast, fast_url = start_simulator(args.port + 1, 0)
    try:
        with tempfile.TemporaryDirectory() as folder:
            configure(str(Path(folder) / "bench.sqlite3"))
            started = time.perf_counter()
            results = asyncio.run(measure(paced_url, fast_url, args.tokens, args.repeats))
            results["runtime_s"] = round(time.perf_counter() - started, 1)
    finally:
        for process in (paced, fast):
            process.terminate()
            process.wait(10)

    results["targets"] = {"added_us_per_token": TARGET_OVERHEAD_US, "tokens_per_s_one_stream": TARGET_RATE}
    results["machine"] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()),
    }
    results["command"] = "python bench/providers.py " + " ".join(sys.argv[1:])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")

    print(f"Per-token cost at {PACED_RATE:g} tokens/s ({args.tokens} tokens, median of {args.repeats}):")
    print(
        f"  {'adapter':<10} {'CPU µs/token':>13} {'bare httpx':>11} {'added':>8} {'range':>15}"
        f"  target < {TARGET_OVERHEAD_US:g} µs"
    )
    for kind, row in results["per_token"].items():
        verdict = "ok" if row["meets_target"] else "MISSED"
        low, high = row["added_us_per_token_range"]
        print(
            f"  {kind:<10} {row['cpu_us_per_token']:>13.1f} {row['baseline_httpx_cpu_us_per_token']:>11.1f} "
            f"{row['added_us_per_token']:>8.1f} {f'{low:.1f}..{high:.1f}':>15}  {verdict}"
        )
    print(
        f"Highest rate one stream sustains ({MAX_RATE_TOKENS} tokens, simulator unthrottled, best of {MAX_RATE_RUNS}):"
    )
    for kind, rate in results["max_rate"].items():
        ceiling = results["client_cpu_ceiling"].get(kind)
        extra = f"   (client CPU ceiling {ceiling} tokens/s)" if ceiling else ""
        print(f"  {kind:<20} {rate:>8} tokens/s{extra}")
    print(f"Written to {RESULTS.relative_to(ROOT)} (runtime {results['runtime_s']} s)")


if __name__ == "__main__":
    main()
