"""The small parts: SSE framing, token estimates, error wording, per-loop client pools."""

from __future__ import annotations

import asyncio

import pytest

from providers import errors
from providers.base import ErrorKind, StreamOptions, Usage
from providers.clients import pooled, reset_clients
from providers.ollama_adapter import OllamaAdapter
from providers.sse import iter_events, iter_lines
from providers.tokens import estimate_messages, estimate_tokens


async def lines(*items):
    for item in items:
        yield item.encode() if isinstance(item, str) else item


async def events(*items):
    return [event async for event in iter_events(lines(*items))]


async def test_sse_joins_data_lines_skips_comments_and_reads_event_names():
    got = await events(": keep-alive", "", "event: ping", "data: {}", "", "data: a", "data:b", "", "id: 7", "retry: 10")
    assert got == [("ping", "{}"), ("message", "a\nb")]


async def test_sse_dispatches_a_last_event_without_a_blank_line():
    assert await events("event: message_stop", 'data: {"type":"message_stop"}') == [
        ("message_stop", '{"type":"message_stop"}')
    ]


async def test_lines_split_at_newlines_keep_multibyte_characters_whole():
    data = "café\r\n日本語\n\nlast".encode()
    pieces = [data[i : i + 1] for i in range(len(data))]
    got = [line async for line in iter_lines(lines(*pieces))]
    assert [line.decode() for line in got] == ["café", "日本語", "", "last"]


def test_token_estimates_grow_with_text_and_count_non_ascii_characters():
    assert estimate_tokens("") == 0
    assert estimate_tokens("abcd") == 1
    assert estimate_tokens("abcde") == 2
    assert estimate_tokens("日本語") == 3
    chat = [{"role": "user", "content": "abcd" * 10}]
    assert estimate_messages(chat) == 3 + 4 + 10


def test_error_messages_name_the_provider_the_problem_the_status_and_what_to_do():
    error = errors.from_response("openai", 429, {"error": {"message": "Slow down", "type": "requests", "code": None}})
    assert error.kind is ErrorKind.RATE_LIMITED and error.retryable
    assert error.message == "OpenAI is rate limiting requests (429): Slow down. Wait a moment and try again."


def test_an_error_body_that_is_not_json_still_reads_well():
    error = errors.from_response("ollama", 502, b"<html>Bad Gateway</html>")
    assert error.kind is ErrorKind.SERVER
    assert "Bad Gateway" in error.message


def test_pooled_clients_are_per_event_loop():
    made = []

    async def get():
        return pooled("key", lambda: made.append(object()) or made[-1])

    first = asyncio.run(get())
    second = asyncio.run(get())
    assert first is not second and len(made) == 2

    async def twice():
        return pooled("key", lambda: made.append(object()) or made[-1]), pooled("key", lambda: object())

    a, b = asyncio.run(twice())
    assert a is b
    reset_clients()


@pytest.mark.django_db
def test_the_ollama_adapter_works_from_one_event_loop_after_another(use_simulator):
    async def ask():
        items = [
            item
            async for item in OllamaAdapter().stream("llama3.2", [{"role": "user", "content": "hi"}], StreamOptions())
        ]
        return items[-1]

    # A client bound to the first (now closed) loop must not be reused by the second.
    assert isinstance(asyncio.run(ask()), Usage)
    assert isinstance(asyncio.run(ask()), Usage)


async def test_the_simulator_reports_the_dated_id_behind_an_anthropic_alias(simulator, settings):
    from providers.anthropic_adapter import AnthropicAdapter

    settings.ANTHROPIC_BASE_URL = simulator.anthropic_url
    settings.ANTHROPIC_API_KEY = "sk-ant-test"
    items = [item async for item in AnthropicAdapter().stream("claude-sonnet-4", [{"role": "user", "content": "hi"}])]
    assert items[-1].provider_model == "claude-sonnet-4-20250514"
    reset_clients()


@pytest.mark.parametrize("name", ["openai", "anthropic"])
def test_an_sdk_client_left_behind_by_a_closed_event_loop_goes_quietly(use_simulator, caplog, capsys, name):
    """A client pooled for a loop that has closed is collected later, maybe while another loop
    runs: it must not start a task there that fails (the SDKs' own client would)."""
    import asyncio
    import gc
    import logging

    from providers import anthropic_adapter, openai_adapter

    adapter = {"openai": openai_adapter, "anthropic": anthropic_adapter}[name]

    async def pool_one():
        client = adapter._client()
        await client.models.list() if name == "openai" else None  # open a connection on this loop

    asyncio.run(pool_one())  # the loop closes; its pool and client are dropped

    async def later():
        gc.collect()
        await asyncio.sleep(0.05)
        gc.collect()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(later())
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text
    assert "Traceback" not in capsys.readouterr().err
