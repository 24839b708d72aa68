"""From `provider:model` to an adapter, with aliases, timeouts and retries applied.

`stream_chat()` is what the rest of the project calls. It yields text deltas, then exactly
one `Usage`, and raises `ProviderError`. Closing it (`aclose()`, or cancelling the task that
iterates it, with `contextlib.aclosing`) closes the upstream HTTP stream, so the provider stops
generating and billing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from django.conf import settings
from django.utils import timezone

from config.dbthread import db_sync_to_async
from providers import errors
from providers.anthropic_adapter import AnthropicAdapter
from providers.base import ChatMessage, ModelInfo, ProviderAdapter, ProviderError, StreamOptions, Usage
from providers.catalogue import EmptyCatalogue, ModelCatalogue
from providers.clients import reset_clients
from providers.naming import PAID_PROVIDERS, PROVIDERS, ModelRef, parse_model
from providers.ollama_adapter import OllamaAdapter
from providers.openai_adapter import OpenAIAdapter

log = logging.getLogger(__name__)


ADAPTERS: dict[str, type[ProviderAdapter]] = {
    "ollama": OllamaAdapter,
    "openai": OpenAIAdapter,
    "anthropic": AnthropicAdapter,
}
DEFAULT_CONTEXT_WINDOW = 8192
_catalogue: ModelCatalogue = EmptyCatalogue()
KEY_SETTINGS = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}

ERR_MALFORMED = "Model names look like provider:model, for example ollama:llama3.2 or openai:gpt-4o."
ERR_UNKNOWN_PROVIDER = "Unknown provider {provider!r}; use one of: {known}."
ERR_NO_KEY = "{label} is not configured on this server (set {setting}), so {name} cannot be used."
ERR_NO_PRICE = "{name} has no price on file, so its cost could not be billed; ask staff to add a model price."

__all__ = [
    "ADAPTERS",
    "available_models",
    "context_window",
    "get_adapter",
    "reset_clients",
    "resolve_alias",
    "set_catalogue",
    "stream_chat",
    "validate_model",
]


def get_adapter(provider: str) -> ProviderAdapter:
    try:
        return ADAPTERS[provider]()
    except KeyError:
        raise ValueError(ERR_UNKNOWN_PROVIDER.format(provider=provider, known=", ".join(PROVIDERS))) from None


def _ref(model: str | ModelRef) -> ModelRef:
    if isinstance(model, ModelRef):
        return model
    try:
        return parse_model(model)
    except ValueError as exc:
        raise ValueError(f"{exc}. {ERR_MALFORMED}") from None


def set_catalogue(catalogue: ModelCatalogue) -> None:
    """Hand the router the model catalogue (aliases, prices, windows) of the app that owns it."""
    global _catalogue
    _catalogue = catalogue


def resolve_alias(ref: ModelRef) -> ModelRef:
    """The provider's id behind a friendly name (`claude-sonnet-4` → `claude-sonnet-4-20250514`)."""
    return _catalogue.resolve_alias(ref)


def _has_key(provider: str) -> bool:
    return bool(getattr(settings, KEY_SETTINGS[provider], ""))


def validate_model(name: str) -> ModelRef:
    """The `ModelRef` for a name a consultant may pick, or ValueError saying why not."""
    ref = _ref(name)
    if ref.provider not in ADAPTERS:
        raise ValueError(ERR_UNKNOWN_PROVIDER.format(provider=ref.provider, known=", ".join(PROVIDERS)))
    if not ref.model or any(ch.isspace() for ch in ref.model):
        raise ValueError(f"{name!r} is not a model name. {ERR_MALFORMED}")
    if ref.paid:
        if not _has_key(ref.provider):
            raise ValueError(
                ERR_NO_KEY.format(label=errors.LABELS[ref.provider], setting=KEY_SETTINGS[ref.provider], name=ref.name)
            )
        if not _catalogue.is_priced(ref, timezone.now()):
            raise ValueError(ERR_NO_PRICE.format(name=ref.name))
    return ref


def context_window(ref: ModelRef) -> int:
    """How many tokens the model accepts (Ollama: the num_ctx we send)."""
    if ref.provider == "ollama":
        return settings.OLLAMA_NUM_CTX
    return _catalogue.context_window(ref, timezone.now()) or DEFAULT_CONTEXT_WINDOW


async def available_models() -> list[ModelInfo]:
    """Live Ollama models, plus the paid models that have a key configured and a price."""
    models: list[ModelInfo] = []
    try:
        models.extend(await OllamaAdapter().list_models())
    except ProviderError as exc:
        log.warning("Ollama models unavailable: %s", exc)
    models.extend(await db_sync_to_async(_paid_models)())
    return models


def _paid_models() -> list[ModelInfo]:
    keyed = tuple(provider for provider in PAID_PROVIDERS if _has_key(provider))
    return _catalogue.paid_models(keyed, timezone.now()) if keyed else []


async def stream_chat(
    model: str | ModelRef,
    messages: list[ChatMessage],
    options: StreamOptions | None = None,
    *,
    resolved: bool = False,
    stream: bool = True,
) -> AsyncIterator[str | Usage]:
    """Stream one answer: text deltas, then exactly one `Usage`. Raises `ProviderError`.

    Retries (at most PROVIDER_MAX_RETRIES) only before the first token and only when the error
    says a retry can help; never after a first-token timeout (the consultant already waited).
    `resolved` says the caller has already looked up the model's alias (`resolve_alias`).

    With `stream=False` the provider is asked for the whole answer in one response
    (`adapter.complete`), which arrives here as one delta and the `Usage`: a caller that wants
    no deltas skips the per-token relay. The whole answer may take the first-token limit plus
    the between-token limit.
    """
    ref = _ref(model)
    adapter = get_adapter(ref.provider)
    if not resolved:
        ref = await db_sync_to_async(resolve_alias)(ref)
    options = options or StreamOptions()
    first_limit = settings.PROVIDER_FIRST_TOKEN_TIMEOUT
    idle_limit = settings.PROVIDER_IDLE_TIMEOUT
    if not stream:
        first_limit += idle_limit
    attempt = 0
    while True:
        upstream: Any = (
            adapter.stream(ref.model, messages, options) if stream else _whole(adapter, ref.model, messages, options)
        )
        watchdog = _Watchdog()
        started = False
        try:
            while True:
                watchdog.arm(idle_limit if started else first_limit)
                try:
                    item = await upstream.__anext__()
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if not watchdog.expired():
                        raise
                    if started:
                        raise errors.timeout_error(
                            ref.provider, f"no token for {idle_limit:g}s in the middle of the answer"
                        ) from None
                    waited = "no first token" if stream else "no answer"
                    raise errors.timeout_error(
                        ref.provider, f"{waited} within {first_limit:g}s", retryable=False
                    ) from None
                finally:
                    watchdog.disarm()
                if isinstance(item, str):
                    if not item:
                        continue
                    started = True
                    yield item
                else:
                    started = True
                    yield item
        except ProviderError as exc:
            if not exc.provider:
                exc.provider = ref.provider
            if started or not exc.retryable or attempt >= settings.PROVIDER_MAX_RETRIES:
                raise
            attempt += 1
            delay = _backoff(attempt)
            log.info("Retrying %s after %s (attempt %s, in %.2fs)", ref.name, exc.kind, attempt + 1, delay)
            await asyncio.sleep(delay)
        finally:
            watchdog.close()
            await upstream.aclose()


async def _whole(
    adapter: ProviderAdapter, model: str, messages: list[ChatMessage], options: StreamOptions
) -> AsyncIterator[str | Usage]:
    """`adapter.complete()` in the shape of a stream: the whole text, then its `Usage`."""
    text, usage = await adapter.complete(model, messages, options)
    if text:
        yield text
    yield usage


class _Watchdog:
    """A deadline for each wait on the provider, cheaper than `asyncio.timeout()` per token.

    One timer serves the whole stream: arming only moves the deadline, and the timer re-arms
    itself for the later deadline when it fires early. When a wait outlasts its deadline, the
    waiting task is cancelled (and `expired()` turns that back into a timeout, as
    `asyncio.timeout` does); time the consumer spends between tokens never counts.
    """

    __slots__ = ("_deadline", "_fired", "_handle", "_loop", "_task")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._task: asyncio.Task | None = None
        self._fired = False

    def arm(self, seconds: float) -> None:
        self._deadline = deadline = self._loop.time() + seconds
        self._task = asyncio.current_task()
        handle = self._handle
        if handle is None or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._handle = self._loop.call_at(deadline, self._check)

    def disarm(self) -> None:
        self._deadline = None

    def _check(self) -> None:
        self._handle = None
        if self._deadline is None:
            return  # not waiting now; the next arm() schedules a new check
        if self._loop.time() < self._deadline:
            self._handle = self._loop.call_at(self._deadline, self._check)
            return
        if self._task is not None and not self._task.done():
            self._fired = True
            self._task.cancel()

    def expired(self) -> bool:
        """True when our own cancellation is being delivered (and takes it back from the task)."""
        if not self._fired:
            return False
        self._fired = False
        task = self._task
        return task is None or task.uncancel() == 0

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._deadline = None


def _backoff(attempt: int) -> float:
    base = settings.PROVIDER_RETRY_BACKOFF
    return min(base * (2 ** (attempt - 1)), 8.0)
