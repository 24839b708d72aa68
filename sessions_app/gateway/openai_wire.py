"""OpenAI Chat Completions on the wire: request parsing, SSE chunks and JSON answers (docs/PROTOCOLS.md §2)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from django.http import HttpResponse, JsonResponse

from providers.base import ChatMessage, StreamOptions
from sessions_app.gateway.common import (
    CONTENT_NOT_TEXT,
    IMAGES_UNSUPPORTED,
    LAST_NOT_USER,
    MESSAGES_NOT_LIST,
    N_UNSUPPORTED,
    ROLE_UNSUPPORTED,
    TOOLS_UNSUPPORTED,
    ChatRequest,
    GatewayCall,
    GatewayError,
    flag,
    model_ref,
    number,
    split_conversation,
)

EVENT_STREAM = "text/event-stream"
DONE_EVENT = b"data: [DONE]\n\n"
STREAM_OPTIONS_BAD = "stream_options must be an object"

# Request fields handed to the adapter untouched; everything else unknown is ignored, as OpenAI does.
_PASSTHROUGH = ("top_p", "stop", "presence_penalty", "frequency_penalty", "response_format", "logit_bias", "user")
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _text(index: int, content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif kind in ("image_url", "input_image", "input_audio", "file"):
                raise GatewayError(400, IMAGES_UNSUPPORTED.format(index=index), param=f"messages[{index}].content")
            else:
                raise GatewayError(400, CONTENT_NOT_TEXT.format(index=index), param=f"messages[{index}].content")
        return "".join(parts)
    raise GatewayError(400, CONTENT_NOT_TEXT.format(index=index), param=f"messages[{index}].content")


def _messages(raw: Any) -> list[ChatMessage]:
    if not isinstance(raw, list) or not raw:
        raise GatewayError(400, MESSAGES_NOT_LIST, param="messages")
    messages: list[ChatMessage] = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise GatewayError(400, MESSAGES_NOT_LIST, param="messages")
        role = item.get("role")
        role = _ROLES.get(role) if isinstance(role, str) else None
        if role is None:
            raise GatewayError(
                400, ROLE_UNSUPPORTED.format(index=index, role=item.get("role")), param=f"messages[{index}].role"
            )
        if item.get("tool_calls") or item.get("function_call"):
            raise GatewayError(400, TOOLS_UNSUPPORTED, param=f"messages[{index}]")
        messages.append(ChatMessage(role=role, content=_text(index, item.get("content"))))
    return messages


def parse_chat(data: dict[str, Any]) -> ChatRequest:
    name, ref = model_ref(data)
    if data.get("tools") or data.get("functions"):
        raise GatewayError(400, TOOLS_UNSUPPORTED, param="tools")
    n = number(data, "n", integer=True)
    if n not in (None, 1):
        raise GatewayError(400, N_UNSUPPORTED, param="n")
    messages = _messages(data.get("messages"))
    stream = flag(data, "stream", False)
    stream_options = data.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise GatewayError(400, STREAM_OPTIONS_BAD, param="stream_options")
    max_tokens = number(data, "max_completion_tokens", integer=True)
    if max_tokens is None:
        max_tokens = number(data, "max_tokens", integer=True)
    options = StreamOptions(
        temperature=number(data, "temperature"),
        max_tokens=max_tokens,
        seed=number(data, "seed", integer=True),
        extra={k: data[k] for k in _PASSTHROUGH if data.get(k) is not None},
    )
    system, history, message = split_conversation(messages)
    return ChatRequest(
        model=name,
        ref=ref,
        system=system,
        history=history,
        message=message,
        stream=stream,
        options=options,
        include_usage=stream and flag(stream_options, "include_usage", False),
    )


def usage_object(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class Completion:
    """One completion's identity: every chunk carries the same id, created and model."""

    model: str
    include_usage: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    _delta_frame: tuple[bytes, bytes] | None = field(default=None, init=False, repr=False, compare=False)

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        payload: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            # The spec: with include_usage every chunk but the last carries `usage: null`.
            payload["usage"] = None
        payload.update(extra)
        return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"

    def role_chunk(self) -> bytes:
        return self._chunk([_choice({"role": "assistant", "content": ""})])

    def delta_chunk(self, text: str) -> bytes:
        """`_chunk([_choice({"content": text})])`, byte for byte, from a frame built once per
        completion: only the text is encoded per token."""
        frame = self._delta_frame
        if frame is None:
            marker = "\x00"
            whole = self._chunk([_choice({"content": marker})]).decode()
            head, _, tail = whole.rpartition(json.dumps(marker))
            frame = self._delta_frame = (head.encode(), tail.encode())
        return frame[0] + json.dumps(text, ensure_ascii=False).encode() + frame[1]

    def finish_chunk(self, finish_reason: str) -> bytes:
        return self._chunk([_choice({}, finish_reason)])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return self._chunk([], usage=usage_object(prompt_tokens, completion_tokens))

    def response(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> HttpResponse:
        """The non-streaming `chat.completion` object."""
        payload = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": usage_object(prompt_tokens, completion_tokens),
        }
        return JsonResponse(payload, json_dumps_params={"ensure_ascii": False})


def _choice(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def _error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    if status == 429:
        return "rate_limit_error"
    if status == 402:
        return "insufficient_quota"  # a client's budget is used up: OpenAI's own type for it
    return "invalid_request_error"


def error_object(error: GatewayError) -> dict[str, Any]:
    return {
        "error": {
            "message": error.message,
            "type": _error_type(error.status),
            "param": error.param,
            "code": error.code,
        }
    }


def error_event(error: GatewayError) -> bytes:
    """A mid-stream failure: the SDK raises APIError on a data event with an `error` key."""
    return b"data: " + json.dumps(error_object(error), ensure_ascii=False).encode() + b"\n\n"


def error_response(error: GatewayError) -> HttpResponse:
    response = JsonResponse(error_object(error), status=error.status)
    if error.retry_after:
        response["Retry-After"] = str(error.retry_after)
    return response


def models_object(names: list[str], created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": name.split(":", 1)[0]} for name in names
        ],
    }


class OpenAIWire:
    """The chat view's strategy for `/v1/chat/completions`: server-sent events or one object."""

    content_type = EVENT_STREAM
    parse = staticmethod(parse_chat)
    error_response = staticmethod(error_response)

    def idle_response(self, data: dict[str, Any]) -> HttpResponse:
        raise GatewayError(400, LAST_NOT_USER, param="messages")  # parse_chat never asks for one

    def framer(self, chat: ChatRequest) -> OpenAIFramer:
        return OpenAIFramer(Completion(model=chat.model, include_usage=chat.include_usage))


class OpenAIFramer:
    """One completion's chunks; the closing ones go out as one write (the events stay separate)."""

    __slots__ = ("completion",)

    def __init__(self, completion: Completion) -> None:
        self.completion = completion

    def opening(self) -> bytes:
        return self.completion.role_chunk()

    def delta(self, text: str) -> bytes:
        return self.completion.delta_chunk(text)

    def closing(self, call: GatewayCall) -> bytes:
        completion = self.completion
        closing = completion.finish_chunk(call.finish_reason)
        if completion.include_usage:
            closing += completion.usage_chunk(call.prompt_tokens, call.completion_tokens)
        return closing + DONE_EVENT

    def error(self, error: GatewayError) -> bytes:
        return error_event(error)

    def whole(self, call: GatewayCall) -> HttpResponse:
        return self.completion.response(call.text, call.finish_reason, call.prompt_tokens, call.completion_tokens)
