"""Ollama's native API on the wire: request parsing and NDJSON / JSON answers (docs/PROTOCOLS.md §1)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from django.http import HttpResponse, JsonResponse

from providers.base import ChatMessage, StreamOptions
from sessions_app.gateway.common import (
    CONTENT_NOT_TEXT,
    IMAGES_UNSUPPORTED,
    MESSAGES_NOT_LIST,
    ROLE_UNSUPPORTED,
    TOOLS_UNSUPPORTED,
    ChatRequest,
    GatewayCall,
    GatewayError,
    Metrics,
    flag,
    model_ref,
    number,
    split_conversation,
)

NDJSON = "application/x-ndjson"
SUFFIX_UNSUPPORTED = "suffix (fill-in-the-middle) is not supported by the gateway"
RAW_UNSUPPORTED = "raw prompts are not supported by the gateway; send the conversation to /api/chat"
PROMPT_NOT_TEXT = "prompt must be a string"
SYSTEM_NOT_TEXT = "system must be a string"
OPTIONS_NOT_OBJECT = "options must be an object"
KEEP_ALIVE_BAD = "keep_alive must be a duration string or a number of seconds"

# Options the gateway maps onto StreamOptions; the rest travel to the adapter untouched in `extra`.
_MAPPED_OPTIONS = {"temperature", "num_predict", "num_ctx", "seed"}


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _options(data: dict[str, Any]) -> StreamOptions:
    raw = data.get("options") or {}
    if not isinstance(raw, dict):
        raise GatewayError(400, OPTIONS_NOT_OBJECT, param="options")
    keep_alive = data.get("keep_alive")
    if keep_alive is not None and (isinstance(keep_alive, bool) or not isinstance(keep_alive, str | int | float)):
        raise GatewayError(400, KEEP_ALIVE_BAD, param="keep_alive")
    num_predict = number(raw, "num_predict", integer=True)
    extra = {k: v for k, v in raw.items() if k not in _MAPPED_OPTIONS}
    if data.get("format"):
        extra["format"] = data["format"]
    return StreamOptions(
        temperature=number(raw, "temperature"),
        # Ollama reads a negative num_predict as "no limit".
        max_tokens=num_predict if num_predict is not None and num_predict > 0 else None,
        num_ctx=number(raw, "num_ctx", integer=True),
        seed=number(raw, "seed", integer=True),
        keep_alive=keep_alive,
        extra=extra,
    )


def _messages(raw: Any) -> list[ChatMessage]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise GatewayError(400, MESSAGES_NOT_LIST, param="messages")
    messages: list[ChatMessage] = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise GatewayError(400, MESSAGES_NOT_LIST, param="messages")
        role = item.get("role")
        if role not in ("system", "user", "assistant"):
            raise GatewayError(400, ROLE_UNSUPPORTED.format(index=index, role=role), param="messages")
        content = item.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise GatewayError(400, CONTENT_NOT_TEXT.format(index=index), param="messages")
        if item.get("images"):
            raise GatewayError(400, IMAGES_UNSUPPORTED.format(index=index), param="messages")
        if item.get("tool_calls"):
            raise GatewayError(400, TOOLS_UNSUPPORTED, param="messages")
        messages.append(ChatMessage(role=role, content=content))
    return messages


def parse_chat(data: dict[str, Any]) -> ChatRequest | None:
    """Parse `/api/chat`; None means a load/unload request (no messages)."""
    name, ref = model_ref(data)
    if data.get("tools"):
        raise GatewayError(400, TOOLS_UNSUPPORTED, param="tools")
    messages = _messages(data.get("messages"))
    options = _options(data)
    stream = flag(data, "stream", True)
    if not messages:
        return None
    system, history, message = split_conversation(messages)
    return ChatRequest(
        model=name, ref=ref, system=system, history=history, message=message, stream=stream, options=options
    )


def parse_generate(data: dict[str, Any]) -> ChatRequest | None:
    """Parse `/api/generate` as a one-turn conversation; None means a load/unload request."""
    name, ref = model_ref(data)
    prompt = data.get("prompt") or ""
    system = data.get("system") or ""
    if not isinstance(prompt, str):
        raise GatewayError(400, PROMPT_NOT_TEXT, param="prompt")
    if not isinstance(system, str):
        raise GatewayError(400, SYSTEM_NOT_TEXT, param="system")
    if data.get("suffix"):
        raise GatewayError(400, SUFFIX_UNSUPPORTED, param="suffix")
    if flag(data, "raw", False):
        raise GatewayError(400, RAW_UNSUPPORTED, param="raw")
    if data.get("images"):
        raise GatewayError(400, IMAGES_UNSUPPORTED.format(index=0), param="images")
    options = _options(data)
    stream = flag(data, "stream", True)
    if not prompt:
        return None
    return ChatRequest(model=name, ref=ref, system=system, history=[], message=prompt, stream=stream, options=options)


def _line(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _body(kind: str, text: str) -> dict[str, Any]:
    return {"message": {"role": "assistant", "content": text}} if kind == "chat" else {"response": text}


def delta_line(kind: str, model: str, text: str) -> bytes:
    """One intermediate NDJSON chunk (`kind` is "chat" or "generate")."""
    return _line({"model": model, "created_at": now_rfc3339(), **_body(kind, text), "done": False})


def final_object(kind: str, model: str, text: str, metrics: Metrics) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": model, "created_at": now_rfc3339(), **_body(kind, text)}
    payload.update(
        {
            "done_reason": metrics.done_reason,
            "done": True,
            "total_duration": metrics.total_ns,
            "prompt_eval_count": metrics.prompt_tokens,
            "prompt_eval_duration": metrics.prompt_ns,
            "eval_count": metrics.completion_tokens,
            "eval_duration": metrics.eval_ns,
        }
    )
    return payload


def done_line(kind: str, model: str, metrics: Metrics) -> bytes:
    return _line(final_object(kind, model, "", metrics))


def error_line(message: str) -> bytes:
    """A mid-stream failure: one NDJSON line with `error`; no done chunk follows."""
    return _line({"error": message})


def complete_response(kind: str, model: str, text: str, metrics: Metrics) -> HttpResponse:
    """The `stream: false` answer."""
    return JsonResponse(final_object(kind, model, text, metrics), json_dumps_params={"ensure_ascii": False})


def load_response(kind: str, model: str, *, unload: bool, stream: bool) -> HttpResponse:
    """Answer a load/unload request (no messages or an empty prompt) without calling anyone."""
    payload = {"model": model, "created_at": now_rfc3339(), **_body(kind, "")}
    payload.update({"done_reason": "unload" if unload else "load", "done": True})
    if stream:
        return HttpResponse(_line(payload), content_type=NDJSON)
    return JsonResponse(payload)


def error_response(error: GatewayError) -> HttpResponse:
    response = JsonResponse({"error": error.message}, status=error.status)
    if error.retry_after:
        response["Retry-After"] = str(error.retry_after)
    return response


class OllamaWire:
    """The chat view's strategy for `/api/chat` and `/api/generate` (`kind`): NDJSON or one object."""

    content_type = NDJSON

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.parse = parse_chat if kind == "chat" else parse_generate

    error_response = staticmethod(error_response)

    def idle_response(self, data: dict[str, Any]) -> HttpResponse:
        """A load or unload request (no conversation): answered without a session."""
        return load_response(
            self.kind,
            data["model"],
            unload=data.get("keep_alive") in (0, "0", "0s"),
            stream=data.get("stream") is not False,
        )

    def framer(self, chat: ChatRequest) -> OllamaFramer:
        return OllamaFramer(self.kind, chat.model)


class OllamaFramer:
    """One call's answer in Ollama's framing."""

    __slots__ = ("kind", "model")

    def __init__(self, kind: str, model: str) -> None:
        self.kind, self.model = kind, model

    def opening(self) -> bytes:
        return b""

    def delta(self, text: str) -> bytes:
        return delta_line(self.kind, self.model, text)

    def closing(self, call: GatewayCall) -> bytes:
        return done_line(self.kind, self.model, call.metrics())

    def error(self, error: GatewayError) -> bytes:
        return error_line(error.message)

    def whole(self, call: GatewayCall) -> HttpResponse:
        return complete_response(self.kind, self.model, call.text, call.metrics())
