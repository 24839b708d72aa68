"""The router and each adapter against the provider simulator over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from asgiref.sync import async_to_sync

from config.dbthread import db_sync_to_async
from providers.base import ChatMessage, ErrorKind, ProviderError, StreamOptions, Usage
from providers.naming import ModelRef
from providers.router import available_models, context_window, stream_chat, validate_model
from providers.simulator import count_prompt_tokens


def in_sync_thread(test):
    """Run an async test through `async_to_sync`, as Django runs async tests: database work the
    router hands to `db_sync_to_async` then runs on this thread's connection, inside the
    test's transaction, so no test needs a (slow) transactional database."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        return async_to_sync(test)(*args, **kwargs)

    return wrapper


CHAT: list[ChatMessage] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is a ledger?"},
    {"role": "assistant", "content": "A book of accounts."},
    {"role": "user", "content": "And a journal?"},
]
PROVIDERS = {"ollama": "ollama:llama3.2", "openai": "openai:gpt-4o", "anthropic": "anthropic:claude-sonnet-4"}
MODELS = list(PROVIDERS.values())


async def collect(model, messages=CHAT, options=None):
    texts, usages = [], []
    async for item in stream_chat(model, messages, options):
        (usages if isinstance(item, Usage) else texts).append(item)
    assert len(usages) == 1
    return "".join(texts), usages[0]


async def failure(model, messages=CHAT, options=None):
    texts = []
    with pytest.raises(ProviderError) as caught:
        async for item in stream_chat(model, messages, options):
            if isinstance(item, str):
                texts.append(item)
    return "".join(texts), caught.value


def faulty(provider: str, fault: str) -> str:
    return {
        "ollama": f"ollama:sim-{fault}",
        "openai": f"openai:gpt-4o-{fault}",
        "anthropic": f"anthropic:claude-{fault}",
    }[provider]


@pytest.mark.parametrize("model", MODELS)
@in_sync_thread
async def test_each_provider_streams_the_answer_then_exactly_one_provider_usage(use_simulator, model):
    text, usage = await collect(model)
    assert text == 'Simulated answer to "And a journal?" with 3 earlier messages in context.'
    assert usage.source == "provider"
    assert usage.completion_tokens == len(text.split())
    assert usage.prompt_tokens == count_prompt_tokens(CHAT)


@pytest.mark.parametrize("model", MODELS)
@in_sync_thread
async def test_the_answer_shows_how_much_context_was_carried(use_simulator, model):
    text, _ = await collect(model, [{"role": "user", "content": "Only this"}])
    assert "with 0 earlier messages" in text
    longer = [*CHAT, {"role": "assistant", "content": "A daybook."}, {"role": "user", "content": "Thanks"}]
    text, _ = await collect(model, longer)
    assert "with 5 earlier messages" in text


@pytest.mark.parametrize("model", MODELS)
@in_sync_thread
async def test_provider_counts_are_deterministic(use_simulator, model):
    _, first = await collect(model)
    _, second = await collect(model)
    assert (first.prompt_tokens, first.completion_tokens) == (second.prompt_tokens, second.completion_tokens)


@in_sync_thread
async def test_ollama_request_has_keep_alive_top_level_and_num_ctx_and_temperature_in_options(use_simulator, settings):
    settings.OLLAMA_NUM_CTX = 4096
    await collect("ollama:llama3.2:latest", CHAT, StreamOptions(temperature=0.2, keep_alive="30m", seed=7))
    request = use_simulator.requests[-1]
    body = request["body"]
    assert request["path"] == "/api/chat"
    assert body["model"] == "llama3.2:latest"
    assert body["keep_alive"] == "30m"
    assert body["options"] == {"num_ctx": 4096, "temperature": 0.2, "seed": 7}
    assert body["messages"] == CHAT
    assert body["stream"] is True


@in_sync_thread
async def test_ollama_usage_reports_the_tagged_model(use_simulator):
    _, usage = await collect("ollama:llama3.2")
    assert usage.provider_model == "llama3.2:latest"
    assert usage.stop_reason == "stop"


@in_sync_thread
async def test_openai_request_asks_for_the_usage_chunk_and_the_reply_names_the_snapshot(use_simulator):
    _, usage = await collect("openai:gpt-4o", CHAT, StreamOptions(temperature=0.5, max_tokens=100))
    request = use_simulator.requests[-1]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == "Bearer sk-simulator-test"
    assert request["body"]["stream_options"] == {"include_usage": True}
    assert request["body"]["max_completion_tokens"] == 100
    assert request["body"]["messages"] == CHAT
    assert usage.provider_model == "gpt-4o-2024-08-06"


@in_sync_thread
async def test_anthropic_request_has_top_level_system_max_tokens_and_merged_turns(use_simulator, settings):
    settings.ANTHROPIC_MAX_TOKENS = 777
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "First part."},
        {"role": "user", "content": "Second part."},
        {"role": "system", "content": "Use British spelling."},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "Go on"},
    ]
    text, usage = await collect("anthropic:claude-sonnet-4", messages)
    request = use_simulator.requests[-1]
    body = request["body"]
    assert body["model"] == "claude-sonnet-4-20250514"  # the alias was resolved
    assert body["system"] == "Be brief.\n\nUse British spelling."
    assert body["max_tokens"] == 777
    assert body["messages"] == [
        {"role": "user", "content": "First part.\n\nSecond part."},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "Go on"},
    ]
    assert request["headers"]["x-api-key"] == "sk-ant-simulator-test"
    assert request["headers"]["anthropic-version"] == "2023-06-01"
    assert "authorization" not in request["headers"]
    assert usage.provider_model == "claude-sonnet-4-20250514" and usage.stop_reason == "end_turn"
    assert "with 3 earlier messages" in text  # the top-level system prompt counts as one


@pytest.mark.parametrize(("model", "reason"), [(MODELS[0], "length"), (MODELS[1], "length"), (MODELS[2], "max_tokens")])
@in_sync_thread
async def test_max_tokens_cuts_the_answer_and_says_why(use_simulator, model, reason):
    text, usage = await collect(model, CHAT, StreamOptions(max_tokens=4))
    assert usage.completion_tokens == 4 == len(text.split())
    assert usage.stop_reason == reason


@pytest.mark.parametrize("provider", PROVIDERS)
@in_sync_thread
async def test_words_n_makes_the_answer_n_words_long(use_simulator, provider):
    text, usage = await collect(faulty(provider, "words-250"))
    assert len(text.split()) == 250 == usage.completion_tokens


@pytest.mark.parametrize("provider", PROVIDERS)
@in_sync_thread
async def test_multibyte_answers_arrive_intact(use_simulator, provider):
    text, _ = await collect(faulty(provider, "unicode"))
    assert "日本語" in text and "emoji🙂" in text and "\ufffd" not in text


# --- faults ----------------------------------------------------------------------------------------

STATUS_KINDS = [
    ("ollama", 400, ErrorKind.BAD_REQUEST),
    ("ollama", 429, ErrorKind.RATE_LIMITED),
    ("ollama", 500, ErrorKind.SERVER),
    ("ollama", 503, ErrorKind.OVERLOADED),
    ("openai", 400, ErrorKind.BAD_REQUEST),
    ("openai", 401, ErrorKind.AUTH),
    ("openai", 403, ErrorKind.AUTH),
    ("openai", 429, ErrorKind.RATE_LIMITED),
    ("openai", 500, ErrorKind.SERVER),
    ("openai", 503, ErrorKind.SERVER),
    ("anthropic", 400, ErrorKind.BAD_REQUEST),
    ("anthropic", 401, ErrorKind.AUTH),
    ("anthropic", 402, ErrorKind.AUTH),
    ("anthropic", 413, ErrorKind.BAD_REQUEST),
    ("anthropic", 429, ErrorKind.RATE_LIMITED),
    ("anthropic", 500, ErrorKind.SERVER),
    ("anthropic", 529, ErrorKind.OVERLOADED),
]


@pytest.mark.parametrize(("provider", "status", "kind"), STATUS_KINDS)
@in_sync_thread
async def test_an_error_status_is_a_typed_error_retried_only_when_retrying_helps(
    use_simulator, settings, provider, status, kind
):
    settings.PROVIDER_MAX_RETRIES = 2
    model = faulty(provider, f"fault-status-{status}")
    text, error = await failure(model)
    assert text == ""
    assert error.kind is kind
    assert error.status == status
    assert error.provider == provider
    attempts = [r for r in use_simulator.requests if r["model"] == model.split(":", 1)[1]]
    assert len(attempts) == (3 if error.retryable else 1)


@pytest.mark.parametrize("provider", PROVIDERS)
@in_sync_thread
async def test_a_model_named_missing_is_not_found_and_not_retried(use_simulator, provider):
    model = faulty(provider, "missing")
    _, error = await failure(model)
    assert error.kind is ErrorKind.NOT_FOUND and not error.retryable
    assert error.status == 404
    assert len(use_simulator.requests) == 1


@pytest.mark.parametrize("provider", PROVIDERS)
@in_sync_thread
async def test_a_mid_stream_error_keeps_the_text_so_far_and_is_never_retried(use_simulator, provider):
    text, error = await failure(faulty(provider, "fault-midstream"))
    assert text == "Simulated answer to"
    assert error.kind in (ErrorKind.SERVER, ErrorKind.OVERLOADED)
    assert "broke off" in error.message or "error" in error.message
    assert len(use_simulator.requests) == 1


@pytest.mark.parametrize("provider", PROVIDERS)
@in_sync_thread
async def test_a_cut_connection_is_a_connection_error_after_the_text_so_far(use_simulator, provider):
    text, error = await failure(faulty(provider, "fault-cut"))
    assert text == "Simulated answer to"
    assert error.kind is ErrorKind.CONNECTION
    assert len(use_simulator.requests) == 1


@pytest.mark.parametrize("provider", PROVIDERS)
@in_sync_thread
async def test_silence_between_tokens_times_out_and_closes_the_upstream(use_simulator, settings, provider):
    settings.PROVIDER_IDLE_TIMEOUT = 1.0
    text, error = await failure(faulty(provider, "fault-stall"))
    assert text == "Simulated answer to"
    assert error.kind is ErrorKind.TIMEOUT
    assert "no token for 1s" in error.message
    entry = use_simulator.requests[-1]
    assert await asyncio.to_thread(entry.wait_finished, 5)
    assert entry["disconnected"] is True


@pytest.mark.parametrize("provider", PROVIDERS)
@in_sync_thread
async def test_silence_before_the_first_token_times_out_without_retrying(use_simulator, settings, provider):
    await collect(PROVIDERS[provider])  # a warm client, so the time limit is spent waiting, not connecting
    use_simulator.clear_requests()
    settings.PROVIDER_FIRST_TOKEN_TIMEOUT = 1.0
    text, error = await failure(faulty(provider, "fault-stall-first"))
    assert text == ""
    assert error.kind is ErrorKind.TIMEOUT and not error.retryable
    assert "no first token within 1s" in error.message
    assert len(use_simulator.requests) <= 1  # a retry would have been a second request
    for entry in use_simulator.requests:
        assert await asyncio.to_thread(entry.wait_finished, 5)


@in_sync_thread
async def test_an_unreachable_ollama_is_a_connection_error_after_retries(use_simulator, settings):
    settings.OLLAMA_HOST = "http://127.0.0.1:9"  # discard port: nothing listens
    _, error = await failure("ollama:llama3.2")
    assert error.kind is ErrorKind.CONNECTION
    assert "is Ollama running?" in error.message


@pytest.mark.parametrize(("provider", "setting"), [("openai", "OPENAI_API_KEY"), ("anthropic", "ANTHROPIC_API_KEY")])
@in_sync_thread
async def test_a_paid_provider_without_a_key_fails_clearly(use_simulator, settings, provider, setting):
    setattr(settings, setting, "")
    _, error = await failure(PROVIDERS[provider])
    assert error.kind is ErrorKind.AUTH and not error.retryable
    assert setting in error.message
    assert use_simulator.requests == []


# --- cancellation --------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
@in_sync_thread
async def test_closing_the_stream_closes_the_upstream_connection(use_simulator, provider):
    stream = stream_chat(faulty(provider, "fault-slow-words-400"), CHAT)
    assert await stream.__anext__() == "Simulated"
    await stream.aclose()
    entry = use_simulator.requests[-1]
    assert await asyncio.to_thread(entry.wait_finished, 5)
    assert entry["outcome"] == "disconnected"
    assert entry["tokens_sent"] < 400


@pytest.mark.parametrize("provider", PROVIDERS)
@in_sync_thread
async def test_cancelling_the_consuming_task_closes_the_upstream_connection(use_simulator, provider):
    first = asyncio.Event()

    async def consume():
        async with contextlib.aclosing(stream_chat(faulty(provider, "fault-slow-words-400"), CHAT)) as stream:
            async for _item in stream:
                first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    entry = use_simulator.requests[-1]
    assert await asyncio.to_thread(entry.wait_finished, 5)
    assert entry["outcome"] == "disconnected"


# --- models -------------------------------------------------------------------------------------------


@in_sync_thread
async def test_available_models_lists_live_ollama_models_and_priced_paid_models(use_simulator):
    names = {m.name: m for m in await available_models()}
    assert {"ollama:llama3.2:latest", "ollama:qwen2.5:7b"} <= set(names)
    assert {
        "openai:gpt-4o",
        "openai:gpt-4o-mini",
        "anthropic:claude-sonnet-4",
        "anthropic:claude-sonnet-4-20250514",
    } <= set(names)
    assert names["anthropic:claude-sonnet-4"].context_window == 200000
    assert names["openai:gpt-4o"].paid and not names["ollama:llama3.2:latest"].paid


@in_sync_thread
async def test_available_models_leaves_out_providers_without_a_key(use_simulator, settings):
    settings.OPENAI_API_KEY = ""
    names = {m.name for m in await available_models()}
    assert not any(n.startswith("openai:") for n in names)
    assert any(n.startswith("anthropic:") for n in names)


@in_sync_thread
async def test_available_models_without_ollama_still_lists_paid_models(use_simulator, settings):
    settings.OLLAMA_HOST = "http://127.0.0.1:9"
    names = {m.name for m in await available_models()}
    assert not any(n.startswith("ollama:") for n in names)
    assert "openai:gpt-4o" in names


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ollama:llama3.2:latest", ModelRef("ollama", "llama3.2:latest")),
        ("llama3.2", ModelRef("ollama", "llama3.2")),
        ("openai:gpt-4o", ModelRef("openai", "gpt-4o")),
        ("openai:gpt-4o-2024-08-06", ModelRef("openai", "gpt-4o-2024-08-06")),
        ("anthropic:claude-sonnet-4", ModelRef("anthropic", "claude-sonnet-4")),
    ],
)
def test_validate_model_accepts_known_names(use_simulator, name, expected):
    assert validate_model(name) == expected


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "A model name is required"),
        ("openai:", "no model after the provider"),
        ("openai:gpt-9-unpriced", "no price on file"),
        ("anthropic:claude-nonexistent", "no price on file"),
        ("ollama:has space", "is not a model name"),
    ],
)
def test_validate_model_rejects_unusable_names_clearly(use_simulator, name, message):
    with pytest.raises(ValueError, match=message):
        validate_model(name)


def test_validate_model_rejects_a_paid_provider_without_a_key(use_simulator, settings):
    settings.ANTHROPIC_API_KEY = ""
    with pytest.raises(ValueError, match="ANTHROPIC_API_KEY"):
        validate_model("anthropic:claude-sonnet-4")


def test_context_windows(use_simulator, settings):
    settings.OLLAMA_NUM_CTX = 16384
    assert context_window(ModelRef("ollama", "llama3.2")) == 16384
    assert context_window(ModelRef("openai", "gpt-4o")) == 128000
    assert context_window(ModelRef("openai", "gpt-4o-2024-08-06")) == 128000
    assert context_window(ModelRef("openai", "gpt-4")) == 8192
    assert context_window(ModelRef("anthropic", "claude-sonnet-4")) == 200000


# --- the simulator itself ---------------------------------------------------------------------------------


@in_sync_thread
async def test_the_request_log_is_served_over_http(use_simulator):
    await collect("ollama:llama3.2")
    async with httpx.AsyncClient() as client:
        log = (await client.get(f"{use_simulator.url}/_sim/requests")).json()
        version = (await client.get(f"{use_simulator.url}/api/version")).json()
        tags = (await client.get(f"{use_simulator.url}/api/tags")).json()
        models = (await client.get(f"{use_simulator.openai_url}/models")).json()
        head = await client.head(f"{use_simulator.url}/api/tags")
        again = await client.get(f"{use_simulator.url}/api/version")  # same connection, still in step
    assert head.status_code == 200 and head.content == b""
    assert again.json() == {"version": "0.5.1"}
    assert log[-1]["path"] == "/api/chat" and log[-1]["body"]["model"] == "llama3.2"
    assert version == {"version": "0.5.1"}
    assert tags["models"][0]["name"] == "llama3.2:latest"
    assert models["object"] == "list" and any(m["id"] == "gpt-4o" for m in models["data"])


@in_sync_thread
async def test_the_simulator_streams_ollama_ndjson_with_the_documented_headers(use_simulator):
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{use_simulator.url}/api/chat", json=body)
    assert response.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert list(lines[0]) == ["model", "created_at", "message", "done"]
    assert list(lines[-1])[:4] == ["model", "created_at", "message", "done_reason"]
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == len(lines) - 1


@in_sync_thread
async def test_the_simulator_answers_non_streaming_requests_too(use_simulator):
    async with httpx.AsyncClient() as client:
        ollama = await client.post(
            f"{use_simulator.url}/api/chat",
            json={"model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": "hi"}]},
        )
        openai = await client.post(
            f"{use_simulator.openai_url}/chat/completions",
            headers={"Authorization": "Bearer x"},
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
        )
    assert ollama.json()["message"]["content"].startswith("Simulated answer")
    assert openai.json()["object"] == "chat.completion" and openai.json()["usage"]["completion_tokens"] > 0


def test_simulate_providers_command_serves_until_stopped():
    manage = Path(__file__).resolve().parents[2] / "manage.py"
    process = subprocess.Popen(
        [sys.executable, str(manage), "simulate_providers", "--port", "0", "--tokens-per-second", "0", "--skip-checks"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        assert "simulator" in line and "never bills" in line
        url = line.split(" on ", 1)[1].split()[0]
        assert httpx.get(f"{url}/api/version").json() == {"version": "0.5.1"}
    finally:
        process.terminate()
        process.wait(10)


@in_sync_thread
async def test_available_models_runs_database_work_off_the_event_loop(use_simulator):
    # validate_model is sync; from async code it goes through sync_to_async.
    ref = await db_sync_to_async(validate_model)("openai:gpt-4o-mini")
    assert ref == ModelRef("openai", "gpt-4o-mini")


@pytest.mark.parametrize(
    ("model", "rate"),
    [("llama3.2", 0.0), ("llama3.2-rate-50", 50.0), ("llama3.2-rate-50-words-9", 50.0), ("fault-slow-rate-50", 20.0)],
)
def test_rate_n_paces_the_answer_at_n_tokens_a_second(model, rate):
    from providers.simulator import SLOW_RATE, ProviderSimulator

    plan = ProviderSimulator(tokens_per_second=0)._plan(model, [{"role": "user", "content": "hi"}], None)
    assert plan.rate == (SLOW_RATE if "fault-slow" in model else rate)


@pytest.mark.parametrize(
    ("model", "delay"),
    [("gpt-4o", 0.0), ("gpt-4o-ttft-300", 0.3), ("llama3.2-ttft-300-rate-50-words-9", 0.3), ("claude-ttft-0", 0.0)],
)
def test_ttft_ms_delays_the_first_token_by_ms_milliseconds(model, delay):
    from providers.simulator import ProviderSimulator

    plan = ProviderSimulator(tokens_per_second=0)._plan(model, [{"role": "user", "content": "hi"}], None)
    assert plan.first_token_delay == delay
    assert plan.rate == (50.0 if "rate-50" in model else 0.0)


TTFT = 0.12  # seconds; a lower bound is all these tests assert, never an upper one


@pytest.mark.parametrize("provider", PROVIDERS)
@in_sync_thread
async def test_a_ttft_model_streams_its_first_token_no_sooner_than_asked(use_simulator, provider):
    started = time.perf_counter()
    first = None
    texts = []
    async for item in stream_chat(faulty(provider, f"ttft-{TTFT * 1000:.0f}-words-5"), CHAT):
        if isinstance(item, str) and item:
            first = first or time.perf_counter() - started
            texts.append(item)
    assert first is not None and first >= TTFT - 0.001
    assert len("".join(texts).split()) == 5


@pytest.mark.parametrize(
    ("path", "body", "headers"),
    [
        ("/api/chat", {"stream": False, "model": "llama3.2-ttft-120"}, {}),
        ("/v1/chat/completions", {"model": "gpt-4o-ttft-120"}, {"Authorization": "Bearer x"}),
        (
            "/v1/messages",
            {"model": "claude-sonnet-4-ttft-120", "max_tokens": 50},
            {"x-api-key": "x", "anthropic-version": "2023-06-01"},
        ),
    ],
)
def test_a_ttft_model_answers_without_streaming_no_sooner_than_asked(simulator, path, body, headers):
    body = {**body, "messages": [{"role": "user", "content": "hi"}]}
    started = time.perf_counter()
    response = httpx.post(simulator.url + path, json=body, headers=headers)
    assert time.perf_counter() - started >= TTFT - 0.001
    assert response.status_code == 200 and "Simulated answer" in response.text


@pytest.mark.parametrize("model", MODELS)
@in_sync_thread
async def test_answers_reuse_the_upstream_connection(use_simulator, simulator, model):
    """Each adapter reads an answer to the end of its body, so the pooled connection is reused."""
    await collect(model)
    before = simulator.connections_accepted
    for _ in range(3):
        await collect(model)
    assert simulator.connections_accepted == before


@in_sync_thread
async def test_anthropic_requests_leave_out_the_temperature_its_client_rejects(use_simulator):
    text, usage = await collect("anthropic:claude-sonnet-4", CHAT, StreamOptions(temperature=0.2, max_tokens=50))
    body = use_simulator.requests[-1]["body"]
    assert "temperature" not in body and body["max_tokens"] == 50
    assert text and usage.completion_tokens > 0
