"""OpenAI Chat Completions, streamed or whole, on one pooled `openai.AsyncOpenAI` per event loop."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import httpx2
import openai
from django.conf import settings

from providers import errors
from providers.base import ChatMessage, ErrorKind, ModelInfo, ProviderAdapter, ProviderError, StreamOptions, Usage
from providers.clients import pooled, sdk_http_client, timeouts
from providers.sse import iter_events, iter_lines
from providers.tokens import estimate_messages, estimate_tokens

NAME = "openai"


def _client() -> openai.AsyncOpenAI:
    key = settings.OPENAI_API_KEY
    if not key:
        raise ProviderError(
            ErrorKind.AUTH, "OpenAI is not configured: set OPENAI_API_KEY.", provider=NAME, retryable=False
        )
    base_url = settings.OPENAI_BASE_URL
    limits = timeouts()
    return pooled(
        (NAME, base_url, key, tuple(sorted(limits.items()))),
        # The router owns retries (only before the first token), so the SDK makes none.
        lambda: openai.AsyncOpenAI(
            api_key=key,
            base_url=base_url,
            timeout=httpx2.Timeout(**limits),
            max_retries=0,
            http_client=sdk_http_client(limits),
        ),
    )


def _status_error(exc: openai.APIStatusError, model: str) -> ProviderError:
    body = exc.body if exc.body is not None else exc.message
    if isinstance(body, dict) and "error" not in body:
        body = {"error": body}
    return errors.from_response(NAME, exc.status_code, body, model=model)


class OpenAIAdapter(ProviderAdapter):
    name = NAME

    async def stream(
        self, model: str, messages: list[ChatMessage], options: StreamOptions | None = None
    ) -> AsyncIterator[str | Usage]:
        client = _client()
        params = _params(model, messages, options or StreamOptions(), stream=True)
        parts: list[str] = []
        usage: dict | None = None
        provider_model = ""
        stop_reason = None
        try:
            async with _post(client, params) as response:
                async for _event, data in iter_events(iter_lines(response.aiter_bytes())):
                    if data.startswith("[DONE]"):
                        continue  # read to the end of the body so the connection can be reused
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        raise errors.from_response(NAME, 502, f"an event that is not JSON: {data[:80]}") from None
                    if not isinstance(chunk, dict):
                        continue
                    if chunk.get("error"):
                        raise errors.from_response(NAME, 200, chunk, model=model)
                    provider_model = chunk.get("model") or provider_model
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or ():  # the usage chunk has `choices: []`
                        if choice.get("index", 0) != 0:
                            continue
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            parts.append(text)
                            yield text
                        if choice.get("finish_reason"):
                            stop_reason = choice["finish_reason"]
        except openai.APIStatusError as exc:
            raise _status_error(exc, model)
        except openai.APITimeoutError:
            raise errors.timeout_error(NAME, "no answer in time")
        except openai.APIConnectionError as exc:
            raise errors.connection_error(NAME, _connection_detail(exc))
        except httpx2.TimeoutException:
            raise errors.timeout_error(NAME, "the model stopped sending tokens")
        except httpx2.TransportError:
            raise errors.connection_error(NAME, "the connection closed in the middle of the answer")
        if usage is None and stop_reason is None:
            raise errors.connection_error(NAME, "the answer ended before it was finished")
        text = "".join(parts)
        if usage is None:
            # A compatible server that ignores `include_usage`: estimate, and say so.
            yield Usage(estimate_messages(messages), estimate_tokens(text), "estimated", provider_model, stop_reason)
            return
        yield Usage(
            int(usage.get("prompt_tokens") or 0),
            int(usage.get("completion_tokens") or 0),
            "provider",
            provider_model,
            stop_reason,
        )

    async def complete(
        self, model: str, messages: list[ChatMessage], options: StreamOptions | None = None
    ) -> tuple[str, Usage]:
        """One Chat Completions response (`stream: false`): the same usage, no per-token relay.

        The SDK makes the request (auth, base URL, error statuses); the body is read as plain
        JSON, as the stream's events are, without the SDK's typed objects."""
        client = _client()
        params = _params(model, messages, options or StreamOptions(), stream=False)
        try:
            async with _post(client, params) as response:
                raw = await response.aread()
        except openai.APIStatusError as exc:
            raise _status_error(exc, model)
        except openai.APITimeoutError:
            raise errors.timeout_error(NAME, "no answer in time")
        except openai.APIConnectionError as exc:
            raise errors.connection_error(NAME, _connection_detail(exc))
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
        if body.get("error"):
            raise errors.from_response(NAME, 200, body, model=model)
        text, stop_reason = "", None
        for choice in body.get("choices") or ():
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                text = (choice.get("message") or {}).get("content") or ""
                stop_reason = choice.get("finish_reason")
                break
        provider_model = str(body.get("model") or "")
        usage = body.get("usage")
        if not isinstance(usage, dict):
            return text, Usage(
                estimate_messages(messages), estimate_tokens(text), "estimated", provider_model, stop_reason
            )
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        return text, Usage(prompt, completion, "provider", provider_model, stop_reason)

    async def list_models(self) -> list[ModelInfo]:
        try:
            page = await _client().models.list()
        except openai.APIStatusError as exc:
            raise _status_error(exc, "")
        except openai.APIConnectionError as exc:
            raise errors.connection_error(NAME, _connection_detail(exc))
        return [ModelInfo(name=f"{NAME}:{m.id}", provider=NAME, model=m.id, paid=True) for m in page.data]


# Tells the SDK to hand back the HTTP response unread (as `with_streaming_response` does).
_UNREAD = {"X-Stainless-Raw-Response": "stream"}


@contextlib.asynccontextmanager
async def _post(client: openai.AsyncOpenAI, params: dict) -> AsyncIterator[httpx2.Response]:
    """POST /chat/completions through the SDK's client (auth, base URL, headers, error statuses
    raised as `APIStatusError`), without `create()`'s typed-parameter transform and response
    wrappers: the body is plain JSON already, and the adapters read the response themselves."""
    extra = params.pop("extra_body", None)
    body = {**params, **extra} if extra else params
    response = await client.post(
        "/chat/completions",
        cast_to=httpx2.Response,
        body=body,
        options={"headers": _UNREAD, "security": {"bearer_auth": True}},
    )
    try:
        yield response
    finally:
        await response.aclose()


def _params(model: str, messages: list[ChatMessage], options: StreamOptions, *, stream: bool) -> dict:
    params: dict = {
        "model": model,
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "stream": stream,
    }
    if stream:
        params["stream_options"] = {"include_usage": True}
    if options.temperature is not None:
        params["temperature"] = options.temperature
    if options.max_tokens is not None:
        params["max_completion_tokens"] = options.max_tokens
    if options.seed is not None:
        params["seed"] = options.seed
    if options.extra:
        params["extra_body"] = dict(options.extra)
    return params


def _connection_detail(exc: Exception) -> str:
    cause = exc.__cause__
    if isinstance(cause, httpx2.ConnectError):
        return f"nothing answers at {settings.OPENAI_BASE_URL}"
    return "the connection failed or closed in the middle of the answer"
