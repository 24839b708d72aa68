"""What both gateway protocols share: the parsed chat request, the call, protocol-neutral errors."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from providers.base import ChatMessage, StreamOptions
from providers.naming import ModelRef, parse_model
from sessions_app import boundary
from sessions_app.errors import ProviderFailed, SessionError
from sessions_app.events import Done, Token

BODY_MISSING = "missing request body"
BODY_NOT_JSON = "invalid JSON in request body: {detail}"
BODY_NOT_OBJECT = "the request body must be a JSON object"
MODEL_REQUIRED = "model is required"
MODEL_NOT_FOUND = "model '{name}' not found"
MESSAGES_NOT_LIST = "messages must be a list of objects with role and content"
ROLE_UNSUPPORTED = "message {index}: role {role!r} is not supported by the gateway (system, user or assistant)"
CONTENT_NOT_TEXT = "message {index}: only text content is supported by the gateway"
IMAGES_UNSUPPORTED = "message {index}: images are not supported by the gateway"
TOOLS_UNSUPPORTED = "tools are not supported by the gateway"
LAST_NOT_USER = "the last message must be the user's"
N_UNSUPPORTED = "only n=1 is supported"
BAD_OPTION = "{name} must be {kind}"
TOKEN_MISSING = "missing API token: send 'Authorization: Bearer <token>' or use the /t/<token>/ URL prefix"
TOKEN_INVALID = "invalid or revoked API token"
TOKEN_WITHOUT_CLIENT = (
    "this API token is not bound to a client, so its work cannot be billed: "
    "create one with `python manage.py create_api_token USER --client SLUG`"
)
METHOD_NOT_ALLOWED = "method {method} not allowed"


@dataclass
class GatewayError(Exception):
    """A failure answered in the caller's protocol; `code` is the machine-readable part."""

    status: int
    message: str
    code: str = "bad_request"
    param: str | None = None
    retry_after: int | None = None  # seconds, sent as Retry-After (429, 503)

    def __str__(self) -> str:
        return self.message


# Upstream failure kinds whose HTTP status tells the client something useful; the rest are 502.
_KIND_STATUS = {"not_found": 404, "rate_limited": 429, "bad_request": 400, "timeout": 504, "overloaded": 503}


def error_from_session(exc: SessionError) -> GatewayError:
    """Map a session-service error to the status the gateway answers with."""
    status = exc.status
    if isinstance(exc, ProviderFailed):
        # An upstream auth failure is our key's problem, never the caller's token: keep it 502.
        status = _KIND_STATUS.get(str(exc.kind), exc.status)
    return GatewayError(status=status, message=exc.message, code=exc.code)


@dataclass
class ChatRequest:
    """One chat call, whatever the protocol: the history the client sent and its new message."""

    model: str  # the name as the client sent it; echoed back in every answer
    ref: ModelRef
    system: str  # the leading system message(s): the session's system prompt
    history: list[ChatMessage]  # turns before the new message, as the client holds them
    message: str  # the new user message
    stream: bool
    options: StreamOptions = field(default_factory=StreamOptions)
    include_usage: bool = False

    @property
    def model_name(self) -> str:
        """The canonical `provider:model` a session stores."""
        return self.ref.name


def read_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, through the input boundary (depth, Unicode, number ranges)."""
    if not body or not body.strip():
        raise GatewayError(400, BODY_MISSING)
    try:
        data = boundary.load_json(body)
    except boundary.InputRefused as exc:
        if exc.message == boundary.NOT_JSON:
            raise GatewayError(400, BODY_NOT_JSON.format(detail=_json_error(body))) from None
        raise GatewayError(400, exc.message) from None
    if not isinstance(data, dict):
        raise GatewayError(400, BODY_NOT_OBJECT)
    return data


def _json_error(body: bytes) -> str:
    """Where the JSON breaks, as the parser says (the boundary's message does not)."""
    try:
        json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return str(exc)[:200]
    return "not valid JSON"


def model_ref(data: dict[str, Any]) -> tuple[str, ModelRef]:
    name = data.get("model")
    if not isinstance(name, str) or not name.strip():
        raise GatewayError(400, MODEL_REQUIRED, param="model")
    try:
        return name, parse_model(name)
    except ValueError:
        raise GatewayError(400, MODEL_REQUIRED, param="model") from None


def split_conversation(messages: list[ChatMessage]) -> tuple[str, list[ChatMessage], str]:
    """Split into (system prompt, earlier turns, new user message).

    Leading system messages form the system prompt; the last message must be the user's.
    """
    lead = 0
    while lead < len(messages) and messages[lead]["role"] == "system":
        lead += 1
    system = "\n\n".join(m["content"] for m in messages[:lead])
    rest = messages[lead:]
    if not rest or rest[-1]["role"] != "user":
        raise GatewayError(400, LAST_NOT_USER, param="messages")
    return system, rest[:-1], rest[-1]["content"]


def number(data: dict[str, Any], name: str, *, integer: bool = False) -> float | int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        raise GatewayError(400, BAD_OPTION.format(name=name, kind="an integer" if integer else "a number"), param=name)
    return value


def flag(data: dict[str, Any], name: str, default: bool) -> bool:
    value = data.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise GatewayError(400, BAD_OPTION.format(name=name, kind="true or false"), param=name)
    return value


@dataclass(frozen=True)
class Metrics:
    """Ollama's done chunk: the counts (the provider's) and durations (the gateway's own), in ns."""

    prompt_tokens: int
    completion_tokens: int
    total_ns: int
    prompt_ns: int
    eval_ns: int
    done_reason: str = "stop"


class GatewayCall:
    """One gateway call's answer: the text as it arrived, and the gateway's clock for Ollama's durations."""

    __slots__ = ("done", "first_ns", "max_tokens", "parts", "started_ns")

    def __init__(self, started_ns: int, max_tokens: int | None = None) -> None:
        self.started_ns = started_ns
        self.max_tokens = max_tokens
        self.first_ns: int | None = None
        self.parts: list[str] = []
        self.done: Done | None = None

    def take(self, event: Token | Done) -> str | None:
        """Record an event; return the text delta to forward, if any."""
        if isinstance(event, Token):
            if self.first_ns is None:
                self.first_ns = time.perf_counter_ns()
            self.parts.append(event.text)
            return event.text
        self.done = event
        return None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def prompt_tokens(self) -> int:
        return self.done.message.prompt_tokens if self.done else 0

    @property
    def completion_tokens(self) -> int:
        return self.done.message.completion_tokens if self.done else 0

    @property
    def finish_reason(self) -> str:
        # The stored message keeps counts, not the stop reason: an answer that used the whole
        # allowance was cut by it.
        if self.max_tokens and self.completion_tokens >= self.max_tokens:
            return "length"
        return "stop"

    def metrics(self) -> Metrics:
        end = time.perf_counter_ns()
        first = self.first_ns or end
        return Metrics(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_ns=end - self.started_ns,
            prompt_ns=first - self.started_ns,
            eval_ns=end - first,
            done_reason=self.finish_reason,
        )
