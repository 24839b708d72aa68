"""Map every documented provider failure to a `ProviderError` a consultant can read."""

from __future__ import annotations

import json
from typing import Any

from providers.base import ErrorKind, ProviderError, Usage

LABELS = {"ollama": "Ollama", "openai": "OpenAI", "anthropic": "Anthropic"}

# Provider error `type`/`code` strings (OpenAI, Anthropic) to kinds.
_TYPE_KINDS = {
    "invalid_request_error": ErrorKind.BAD_REQUEST,
    "request_too_large": ErrorKind.BAD_REQUEST,
    "authentication_error": ErrorKind.AUTH,
    "permission_error": ErrorKind.AUTH,
    "billing_error": ErrorKind.AUTH,
    "invalid_api_key": ErrorKind.AUTH,
    "insufficient_quota": ErrorKind.AUTH,
    "not_found_error": ErrorKind.NOT_FOUND,
    "model_not_found": ErrorKind.NOT_FOUND,
    "rate_limit_error": ErrorKind.RATE_LIMITED,
    "rate_limit_exceeded": ErrorKind.RATE_LIMITED,
    "tokens": ErrorKind.RATE_LIMITED,
    "requests": ErrorKind.RATE_LIMITED,
    "overloaded_error": ErrorKind.OVERLOADED,
    "timeout_error": ErrorKind.TIMEOUT,
    "api_error": ErrorKind.SERVER,
    "server_error": ErrorKind.SERVER,
}

_WHAT = {
    ErrorKind.NOT_FOUND: "does not know this model",
    ErrorKind.AUTH: "refused the credentials",
    ErrorKind.RATE_LIMITED: "is rate limiting requests",
    ErrorKind.OVERLOADED: "is overloaded",
    ErrorKind.TIMEOUT: "timed out",
    ErrorKind.BAD_REQUEST: "rejected the request",
    ErrorKind.SERVER: "had an internal error",
    ErrorKind.CONNECTION: "connection failed",
}

_ADVICE = {
    ErrorKind.NOT_FOUND: "Pick another model, or pull it first (ollama pull NAME).",
    ErrorKind.AUTH: "Check the API key and the account's access and billing.",
    ErrorKind.RATE_LIMITED: "Wait a moment and try again.",
    ErrorKind.OVERLOADED: "Try again in a moment.",
    ErrorKind.TIMEOUT: "Try again, or pick a faster model.",
    ErrorKind.BAD_REQUEST: "",
    ErrorKind.SERVER: "Try again in a moment.",
    ErrorKind.CONNECTION: "Try again in a moment.",
}


def kind_for_status(status: int) -> ErrorKind:
    if status in (401, 402, 403):
        return ErrorKind.AUTH
    if status == 404:
        return ErrorKind.NOT_FOUND
    if status in (408, 504):
        return ErrorKind.TIMEOUT
    if status == 429:
        return ErrorKind.RATE_LIMITED
    if status in (503, 529):
        return ErrorKind.OVERLOADED
    if status == 499:
        return ErrorKind.CONNECTION
    if status >= 500 or status == 409:
        return ErrorKind.SERVER
    return ErrorKind.BAD_REQUEST


def describe(provider: str, kind: ErrorKind, detail: str, status: int | None = None) -> str:
    label = LABELS.get(provider, provider or "The provider")
    code = f" ({status})" if status and status != 200 else ""
    text = f"{label} {_WHAT[kind]}{code}"
    detail = " ".join((detail or "").split())
    if len(detail) > 300:
        detail = detail[:297] + "..."
    if detail:
        text += f": {detail.rstrip('.')}."
    else:
        text += "."
    if advice := _ADVICE[kind]:
        text += f" {advice}"
    return text


def parse_error_body(body: Any) -> tuple[str, str | None]:
    """The message and type/code of any documented error body (a dict, JSON text or plain text)."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return body.strip(), None
    if not isinstance(body, dict):
        return "", None
    error = body.get("error", body)
    if isinstance(error, str):  # Ollama: {"error": "..."}
        return error, None
    if isinstance(error, dict):
        message = error.get("message") or ""
        code = error.get("code")
        etype = error.get("type")
        # OpenAI's `code` is the more precise one (insufficient_quota, model_not_found, invalid_api_key).
        for candidate in (code, etype):
            if isinstance(candidate, str) and candidate in _TYPE_KINDS:
                return str(message), candidate
        return str(message), etype if isinstance(etype, str) else None
    return "", None


def from_response(
    provider: str, status: int, body: Any, *, model: str = "", usage: Usage | None = None
) -> ProviderError:
    """A `ProviderError` for an HTTP error status, or for an error event inside a 200 stream."""
    message, etype = parse_error_body(body)
    kind = _TYPE_KINDS.get(etype or "") if etype else None
    if kind is None:
        kind = kind_for_status(status) if status and status != 200 else ErrorKind.SERVER
    if kind is ErrorKind.NOT_FOUND and model and model not in message:
        message = f"model {model!r}: {message}" if message else f"model {model!r} not found"
    retryable = None
    if etype == "insufficient_quota":
        retryable = False
    if status == 200:
        message = f"the answer broke off: {message}" if message else "the answer broke off"
    return ProviderError(
        kind,
        describe(provider, kind, message, status),
        provider=provider,
        status=status,
        retryable=retryable,
        usage=usage,
    )


def json_object(provider: str, raw: bytes) -> dict[str, Any]:
    """A whole (not streamed) answer's body as a JSON object, or the error saying what came instead."""
    try:
        body = json.loads(raw)
    except ValueError:
        text = raw[:80].decode("utf-8", "replace")
        raise from_response(provider, 502, f"an answer that is not JSON: {text}") from None
    if not isinstance(body, dict):
        raise from_response(provider, 502, "an answer that is not a JSON object")
    return body


def connection_error(provider: str, detail: str, *, usage: Usage | None = None) -> ProviderError:
    return ProviderError(
        ErrorKind.CONNECTION, describe(provider, ErrorKind.CONNECTION, detail), provider=provider, usage=usage
    )


def timeout_error(
    provider: str, detail: str, *, usage: Usage | None = None, retryable: bool | None = None
) -> ProviderError:
    return ProviderError(
        ErrorKind.TIMEOUT,
        describe(provider, ErrorKind.TIMEOUT, detail),
        provider=provider,
        usage=usage,
        retryable=retryable,
    )
