"""The adapters against the recorded streams of docs/PROTOCOLS.md, replayed byte for byte.

A tiny in-test server (`replay.py`) writes the recorded bytes back, whole or in HTTP chunks
a few bytes long, so JSON lines, SSE events and multi-byte characters arrive split.
"""

from __future__ import annotations

import asyncio

import pytest

from providers.anthropic_adapter import AnthropicAdapter
from providers.base import ErrorKind, ProviderError, StreamOptions, Usage
from providers.clients import aclose_clients, reset_clients
from providers.ollama_adapter import OllamaAdapter
from providers.openai_adapter import OpenAIAdapter
from providers.tests.replay import CONTENT_TYPES, ReplayServer, recording

CHAT = [{"role": "user", "content": "Why is the sky blue?"}]
ADAPTERS = {"ollama": OllamaAdapter, "openai": OpenAIAdapter, "anthropic": AnthropicAdapter}
UNICODE_TEXT = "Café naïve 日本語 🙂 €42"


@pytest.fixture
async def replay(settings):
    """Point every provider at a fresh replay server."""
    async with ReplayServer() as server:
        settings.OLLAMA_HOST = server.url
        settings.OPENAI_BASE_URL = f"{server.url}/v1"
        settings.OPENAI_API_KEY = "sk-test"
        settings.ANTHROPIC_BASE_URL = server.url
        settings.ANTHROPIC_API_KEY = "sk-ant-test"
        reset_clients()
        yield server
        await aclose_clients()
    reset_clients()


async def consume(provider: str, model: str = "some-model", messages=CHAT, options=None):
    """Run one adapter stream: the text, the Usage, and the ProviderError if one was raised."""
    texts: list[str] = []
    usages: list[Usage] = []
    error = None
    try:
        async for item in ADAPTERS[provider]().stream(model, messages, options or StreamOptions()):
            (usages if isinstance(item, Usage) else texts).append(item)
    except ProviderError as exc:
        error = exc
    assert len(usages) <= 1
    return "".join(texts), (usages[0] if usages else None), error


SPLITS = [None, 1, 7]


@pytest.mark.parametrize("split", SPLITS)
async def test_ollama_chat_recording_gives_text_and_the_done_chunks_counts(replay, split):
    server = replay.add(200, recording("ollama_chat_stream.ndjson"), content_type=CONTENT_TYPES["ollama"], split=split)
    text, usage, error = await consume("ollama", "llama3.2")
    assert error is None
    assert text == "The"
    assert usage == Usage(26, 282, "provider", "llama3.2", None)  # no done_reason: unknown, not an error
    assert server.requests[0]["path"] == "/api/chat"


@pytest.mark.parametrize("split", SPLITS)
async def test_ollama_wire_form_without_counts_is_estimated_and_marked(replay, split):
    replay.add(200, recording("ollama_generate_stream.ndjson"), content_type=CONTENT_TYPES["ollama"], split=split)
    text, usage, error = await consume("ollama", "gemma4")
    assert error is None
    assert text == "That's a fantastic question!"
    assert usage.source == "estimated"
    assert usage.stop_reason == "stop"
    assert usage.completion_tokens > 0 and usage.prompt_tokens > 0


@pytest.mark.parametrize("split", SPLITS)
async def test_ollama_error_line_mid_stream_raises_after_the_text_that_arrived(replay, split):
    replay.add(
        200, recording("ollama_generate_midstream_error.ndjson"), content_type=CONTENT_TYPES["ollama"], split=split
    )
    text, usage, error = await consume("ollama", "gemma4")
    assert text == " Yes.Ican"
    assert usage is None
    assert error.kind is ErrorKind.SERVER
    assert "an error was encountered while running the model" in error.message


@pytest.mark.parametrize("split", SPLITS)
async def test_openai_recording_with_usage_chunk_and_empty_choices(replay, split):
    server = replay.add(200, recording("openai_usage_chunk.txt"), content_type=CONTENT_TYPES["openai"], split=split)
    text, usage, error = await consume("openai", "gpt-4o")
    assert error is None
    assert text == "Foo!"
    assert usage == Usage(9, 2, "provider", "gpt-4o-2024-08-06", "stop")
    sent = server.requests[0]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"]["stream"] is True
    assert sent["body"]["stream_options"] == {"include_usage": True}
    assert sent["headers"]["authorization"] == "Bearer sk-test"


@pytest.mark.parametrize("split", SPLITS)
async def test_openai_recording_cut_by_max_tokens_reports_length(replay, split):
    replay.add(200, recording("openai_finish_length.txt"), content_type=CONTENT_TYPES["openai"], split=split)
    text, usage, error = await consume("openai", "gpt-4o", options=StreamOptions(max_tokens=1))
    assert error is None
    assert text == '{"'
    assert usage == Usage(79, 1, "provider", "gpt-4o-2024-08-06", "length")


@pytest.mark.parametrize("split", SPLITS)
async def test_anthropic_sdk_fixture_without_trailing_newline(replay, split):
    server = replay.add(
        200, recording("anthropic_basic_response.txt"), content_type=CONTENT_TYPES["anthropic"], split=split
    )
    text, usage, error = await consume("anthropic", "claude-3-opus-latest")
    assert error is None
    assert text == "Hello there!"
    assert usage == Usage(11, 6, "provider", "claude-3-opus-latest", "end_turn")
    sent = server.requests[0]
    assert sent["path"] == "/v1/messages"
    assert sent["headers"]["x-api-key"] == "sk-ant-test"
    assert sent["headers"]["anthropic-version"] == "2023-06-01"


@pytest.mark.parametrize("split", SPLITS)
async def test_anthropic_docs_example_with_ping_and_spaced_json(replay, split):
    replay.add(200, recording("anthropic_docs_example.txt"), content_type=CONTENT_TYPES["anthropic"], split=split)
    text, usage, error = await consume("anthropic", "claude-3-7-sonnet-20250219")
    assert error is None
    assert text == "Hello!"
    assert usage == Usage(25, 15, "provider", "claude-3-7-sonnet-20250219", "end_turn")


@pytest.mark.parametrize(
    ("provider", "name"),
    [
        ("ollama", "ollama_chat_unicode.ndjson"),
        ("openai", "openai_unicode.txt"),
        ("anthropic", "anthropic_unicode.txt"),
    ],
)
async def test_multibyte_characters_split_across_chunks_arrive_whole(replay, provider, name):
    body = recording(name)
    assert any(b >= 0x80 for b in body)
    replay.add(200, body, content_type=CONTENT_TYPES[provider], split=1)
    text, usage, error = await consume(provider)
    assert error is None
    assert text == UNICODE_TEXT
    assert usage.source == "provider"
    assert "\ufffd" not in text


# --- error shapes, before the stream -------------------------------------------------------------

ERROR_SHAPES = [
    # Ollama: {"error": "..."} (docs/api/errors.mdx, server/routes.go)
    ("ollama", 404, {"error": "model 'llama9' not found"}, ErrorKind.NOT_FOUND, False, "not found"),
    (
        "ollama",
        404,
        '{"error":"model \\"llama9\\" not found, try pulling it first"}',
        ErrorKind.NOT_FOUND,
        False,
        "pulling",
    ),
    ("ollama", 400, {"error": "model is required"}, ErrorKind.BAD_REQUEST, False, "model is required"),
    ("ollama", 429, {"error": "too many requests"}, ErrorKind.RATE_LIMITED, True, "too many requests"),
    ("ollama", 500, {"error": "the model failed to generate a response"}, ErrorKind.SERVER, True, "failed to generate"),
    ("ollama", 502, {"error": "cloud model unreachable"}, ErrorKind.SERVER, True, "unreachable"),
    (
        "ollama",
        503,
        {"error": "server busy, please try again.  maximum pending requests exceeded"},
        ErrorKind.OVERLOADED,
        True,
        "server busy",
    ),
    ("ollama", 499, {"error": "request canceled"}, ErrorKind.CONNECTION, True, "request canceled"),
    # OpenAI: {"error": {message, type, param, code}}
    (
        "openai",
        401,
        '{"error":{"message":"Incorrect API key provided: sk-VKMIs***************************************wjh3. You can find your API key at https://platform.openai.com/account/api-keys.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}',
        ErrorKind.AUTH,
        False,
        "Incorrect API key",
    ),
    (
        "openai",
        404,
        '{\n    "error": {\n        "message": "The model `gpt-3` does not exist",\n        "type": "invalid_request_error",\n        "param": null,\n        "code": "model_not_found"\n    }\n}',
        ErrorKind.NOT_FOUND,
        False,
        "does not exist",
    ),
    (
        "openai",
        429,
        {
            "error": {
                "message": "Request too large for gpt-4o on tokens per min (TPM): Limit 30000, Requested 31538.",
                "type": "tokens",
                "param": None,
                "code": "rate_limit_exceeded",
            }
        },
        ErrorKind.RATE_LIMITED,
        True,
        "tokens per min",
    ),
    (
        "openai",
        429,
        {
            "error": {
                "message": "You exceeded your current quota, please check your plan and billing details.",
                "type": "insufficient_quota",
                "param": None,
                "code": "insufficient_quota",
            }
        },
        ErrorKind.AUTH,
        False,
        "exceeded your current quota",
    ),
    (
        "openai",
        500,
        {
            "error": {
                "message": "The server had an error while processing your request. Sorry about that!",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        },
        ErrorKind.SERVER,
        True,
        "server had an error",
    ),
    (
        "openai",
        503,
        {
            "error": {
                "message": "The engine is currently overloaded",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        },
        ErrorKind.SERVER,
        True,
        "overloaded",
    ),
    (
        "openai",
        403,
        {
            "error": {
                "message": "Country, region, or territory not supported",
                "type": "request_forbidden",
                "param": None,
                "code": "unsupported_country_region_territory",
            }
        },
        ErrorKind.AUTH,
        False,
        "Country",
    ),
    (
        "openai",
        400,
        {
            "error": {
                "message": "[] is too short - 'messages'",
                "type": "invalid_request_error",
                "param": "messages",
                "code": None,
            }
        },
        ErrorKind.BAD_REQUEST,
        False,
        "too short",
    ),
    # Ollama's own /v1 endpoint answers an unknown model with not_found_error.
    (
        "openai",
        404,
        {"error": {"code": None, "message": 'model "x" not found', "param": None, "type": "not_found_error"}},
        ErrorKind.NOT_FOUND,
        False,
        "not found",
    ),
    # Anthropic: {"type": "error", "error": {type, message}, "request_id": ...}
    (
        "anthropic",
        400,
        '{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: Field required"},"request_id":"req_011CYfUGm894GvnVxoN9fNaL"}',
        ErrorKind.BAD_REQUEST,
        False,
        "max_tokens: Field required",
    ),
    (
        "anthropic",
        400,
        {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": 'messages: roles must alternate between "user" and "assistant"',
            },
            "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy",
        },
        ErrorKind.BAD_REQUEST,
        False,
        "roles must alternate",
    ),
    (
        "anthropic",
        401,
        {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}},
        ErrorKind.AUTH,
        False,
        "x-api-key",
    ),
    (
        "anthropic",
        402,
        {"type": "error", "error": {"type": "billing_error", "message": "credit balance too low"}},
        ErrorKind.AUTH,
        False,
        "credit",
    ),
    (
        "anthropic",
        403,
        {"type": "error", "error": {"type": "permission_error", "message": "no permission"}},
        ErrorKind.AUTH,
        False,
        "permission",
    ),
    (
        "anthropic",
        404,
        {"type": "error", "error": {"type": "not_found_error", "message": "model: claude-9"}},
        ErrorKind.NOT_FOUND,
        False,
        "claude-9",
    ),
    (
        "anthropic",
        413,
        {
            "type": "error",
            "error": {"type": "request_too_large", "message": "Request exceeds the maximum allowed number of bytes."},
        },
        ErrorKind.BAD_REQUEST,
        False,
        "maximum allowed",
    ),
    (
        "anthropic",
        429,
        {"type": "error", "error": {"type": "rate_limit_error", "message": "rate limited"}},
        ErrorKind.RATE_LIMITED,
        True,
        "rate limited",
    ),
    (
        "anthropic",
        500,
        {"type": "error", "error": {"type": "api_error", "message": "Internal server error"}},
        ErrorKind.SERVER,
        True,
        "Internal server error",
    ),
    (
        "anthropic",
        504,
        {"type": "error", "error": {"type": "timeout_error", "message": "Request timed out"}},
        ErrorKind.TIMEOUT,
        True,
        "timed out",
    ),
    (
        "anthropic",
        529,
        {"type": "error", "error": {"type": "overloaded_error", "message": "later"}},
        ErrorKind.OVERLOADED,
        True,
        "later",
    ),
]


@pytest.mark.parametrize(("provider", "status", "body", "kind", "retryable", "text"), ERROR_SHAPES)
async def test_every_documented_error_shape_maps_to_a_typed_readable_error(
    replay, provider, status, body, kind, retryable, text
):
    replay.add(status, body)
    got, usage, error = await consume(provider, "the-model")
    assert got == "" and usage is None
    assert error.kind is kind
    assert error.retryable is retryable
    assert error.status == status
    assert error.provider == provider
    assert text in error.message
    assert {"ollama": "Ollama", "openai": "OpenAI", "anthropic": "Anthropic"}[provider] in error.message


# --- errors and truncation inside a 200 stream ------------------------------------------------------


async def test_openai_error_event_inside_the_stream_is_a_typed_error(replay):
    first = recording("openai_usage_chunk.txt").split(b"\n\n")[:2]
    body = (
        b"\n\n".join(first)
        + b'\n\ndata: {"error":{"message":"The server had an error while processing your request. Sorry about that!","type":"server_error","param":null,"code":null}}\n\n'
    )
    replay.add(200, body, content_type=CONTENT_TYPES["openai"], split=5)
    text, _usage, error = await consume("openai", "gpt-4o")
    assert text == "Foo"
    assert error.kind is ErrorKind.SERVER
    assert "broke off" in error.message and "Sorry about that" in error.message


async def test_anthropic_error_event_after_some_text(replay):
    events = recording("anthropic_basic_response.txt").split(b"\n\n")[:4]
    body = (
        b"\n\n".join(events)
        + b'\n\nevent: error\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}\n\n'
    )
    replay.add(200, body, content_type=CONTENT_TYPES["anthropic"], split=3)
    text, _usage, error = await consume("anthropic", "claude-3-opus-latest")
    assert text == "Hello"
    assert error.kind is ErrorKind.OVERLOADED and error.retryable
    assert "Overloaded" in error.message
    assert error.usage.prompt_tokens == 11  # what message_start had reported


async def test_anthropic_error_event_before_message_start(replay):
    body = b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}\n\n'
    replay.add(200, body, content_type=CONTENT_TYPES["anthropic"])
    text, _usage, error = await consume("anthropic")
    assert text == "" and error.kind is ErrorKind.OVERLOADED and error.usage is None


async def test_anthropic_unknown_events_are_ignored_and_input_count_takes_the_max(replay):
    body = (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"claude-x","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":0,"output_tokens":1}}}\n\n'
        b'event: brand_new_event\ndata: {"type":"brand_new_event","whatever":1}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"input_tokens":42,"output_tokens":3}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    replay.add(200, body, content_type=CONTENT_TYPES["anthropic"])
    text, usage, error = await consume("anthropic")
    assert error is None and text == "Hi"
    assert usage == Usage(42, 3, "provider", "claude-x", "end_turn")


async def test_anthropic_cache_tokens_count_as_input(replay):
    body = recording("anthropic_basic_response.txt").replace(
        b'"usage":{"input_tokens":11,"output_tokens":1}',
        b'"usage":{"input_tokens":11,"cache_creation_input_tokens":100,"cache_read_input_tokens":1000,"output_tokens":1}',
    )
    replay.add(200, body, content_type=CONTENT_TYPES["anthropic"])
    _text, usage, _error = await consume("anthropic")
    assert usage.prompt_tokens == 1111


@pytest.mark.parametrize(
    ("provider", "name", "keep"),
    [
        ("ollama", "ollama_chat_unicode.ndjson", 2),  # no done chunk
        ("openai", "openai_usage_chunk.txt", 3),  # no finish_reason, no usage, no [DONE]
        ("anthropic", "anthropic_basic_response.txt", 5),  # no message_delta, no message_stop
    ],
)
async def test_a_stream_that_ends_early_is_a_connection_error_not_a_short_answer(replay, provider, name, keep):
    separator = b"\n" if provider == "ollama" else b"\n\n"
    body = separator.join(recording(name).split(separator)[:keep]) + separator
    replay.add(200, body, content_type=CONTENT_TYPES[provider])
    text, usage, error = await consume(provider)
    assert text
    assert usage is None
    assert error.kind is ErrorKind.CONNECTION and error.retryable


async def test_openai_compatible_server_without_usage_chunk_gets_an_estimate(replay):
    body = b"\n\n".join(
        part for part in recording("openai_usage_chunk.txt").split(b"\n\n") if b'"choices":[]' not in part
    )
    replay.add(200, body, content_type=CONTENT_TYPES["openai"])
    text, usage, error = await consume("openai")
    assert error is None and text == "Foo!"
    assert usage.source == "estimated" and usage.completion_tokens >= 1 and usage.stop_reason == "stop"


async def test_openai_sse_comment_lines_are_ignored(replay):
    body = b": keep-alive\n\n" + recording("openai_usage_chunk.txt").replace(
        b"\n\ndata: [DONE]", b"\n\n: ping\n\ndata: [DONE]"
    )
    replay.add(200, body, content_type=CONTENT_TYPES["openai"], split=4)
    text, usage, error = await consume("openai")
    assert error is None and text == "Foo!" and usage.completion_tokens == 2


# --- cancellation closes the upstream connection ---------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "name"),
    [
        ("ollama", "ollama_chat_unicode.ndjson"),
        ("openai", "openai_unicode.txt"),
        ("anthropic", "anthropic_unicode.txt"),
    ],
)
async def test_closing_the_stream_closes_the_upstream_connection(replay, provider, name):
    body = recording(name)
    server = replay.add(200, body, content_type=CONTENT_TYPES[provider], hang_after=len(body) // 2)
    stream = ADAPTERS[provider]().stream("some-model", CHAT, StreamOptions())
    first = await stream.__anext__()
    assert first == "Café"
    await stream.aclose()
    await asyncio.wait_for(server.client_left.wait(), 5)
