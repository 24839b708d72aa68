"""Ollama's native `/api/chat` (NDJSON, or one object) on one pooled `httpx.AsyncClient` per event loop."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import httpx
from django.conf import settings

from providers import errors
from providers.base import ChatMessage, ModelInfo, ProviderAdapter, StreamOptions, Usage
from providers.clients import pooled, timeouts
from providers.sse import iter_lines
from providers.tokens import estimate_messages, estimate_tokens

log = logging.getLogger(__name__)
NAME = "ollama"


def _client() -> httpx.AsyncClient:
    limits = timeouts()
    key = (NAME, tuple(sorted(limits.items())))
    return pooled(
        key,
        lambda: httpx.AsyncClient(
            timeout=httpx.Timeout(**limits),
            # Every connection may be kept: a busy gateway streams many answers at once, and
            # reconnecting to Ollama for each of them costs more than an idle socket.
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=100),
            headers={"User-Agent": "billable-sessions"},
        ),
    )


def build_request(model: str, messages: list[ChatMessage], options: StreamOptions, *, stream: bool = True) -> dict:
    """The `/api/chat` body: keep_alive top-level; num_ctx, temperature, seed, num_predict in options."""
    model_options: dict = {"num_ctx": options.num_ctx or settings.OLLAMA_NUM_CTX}
    if options.temperature is not None:
        model_options["temperature"] = options.temperature
    if options.seed is not None:
        model_options["seed"] = options.seed
    if options.max_tokens is not None:
        model_options["num_predict"] = options.max_tokens
    model_options.update(options.extra.get("options", {}))
    body: dict = {
        "model": model,
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "stream": stream,
        "options": model_options,
    }
    keep_alive = options.keep_alive if options.keep_alive is not None else settings.OLLAMA_KEEP_ALIVE
    if keep_alive not in (None, ""):
        body["keep_alive"] = keep_alive
    return body


class OllamaAdapter(ProviderAdapter):
    name = NAME

    async def stream(
        self, model: str, messages: list[ChatMessage], options: StreamOptions | None = None
    ) -> AsyncIterator[str | Usage]:
        options = options or StreamOptions()
        host = settings.OLLAMA_HOST
        body = build_request(model, messages, options)
        client = _client()
        parts: list[str] = []
        final: dict | None = None
        try:
            async with client.stream(
                "POST", f"{host}/api/chat", json=body, headers={"Accept": "application/x-ndjson"}
            ) as response:
                if response.status_code != 200:
                    raw = await response.aread()
                    raise errors.from_response(NAME, response.status_code, raw, model=model)
                async for line in iter_lines(response.aiter_bytes()):
                    # After the final chunk, read to the end of the body so the connection
                    # goes back to the pool instead of being closed.
                    if final is not None or not line or line.isspace():
                        continue
                    try:
                        chunk = json.loads(line)
                    except ValueError:
                        text = line[:80].decode("utf-8", "replace")
                        raise errors.from_response(NAME, 502, f"a line that is not JSON: {text}") from None
                    if not isinstance(chunk, dict):
                        continue
                    if "error" in chunk:
                        raise errors.from_response(NAME, 200, chunk, model=model)
                    message = chunk.get("message")
                    text = message.get("content") if isinstance(message, dict) else chunk.get("response")
                    if text:
                        parts.append(text)
                        yield text
                    if chunk.get("done"):
                        final = chunk
        except httpx.ConnectTimeout:
            raise errors.timeout_error(NAME, f"no connection to {host} within {settings.PROVIDER_CONNECT_TIMEOUT:g}s")
        except httpx.ConnectError:
            raise errors.connection_error(NAME, f"nothing answers at {host}; is Ollama running?")
        except httpx.TimeoutException:
            raise errors.timeout_error(NAME, "the model stopped sending tokens")
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.CloseError):
            raise errors.connection_error(NAME, "the connection closed in the middle of the answer")
        if final is None:
            raise errors.connection_error(NAME, "the answer ended without its final chunk")
        yield self._usage(final, messages, "".join(parts))

    async def complete(
        self, model: str, messages: list[ChatMessage], options: StreamOptions | None = None
    ) -> tuple[str, Usage]:
        """One `/api/chat` response (`stream: false`): the same counts, no per-line relay."""
        host = settings.OLLAMA_HOST
        body = build_request(model, messages, options or StreamOptions(), stream=False)
        try:
            response = await _client().post(f"{host}/api/chat", json=body)
        except httpx.ConnectTimeout:
            raise errors.timeout_error(NAME, f"no connection to {host} within {settings.PROVIDER_CONNECT_TIMEOUT:g}s")
        except httpx.ConnectError:
            raise errors.connection_error(NAME, f"nothing answers at {host}; is Ollama running?")
        except httpx.TimeoutException:
            raise errors.timeout_error(NAME, "no answer in time")
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.CloseError):
            raise errors.connection_error(NAME, "the connection closed before the answer was complete")
        if response.status_code != 200:
            raise errors.from_response(NAME, response.status_code, response.content, model=model)
        try:
            final = json.loads(response.content)
        except ValueError:
            text = response.content[:80].decode("utf-8", "replace")
            raise errors.from_response(NAME, 502, f"an answer that is not JSON: {text}") from None
        if not isinstance(final, dict):
            raise errors.from_response(NAME, 502, "an answer that is not a JSON object")
        if "error" in final:
            raise errors.from_response(NAME, 200, final, model=model)
        message = final.get("message")
        text = (message.get("content") if isinstance(message, dict) else final.get("response")) or ""
        return text, self._usage(final, messages, text)

    @staticmethod
    def _usage(final: dict, messages: list[ChatMessage], text: str) -> Usage:
        prompt = final.get("prompt_eval_count")
        completion = final.get("eval_count")
        provider_model = str(final.get("model") or "")
        stop_reason = final.get("done_reason") or None
        if prompt is None and completion is None:
            return Usage(estimate_messages(messages), estimate_tokens(text), "estimated", provider_model, stop_reason)
        # Metrics are `omitempty`: a missing count is a zero, not an unknown.
        return Usage(int(prompt or 0), int(completion or 0), "provider", provider_model, stop_reason)

    async def list_models(self) -> list[ModelInfo]:
        host = settings.OLLAMA_HOST
        try:
            response = await _client().get(f"{host}/api/tags", timeout=settings.PROVIDER_CONNECT_TIMEOUT)
        except httpx.TimeoutException:
            raise errors.timeout_error(NAME, f"{host}/api/tags did not answer")
        except httpx.HTTPError:
            raise errors.connection_error(NAME, f"nothing answers at {host}; is Ollama running?")
        if response.status_code != 200:
            raise errors.from_response(NAME, response.status_code, response.content)
        try:
            entries = response.json().get("models") or []
        except ValueError:
            raise errors.from_response(NAME, 502, "the model list is not JSON") from None
        models = []
        for entry in entries:
            name = entry.get("name") or entry.get("model") if isinstance(entry, dict) else None
            if not name:
                continue
            models.append(
                ModelInfo(
                    name=f"{NAME}:{name}",
                    provider=NAME,
                    model=name,
                    context_window=settings.OLLAMA_NUM_CTX,
                    paid=False,
                )
            )
        return models
