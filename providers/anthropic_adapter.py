"""Anthropic Messages, streamed or whole, on one pooled `anthropic.AsyncAnthropic` per event loop."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anthropic
import httpx2
from django.conf import settings

from providers import errors
from providers.base import ChatMessage, ErrorKind, ModelInfo, ProviderAdapter, ProviderError, StreamOptions, Usage
from providers.clients import pooled, sdk_http_client, timeouts
from providers.sse import iter_events, iter_lines
from providers.tokens import estimate_messages, estimate_tokens

NAME = "anthropic"
# The API version whose stream format docs/PROTOCOLS.md records, sent with `x-api-key` as documented
# (this SDK release would send `Authorization: Bearer` and a newer version instead).
API_VERSION = "2023-06-01"


def _client() -> anthropic.AsyncAnthropic:
    key = settings.ANTHROPIC_API_KEY
    if not key:
        raise ProviderError(
            ErrorKind.AUTH, "Anthropic is not configured: set ANTHROPIC_API_KEY.", provider=NAME, retryable=False
        )
    base_url = settings.ANTHROPIC_BASE_URL
    limits = timeouts()
    return pooled(
        (NAME, base_url, key, tuple(sorted(limits.items()))),
        lambda: anthropic.AsyncAnthropic(
            api_key=key,
            base_url=base_url,
            timeout=httpx2.Timeout(**limits),
            max_retries=0,
            http_client=sdk_http_client(limits),
            default_headers={"X-Api-Key": key, "anthropic-version": API_VERSION, "Authorization": anthropic.Omit()},
        ),
    )


def prepare(messages: list[ChatMessage]) -> tuple[str, list[dict]]:
    """System messages go to the top-level `system`; consecutive same-role turns are merged."""
    system: list[str] = []
    turns: list[dict] = []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            if content:
                system.append(content)
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = f"{turns[-1]['content']}\n\n{content}"
        else:
            turns.append({"role": role, "content": content})
    return "\n\n".join(system), turns


def _status_error(exc: anthropic.APIStatusError, model: str, usage: Usage | None = None) -> ProviderError:
    body = exc.body if exc.body is not None else exc.message
    return errors.from_response(NAME, exc.status_code, body, model=model, usage=usage)


class AnthropicAdapter(ProviderAdapter):
    name = NAME

    async def stream(
        self, model: str, messages: list[ChatMessage], options: StreamOptions | None = None
    ) -> AsyncIterator[str | Usage]:
        client = _client()
        params = _params(model, messages, options or StreamOptions(), stream=True)
        parts: list[str] = []
        input_tokens: int | None = None
        output_tokens: int | None = None
        provider_model = ""
        stop_reason = None
        finished = False

        def partial() -> Usage | None:
            if input_tokens is None and output_tokens is None:
                return None
            return Usage(input_tokens or 0, output_tokens or 0, "provider", provider_model, stop_reason)

        try:
            async with client.messages.with_streaming_response.create(**params) as response:
                async for event, data in iter_events(iter_lines(response.http_response.aiter_bytes())):
                    if event == "ping":
                        continue
                    try:
                        payload = json.loads(data)
                    except ValueError:
                        raise errors.from_response(NAME, 502, f"an event that is not JSON: {data[:80]}") from None
                    if not isinstance(payload, dict):
                        continue
                    kind = payload.get("type") if event == "message" else event
                    if kind == "content_block_delta":
                        delta = payload.get("delta") or {}
                        if delta.get("type") == "text_delta" and delta.get("text"):
                            parts.append(delta["text"])
                            yield delta["text"]
                    elif kind == "message_start":
                        message = payload.get("message") or {}
                        provider_model = message.get("model") or provider_model
                        input_tokens, output_tokens = _merge(message.get("usage"), input_tokens, output_tokens)
                    elif kind == "message_delta":
                        input_tokens, output_tokens = _merge(payload.get("usage"), input_tokens, output_tokens)
                        stop_reason = (payload.get("delta") or {}).get("stop_reason") or stop_reason
                        # A stop reason means the message is complete even if message_stop is lost.
                        finished = finished or stop_reason is not None
                    elif kind == "message_stop":
                        finished = True
                    elif kind == "error":
                        raise errors.from_response(NAME, 200, payload, model=model, usage=partial())
                    # content_block_start/stop and event types added later carry nothing we bill.
        except anthropic.APIStatusError as exc:
            raise _status_error(exc, model, partial())
        except anthropic.APITimeoutError:
            raise errors.timeout_error(NAME, "no answer in time", usage=partial())
        except anthropic.APIConnectionError:
            raise errors.connection_error(NAME, f"nothing answers at {settings.ANTHROPIC_BASE_URL}", usage=partial())
        except httpx2.TimeoutException:
            raise errors.timeout_error(NAME, "the model stopped sending tokens", usage=partial())
        except httpx2.TransportError:
            raise errors.connection_error(NAME, "the connection closed in the middle of the answer", usage=partial())
        if not finished:
            raise errors.connection_error(NAME, "the answer ended before it was finished", usage=partial())
        if input_tokens is None and output_tokens is None:
            text = "".join(parts)
            yield Usage(estimate_messages(messages), estimate_tokens(text), "estimated", provider_model, stop_reason)
            return
        yield Usage(input_tokens or 0, output_tokens or 0, "provider", provider_model, stop_reason)

    async def complete(
        self, model: str, messages: list[ChatMessage], options: StreamOptions | None = None
    ) -> tuple[str, Usage]:
        """One Messages response (`stream: false`): the same usage, no per-event relay."""
        client = _client()
        params = _params(model, messages, options or StreamOptions(), stream=False)
        try:
            async with client.messages.with_streaming_response.create(**params) as response:
                raw = await response.http_response.aread()
        except anthropic.APIStatusError as exc:
            raise _status_error(exc, model)
        except anthropic.APITimeoutError:
            raise errors.timeout_error(NAME, "no answer in time")
        except anthropic.APIConnectionError:
            raise errors.connection_error(NAME, f"nothing answers at {settings.ANTHROPIC_BASE_URL}")
        except httpx2.TimeoutException:
            raise errors.timeout_error(NAME, "no answer in time")
        except httpx2.TransportError:
            raise errors.connection_error(NAME, "the connection closed before the answer was complete")
        try:
            body = json.loads(raw)
        except ValueError:
            raise errors.from_response(NAME, 502, f"an answer that is not JSON: {raw[:80]!r}") from None
        if not isinstance(body, dict):
            raise errors.from_response(NAME, 502, "an answer that is not a JSON object")
        if body.get("type") == "error" or "error" in body:
            raise errors.from_response(NAME, 200, body, model=model)
        text = "".join(
            block.get("text") or ""
            for block in body.get("content") or ()
            if isinstance(block, dict) and block.get("type") == "text"
        )
        provider_model = str(body.get("model") or "")
        stop_reason = body.get("stop_reason")
        input_tokens, output_tokens = _merge(body.get("usage"), None, None)
        if input_tokens is None and output_tokens is None:
            return text, Usage(
                estimate_messages(messages), estimate_tokens(text), "estimated", provider_model, stop_reason
            )
        return text, Usage(input_tokens or 0, output_tokens or 0, "provider", provider_model, stop_reason)

    async def list_models(self) -> list[ModelInfo]:
        try:
            page = await _client().models.list()
        except anthropic.APIStatusError as exc:
            raise _status_error(exc, "")
        except anthropic.APIConnectionError:
            raise errors.connection_error(NAME, f"nothing answers at {settings.ANTHROPIC_BASE_URL}")
        return [ModelInfo(name=f"{NAME}:{m.id}", provider=NAME, model=m.id, paid=True) for m in page.data]


def _params(model: str, messages: list[ChatMessage], options: StreamOptions, *, stream: bool) -> dict:
    system, turns = prepare(messages)
    params: dict = {
        "model": model,
        "messages": turns,
        "max_tokens": options.max_tokens or settings.ANTHROPIC_MAX_TOKENS,
        "stream": stream,
    }
    if system:
        params["system"] = system
    # No `temperature`: the pinned SDK's `messages.create` has no such parameter and raises
    # TypeError before any request (it broke context summaries on Anthropic models). A caller's
    # temperature is a preference, not a requirement, so Anthropic calls use the model's default.
    if options.extra:
        params["extra_body"] = dict(options.extra)
    return params


def _merge(usage: dict | None, input_tokens: int | None, output_tokens: int | None) -> tuple[int | None, int | None]:
    """Counts are cumulative; some gateways send 0 first and the real count later: keep the max."""
    if not isinstance(usage, dict):
        return input_tokens, output_tokens
    parts = [usage.get(f) for f in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")]
    if any(p is not None for p in parts):
        total_in = sum(p or 0 for p in parts)
        input_tokens = total_in if input_tokens is None else max(input_tokens, total_in)
    out = usage.get("output_tokens")
    if out is not None:
        output_tokens = out if output_tokens is None else max(output_tokens, out)
    return input_tokens, output_tokens
