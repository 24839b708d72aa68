"""The gateway's wire formats and request parsing, without a server or a database."""

from __future__ import annotations

import json

import pytest

from sessions_app.errors import ProviderFailed, ProviderTimeout, SessionBusy
from sessions_app.gateway import ollama_wire, openai_wire
from sessions_app.gateway.common import GatewayError, error_from_session, read_json
from sessions_app.gateway.views import masked_path


def sse_payload(event: bytes) -> dict:
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    return json.loads(event[len(b"data: ") : -2])


def test_openai_developer_messages_and_text_parts_become_the_system_prompt_and_plain_text():
    chat = openai_wire.parse_chat(
        {
            "model": "openai:gpt-4o",
            "messages": [
                {"role": "developer", "content": "Be terse."},
                {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
            ],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_completion_tokens": 50,
            "top_p": 0.9,
        }
    )
    assert chat.system == "Be terse." and chat.history == [] and chat.message == "Hello there"
    assert chat.ref.name == "openai:gpt-4o" and chat.stream and chat.include_usage
    assert chat.options.max_tokens == 50 and chat.options.extra == {"top_p": 0.9}


def test_openai_requests_the_gateway_cannot_honour_are_refused_rather_than_changed():
    base = {"model": "llama3.2", "messages": [{"role": "user", "content": "Hi"}]}
    refusals = [
        {**base, "tools": [{"type": "function", "function": {"name": "f"}}]},
        {**base, "n": 2},
        {**base, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {**base, "messages": [{"role": "tool", "content": "42"}]},
        {**base, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {**base, "temperature": "hot"},
    ]
    for body in refusals:
        with pytest.raises(GatewayError) as refused:
            openai_wire.parse_chat(body)
        assert refused.value.status == 400


def test_stream_options_only_matter_when_streaming():
    chat = openai_wire.parse_chat(
        {
            "model": "llama3.2",
            "messages": [{"role": "user", "content": "Hi"}],
            "stream_options": {"include_usage": True},
        }
    )
    assert not chat.stream and not chat.include_usage


def test_ollama_chat_maps_options_and_keeps_the_rest_for_the_adapter():
    chat = ollama_wire.parse_chat(
        {
            "model": "llama3.2:latest",
            "messages": [
                {"role": "system", "content": "You help consultants."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Again"},
            ],
            "options": {"temperature": 0, "num_predict": 64, "num_ctx": 4096, "seed": 7, "top_k": 20},
            "keep_alive": "10m",
            "tools": [],
        }
    )
    assert chat.stream is True  # Ollama streams unless told otherwise
    assert chat.ref.name == "ollama:llama3.2:latest" and chat.model == "llama3.2:latest"
    assert chat.system == "You help consultants." and chat.message == "Again"
    assert [m["role"] for m in chat.history] == ["user", "assistant"]
    options = chat.options
    assert (options.temperature, options.max_tokens, options.num_ctx, options.seed) == (0, 64, 4096, 7)
    assert options.keep_alive == "10m" and options.extra == {"top_k": 20}


def test_an_ollama_request_without_messages_or_prompt_is_a_load_request():
    assert ollama_wire.parse_chat({"model": "llama3.2", "messages": []}) is None
    assert ollama_wire.parse_generate({"model": "llama3.2"}) is None
    with pytest.raises(GatewayError) as refused:
        ollama_wire.parse_generate({"model": "llama3.2", "prompt": "def f(", "suffix": "return 1"})
    assert refused.value.status == 400


def test_request_bodies_that_are_not_json_objects_are_400():
    for body in (b"", b"   ", b"{nope", b"[1, 2]", b"\xff\xfe"):
        with pytest.raises(GatewayError) as refused:
            read_json(body)
        assert refused.value.status == 400


def test_an_openai_stream_has_one_identity_a_role_first_an_empty_finish_delta_and_a_usage_chunk():
    completion = openai_wire.Completion(model="ollama:llama3.2", include_usage=True)
    role, delta, finish, usage = (
        sse_payload(completion.role_chunk()),
        sse_payload(completion.delta_chunk("Hi")),
        sse_payload(completion.finish_chunk("length")),
        sse_payload(completion.usage_chunk(9, 2)),
    )
    assert {c["id"] for c in (role, delta, finish, usage)} == {completion.id}
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""} and role["usage"] is None
    assert delta["choices"][0]["delta"] == {"content": "Hi"}
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    assert openai_wire.DONE_EVENT == b"data: [DONE]\n\n"


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("text", ["hi", 'quote " and \\ and\nnewline', "\x00", "é 😀", "", "\\u0000"])
def test_an_openai_delta_chunk_is_the_generic_chunk_byte_for_byte(text, include_usage):
    completion = openai_wire.Completion(model='openai:gpt-4o "\\u0000"', include_usage=include_usage)
    generic = completion._chunk([openai_wire._choice({"content": text})])
    assert completion.delta_chunk(text) == generic
    assert completion.delta_chunk(text) == generic  # the cached frame, second time round


def test_errors_keep_each_protocols_shape():
    error = GatewayError(404, "model 'x' not found", code="model_not_found", param="model")
    assert json.loads(openai_wire.error_response(error).content) == {
        "error": {
            "message": "model 'x' not found",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    assert json.loads(ollama_wire.error_response(error).content) == {"error": "model 'x' not found"}
    assert json.loads(ollama_wire.error_line("boom")) == {"error": "boom"}
    assert sse_payload(openai_wire.error_event(GatewayError(502, "upstream")))["error"]["type"] == "server_error"


def test_provider_failures_keep_a_status_that_tells_the_client_something():
    assert error_from_session(ProviderFailed("gone", kind="not_found")).status == 404
    assert error_from_session(ProviderFailed("slow down", kind="rate_limited")).status == 429
    assert error_from_session(ProviderFailed("bad key on the server", kind="auth")).status == 502
    assert error_from_session(ProviderTimeout("late", kind="timeout")).status == 504
    assert error_from_session(SessionBusy("busy")).status == 409


def test_the_ollama_done_chunk_carries_counts_and_nanosecond_durations():
    metrics = ollama_wire.Metrics(prompt_tokens=26, completion_tokens=3, total_ns=5_000, prompt_ns=1_000, eval_ns=4_000)
    final = json.loads(ollama_wire.done_line("generate", "llama3.2", metrics))
    assert final["done"] is True and final["response"] == "" and final["done_reason"] == "stop"
    assert (final["prompt_eval_count"], final["eval_count"]) == (26, 3)
    assert (final["total_duration"], final["prompt_eval_duration"], final["eval_duration"]) == (5_000, 1_000, 4_000)


def test_logged_paths_never_show_a_token():
    assert masked_path("/t/bws_abcdefghijklmnop/api/chat") == "/t/bws_ab…/api/chat"
    assert masked_path("/api/chat") == "/api/chat"
