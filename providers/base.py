"""The one interface every provider adapter implements.

An adapter's `stream()` yields text deltas (`str`) and ends with exactly one `Usage`;
`complete()` asks for the whole answer in one response (no per-token relay) and returns the
text with the same `Usage`. Failures raise `ProviderError`, whose `kind` says what went wrong
and whether retrying helps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Literal, TypedDict


class ChatMessage(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class Usage:
    """Token counts of one call: the provider's own, or an estimate marked as such."""

    prompt_tokens: int
    completion_tokens: int
    source: Literal["provider", "estimated"] = "provider"
    provider_model: str = ""  # the id the provider reported, e.g. gpt-4o-2024-08-06
    stop_reason: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class StreamOptions:
    temperature: float | None = None
    max_tokens: int | None = None
    num_ctx: int | None = None  # Ollama's context window
    keep_alive: str | int | None = None  # Ollama, top-level field
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ErrorKind(StrEnum):
    NOT_FOUND = "not_found"
    AUTH = "auth"
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    TIMEOUT = "timeout"
    BAD_REQUEST = "bad_request"
    SERVER = "server"
    CONNECTION = "connection"


_RETRYABLE = {ErrorKind.RATE_LIMITED, ErrorKind.OVERLOADED, ErrorKind.SERVER, ErrorKind.CONNECTION, ErrorKind.TIMEOUT}


class ProviderError(Exception):
    """A provider call failed. `message` is fit to show a consultant."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        provider: str = "",
        status: int | None = None,
        retryable: bool | None = None,
        usage: Usage | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = ErrorKind(kind)
        self.message = message
        self.provider = provider
        self.status = status
        self.retryable = (self.kind in _RETRYABLE) if retryable is None else retryable
        self.usage = usage  # what the provider had reported before failing, if anything

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class ModelInfo:
    name: str  # "provider:model"
    provider: str
    model: str  # bare id
    context_window: int | None = None
    paid: bool = False


class ProviderAdapter(ABC):
    """Base class: one subclass per provider, registered by `name` in the router."""

    name: ClassVar[str]

    @abstractmethod
    def stream(self, model: str, messages: list[ChatMessage], options: StreamOptions) -> AsyncIterator[str | Usage]:
        """Yield text deltas, then one `Usage`. Closing the iterator closes the upstream stream."""

    async def complete(self, model: str, messages: list[ChatMessage], options: StreamOptions) -> tuple[str, Usage]:
        """The whole answer and its usage in one response. This default drains `stream()`;
        adapters whose provider reports the same usage without streaming override it."""
        parts: list[str] = []
        usage: Usage | None = None
        stream = self.stream(model, messages, options)
        try:
            async for item in stream:
                if isinstance(item, Usage):
                    usage = item
                else:
                    parts.append(item)
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        if usage is None:
            raise ProviderError(ErrorKind.CONNECTION, "the answer ended without its usage", provider=self.name)
        return "".join(parts), usage

    @abstractmethod
    async def list_models(self) -> list[ModelInfo]:
        """Models this provider offers right now."""
