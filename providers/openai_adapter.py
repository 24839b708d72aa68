"""OpenAI Chat Completions, streamed or whole, on one pooled `openai.AsyncOpenAI` per event loop."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator

import httpx2
import openai
from django.conf import settings

from providers import errors
from providers.base import ChatMessage, ErrorKind, ModelInfo, ProviderAdapter, ProviderError, StreamOptions, Usage
from providers.clients import pooled, sdk_http_client, timeouts
from providers.sse import iter_events, iter_lines
from providers.tokens import estimate_messages, estimate_tokens

NAME = "openai"


class _Connection:
    """One pooled `openai.AsyncOpenAI`, with what a chat request needs from it worked out once.

    The SDK owns the configuration (key, base URL, its headers, timeouts); chat requests go
    out through its HTTP client (`sdk_http_client`, which the pool made for it) without the
    SDK's per-request machinery (`_post`).
    """

    def __init__(self, key: str, base_url: str, limits: dict[str, float]) -> None:
        self.http = sdk_http_client(limits)
        # The router owns retries (only before the first token), so the SDK makes none.
        self.sdk = openai.AsyncOpenAI(
            api_key=key, base_url=base_url, timeout=httpx2.Timeout(**limits), max_retries=0, http_client=self.http
        )
        self.chat_url = str(self.sdk.base_url.join("chat/completions"))
        # Unset optional headers (organization, project) are the SDK's `Omit` markers: left out.
        headers = {name: value for name, value in self.sdk.default_headers.items() if isinstance(value, str)}
        self.headers = {**headers, **self.sdk.auth_headers, "X-Stainless-Retry-Count": "0"}

    def is_closed(self) -> bool:
        return self.sdk.is_closed()

    async def aclose(self) -> None:
        await self.sdk.close()


def _connection() -> _Connection:
    key = settings.OPENAI_API_KEY
    if not key:
        raise ProviderError(
            ErrorKind.AUTH, "OpenAI is not configured: set OPENAI_API_KEY.", provider=NAME, retryable=False
        )
    base_url = settings.OPENAI_BASE_URL
    limits = timeouts()
    return pooled((NAME, base_url, key, tuple(sorted(limits.items()))), lambda: _Connection(key, base_url, limits))


def _client() -> openai.AsyncOpenAI:
    return _connection().sdk


def _status_error(exc: openai.APIStatusError, model: str) -> ProviderError:
    body = exc.body if exc.body is not None else exc.message
    return _error_body(exc.status_code, body, model)


def _error_body(status: int, body: object, model: str) -> ProviderError:
    if isinstance(body, dict) and "error" not in body:
        body = {"error": body}
    return errors.from_response(NAME, status, body, model=model)


async def _response_error(response: httpx2.Response, model: str) -> ProviderError:
    """An error status as the SDK reads it (its `APIStatusError.body`): the JSON's `error`, else the text."""
    text = (await response.aread()).decode("utf-8", "replace").strip()
    try:
        body: object = json.loads(text)
    except ValueError:
        body = text
    if isinstance(body, dict):
        body = body.get("error", body)
    return _error_body(response.status_code, body, model)


@contextlib.contextmanager
def _translated(model: str, *, stalled: str, cut: str) -> Iterator[None]:
    """The SDK's and the transport's exceptions as `ProviderError`s; `stalled` and `cut` say
    how a read timeout and a broken connection read at this point of the call."""
    try:
        yield
    except openai.APIStatusError as exc:
        raise _status_error(exc, model)
    except openai.APITimeoutError:
        raise errors.timeout_error(NAME, "no answer in time")
    except openai.APIConnectionError as exc:
        raise errors.connection_error(NAME, _connection_detail(exc))
    except httpx2.TimeoutException:
        raise errors.timeout_error(NAME, stalled)
    except httpx2.TransportError:
        raise errors.connection_error(NAME, cut)


class OpenAIAdapter(ProviderAdapter):
    name = NAME

    async def stream(
        self, model: str, messages: list[ChatMessage], options: StreamOptions | None = None
    ) -> AsyncIterator[str | Usage]:
        connection = _connection()
        params = _params(model, messages, options or StreamOptions(), stream=True)
        parts: list[str] = []
        usage: dict | None = None
        provider_model = ""
        stop_reason = None
        with _translated(
            model, stalled="the model stopped sending tokens", cut="the connection closed in the middle of the answer"
        ):
            async with _post(connection, params) as response:
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
        connection = _connection()
        params = _params(model, messages, options or StreamOptions(), stream=False)
        with _translated(
            model, stalled="no answer in time", cut="the connection closed before the answer was complete"
        ):
            async with _post(connection, params) as response:
                raw = await response.aread()
        body = errors.json_object(NAME, raw)
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


@contextlib.asynccontextmanager
async def _post(connection: _Connection, params: dict) -> AsyncIterator[httpx2.Response]:
    """POST /chat/completions with the SDK's URL, headers and HTTP client, without its
    per-request machinery (typed options, retries bookkeeping, response wrappers): the body is
    plain JSON already, and the adapter reads the response itself. An error status raises the
    `ProviderError` the SDK's `APIStatusError` would have become."""
    extra = params.pop("extra_body", None)
    body = {**params, **extra} if extra else params
    http = connection.http
    request = http.build_request("POST", connection.chat_url, content=json.dumps(body), headers=connection.headers)
    response = await http.send(request, stream=True)
    try:
        if response.status_code >= 400:
            raise await _response_error(response, str(params.get("model", "")))
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
