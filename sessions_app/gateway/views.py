"""Gateway views: Ollama- and OpenAI-compatible endpoints over the session services.

One chat view (`_chat`) serves both protocols: it authenticates the token, parses the
request, joins the token's automatic session (`joining.gateway_join`) and relays
`session_chat` back; the protocol (`ollama_wire.OllamaWire`, `openai_wire.OpenAIWire`) is a
strategy that parses, frames and shapes errors. Nothing is added to the stream but framing: the text is the
provider's, the usage at the end is the provider's count.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from django.conf import settings
from django.db import OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from billing.budgets import budgets_at, budgets_version_column
from billing.catalogue import catalogue_at, catalogue_version_column
from config.dbthread import db_sync_to_async
from config.logmask import mask
from providers import router
from providers.base import ProviderError
from sessions_app import services
from sessions_app.errors import MESSAGE_EMPTY, MESSAGE_TOO_LARGE, BadInput, MessageTooLarge, SessionEnded, SessionError
from sessions_app.gateway import ollama_wire, openai_wire
from sessions_app.gateway.auth import authenticate, authenticate_raw, raw_token
from sessions_app.gateway.common import (
    METHOD_NOT_ALLOWED,
    MODEL_NOT_FOUND,
    ChatRequest,
    GatewayCall,
    GatewayError,
    error_from_session,
    model_ref,
    read_json,
)
from sessions_app.gateway.joining import gateway_join, recollections, remembered

# What /api/version reports: the Ollama API level the gateway speaks (clients gate features on it).
OLLAMA_API_VERSION = "0.12.0"
INTERNAL_ERROR = "the gateway failed unexpectedly; the error is logged"
DATABASE_BUSY = "the database is busy; retry in a moment"
BODY_TOO_LARGE = "the request body is {size} bytes; the gateway accepts at most {limit}"
# Chat tools resend the whole conversation on every call, so bodies outgrow Django's form-upload
# limit (DATA_UPLOAD_MAX_MEMORY_SIZE) long before they are unreasonable.
MAX_BODY_BYTES = 32 * 1024 * 1024
log = logging.getLogger(__name__)
# Token-authenticated answers: no cache may keep them (JSON and streams alike).
NO_STORE = "no-store"
STREAM_HEADERS = {"Cache-Control": NO_STORE, "X-Accel-Buffering": "no"}


class Framer(Protocol):
    """One call's answer in a protocol's framing."""

    def opening(self) -> bytes: ...
    def delta(self, text: str) -> bytes: ...
    def closing(self, call: GatewayCall) -> bytes: ...
    def error(self, error: GatewayError) -> bytes: ...
    def whole(self, call: GatewayCall) -> HttpResponse: ...


class ChatWire(Protocol):
    """A protocol's side of the chat view (`ollama_wire.OllamaWire`, `openai_wire.OpenAIWire`)."""

    content_type: str

    def parse(self, data: dict[str, Any]) -> ChatRequest | None: ...
    def error_response(self, error: GatewayError) -> HttpResponse: ...
    def idle_response(self, data: dict[str, Any]) -> HttpResponse: ...
    def framer(self, chat: ChatRequest) -> Framer: ...


def gateway_view(render: Callable[[GatewayError], HttpResponse]):
    """Decorate a gateway view: token auth instead of CSRF, and logs that never show a token.

    Django logs 4xx/5xx responses with the request path, which under `/t/<token>/` holds the
    secret; the gateway logs them itself with the token masked. An unexpected exception is
    answered in the protocol's error shape rather than Django's HTML page.
    """

    def decorate(view):
        @csrf_exempt
        @functools.wraps(view)
        async def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
            try:
                response = await view(request, *args, **kwargs)
            except OperationalError:
                # SQLite gave up waiting for its single writer lock (or the database is down):
                # a condition to retry, not a bug. Clients (the OpenAI SDK among them) retry a 503.
                log.warning("gateway %s %s: database busy", request.method, masked_path(request.path), exc_info=True)
                response = render(GatewayError(503, DATABASE_BUSY, code="database_busy"))
                response["Retry-After"] = "1"
            except Exception:
                log.exception("gateway %s %s failed", request.method, masked_path(request.path))
                response = render(GatewayError(500, INTERNAL_ERROR, code="internal_error"))
            if not response.has_header("Cache-Control"):
                response["Cache-Control"] = NO_STORE
            if response.status_code >= 400:
                response._has_been_logged = True
                level = logging.WARNING if response.status_code >= 500 else logging.INFO
                log.log(level, "gateway %s %s -> %s", request.method, masked_path(request.path), response.status_code)
            return response

        return wrapped

    return decorate


def masked_path(path: str) -> str:
    return mask(path)


def _methods(request: HttpRequest, allowed: tuple[str, ...], render: Callable) -> HttpResponse | None:
    if request.method in allowed:
        return None
    response = render(GatewayError(405, METHOD_NOT_ALLOWED.format(method=request.method), code="method_not_allowed"))
    response["Allow"] = ", ".join(allowed)
    return response


def _body(request: HttpRequest) -> bytes:
    size = int(request.META.get("CONTENT_LENGTH") or 0)
    if size > MAX_BODY_BYTES:
        raise GatewayError(413, BODY_TOO_LARGE.format(size=size, limit=MAX_BODY_BYTES), code="request_too_large")
    # read(), not .body: the gateway applies its own limit, above.
    return request.read(MAX_BODY_BYTES + 1)


def _check_model(name: str) -> None:
    """Refuse an unknown provider, or a paid model without a key or price, before anything is stored."""
    try:
        router.validate_model(name)
    except ValueError as exc:
        raise GatewayError(404, MODEL_NOT_FOUND.format(name=name) + f": {exc}", code="model_not_found") from None


def _prepare(raw: str, body: bytes, parse: Callable[[dict], ChatRequest | None], request: HttpRequest | None = None):
    """Authenticate, parse, validate, join the session and begin the turn (its user message
    stored), in one trip to the database thread: the provider is called straight after.

    The catalogue's version (aliases and prices) and the budgets' are read with the token, and
    hold for the rest.
    """
    token = authenticate_raw(
        raw, request, also={"catalogue": catalogue_version_column(), "budgets": budgets_version_column()}
    )
    versions = token.read_with  # type: ignore[attr-defined]
    with catalogue_at(versions["catalogue"]), budgets_at(versions["budgets"]):
        return _prepare_turn(token, body, parse)


def _prepare_turn(token, body: bytes, parse: Callable[[dict], ChatRequest | None]):
    data = read_json(body)
    chat = parse(data)
    if chat is None:
        name, _ref = model_ref(data)
        _check_model(name)
        return token, data, None, None, None
    _check_model(chat.model)
    # Refuse an unsendable message before the join stores history or moves the session.
    if not chat.message.strip():
        raise BadInput(MESSAGE_EMPTY)
    if len(chat.message) > settings.CHAT_MAX_MESSAGE_CHARS:
        limit = settings.CHAT_MAX_MESSAGE_CHARS
        raise MessageTooLarge(MESSAGE_TOO_LARGE.format(size=len(chat.message), limit=limit))
    if (begun := _begin_remembered(token, chat)) is not None:
        return token, data, chat, *begun
    retried = False
    while True:
        session, known = gateway_join(token=token, chat=chat)
        try:
            start = services.begin_turn(session_id=session.pk, user=token.user, message=chat.message, known=known)
        except SessionEnded:
            # The session ended between the join and the turn (the guardian, or the consultant
            # in the web app): nothing was stored; join again, which starts its successor.
            if retried:
                raise
            retried = True
            continue
        return token, data, chat, session, start


def _begin_remembered(token, chat: ChatRequest) -> tuple[Any, Any] | None:
    """(session, turn) begun in the session the token's last call was answered in, when this call
    continues it and it has not moved on since (`joining.recollections`); None: plan the call
    (`gateway_join`)."""
    for known in recollections(token, chat):
        try:
            start = services.begin_turn(
                session_id=known.session.pk, user=token.user, message=chat.message, known=known, only_if_current=True
            )
        except services.KnownIsStale:
            continue  # nothing was written
        return known.session, start
    return None


@dataclass
class Started:
    """A call run up to its first event; `chat` is None for an Ollama load/unload request."""

    data: dict[str, Any]
    call: GatewayCall
    chat: ChatRequest | None = None
    session: Any = None
    events: Any = None
    token: Any = None

    def remember(self) -> None:
        """Keep the answered session for the token's next call (`joining.Remembered`)."""
        if self.call.done is not None:
            remembered.remember(self.token, self.call.done.known)


async def _start_call(request: HttpRequest, path_token: str | None, parse, started_ns: int) -> Started:
    """Run the call up to its first event, so failures before any output get a real status."""
    raw = raw_token(request, path_token)
    body = _body(request)
    token, data, chat, session, start = await db_sync_to_async(_prepare)(raw, body, parse, request)
    if chat is None:
        return Started(data, GatewayCall(started_ns))
    # A caller that wants no stream gets none from upstream either: one response, no relay.
    events = services.session_chat(
        session_id=session.pk,
        user=token.user,
        message=chat.message,
        options=chat.options,
        start=start,
        stream=chat.stream,
    )
    call = GatewayCall(started_ns, chat.options.max_tokens)
    try:
        if (first := await anext(events, None)) is not None:
            call.take(first)
    except BaseException:
        await events.aclose()
        raise
    return Started(data, call, chat, session, events, token)


async def _drain(events: AsyncIterator, call: GatewayCall) -> None:
    try:
        async for event in events:
            call.take(event)
    finally:
        await events.aclose()


def _stream_failure(exc: Exception) -> GatewayError:
    """What a client is told when the stream fails after its headers went out."""
    if isinstance(exc, SessionError):
        return error_from_session(exc)
    log.exception("gateway stream failed")
    if isinstance(exc, OperationalError):
        return GatewayError(503, DATABASE_BUSY, code="database_busy")
    return GatewayError(500, INTERNAL_ERROR, code="internal_error")


async def _chat(request: HttpRequest, token: str | None, wire: ChatWire) -> HttpResponse:
    """One chat call in either protocol; `wire` (ollama_wire / openai_wire) is all that differs."""
    if refused := _methods(request, ("POST",), wire.error_response):
        return refused
    started_ns = time.perf_counter_ns()
    try:
        started = await _start_call(request, token, wire.parse, started_ns)
        if started.chat is None:
            return wire.idle_response(started.data)
        chat, session, events, call = started.chat, started.session, started.events, started.call
        framer = wire.framer(chat)
        if not chat.stream:
            await _drain(events, call)
            started.remember()
            response = framer.whole(call)
            response["X-Session-Id"] = str(session.pk)
            return response
    except GatewayError as exc:
        return wire.error_response(exc)
    except SessionError as exc:
        return wire.error_response(error_from_session(exc))

    async def body() -> AsyncIterator[bytes]:
        try:
            if opening := framer.opening():
                yield opening
            if call.parts:
                yield framer.delta(call.parts[0])
            take, delta = call.take, framer.delta
            async for event in events:
                if (text := take(event)) is not None:
                    yield delta(text)
            started.remember()
            yield framer.closing(call)
        except Exception as exc:
            yield framer.error(_stream_failure(exc))
        finally:
            await events.aclose()

    response = StreamingHttpResponse(body(), content_type=wire.content_type, headers=STREAM_HEADERS)
    response["X-Session-Id"] = str(session.pk)
    return response


OLLAMA_CHAT, OLLAMA_GENERATE, OPENAI_CHAT = (
    ollama_wire.OllamaWire("chat"),
    ollama_wire.OllamaWire("generate"),
    openai_wire.OpenAIWire(),
)


# --- Ollama ---------------------------------------------------------------------------------------


@gateway_view(ollama_wire.error_response)
async def ollama_chat(request: HttpRequest, token: str | None = None) -> HttpResponse:
    return await _chat(request, token, OLLAMA_CHAT)


@gateway_view(ollama_wire.error_response)
async def ollama_generate(request: HttpRequest, token: str | None = None) -> HttpResponse:
    return await _chat(request, token, OLLAMA_GENERATE)


UNSUPPORTED = "{path} is not supported by the gateway (see docs/INTEGRATION.md); run it against the provider itself"
NO_SUCH_ENDPOINT = "{path} is not an endpoint of the gateway (see docs/GATEWAY.md)"


def _unsupported(request: HttpRequest, render: Callable) -> HttpResponse:
    path = masked_path(request.path)
    path = path.split("/api/", 1)[-1] if "/api/" in path else path.split("/v1/", 1)[-1]
    return render(GatewayError(404, UNSUPPORTED.format(path=path), code="unsupported_endpoint"))


@gateway_view(ollama_wire.error_response)
async def ollama_unsupported(request: HttpRequest, token: str | None = None, **kwargs) -> HttpResponse:
    """Ollama endpoints beyond chatting (embeddings, model management), in Ollama's error shape."""
    return _unsupported(request, ollama_wire.error_response)


@gateway_view(openai_wire.error_response)
async def openai_unsupported(request: HttpRequest, token: str | None = None, **kwargs) -> HttpResponse:
    """OpenAI endpoints beyond Chat Completions, in OpenAI's error shape."""
    return _unsupported(request, openai_wire.error_response)


def _unknown(request: HttpRequest, render: Callable) -> HttpResponse:
    return render(GatewayError(404, NO_SUCH_ENDPOINT.format(path=masked_path(request.path)), code="not_found"))


@gateway_view(ollama_wire.error_response)
async def ollama_not_found(request: HttpRequest, token: str | None = None, **kwargs) -> HttpResponse:
    """Any other path under /api/ (but /api/ollama/, the REST API) or /t/<token>/, in Ollama's shape."""
    return _unknown(request, ollama_wire.error_response)


@gateway_view(openai_wire.error_response)
async def openai_not_found(request: HttpRequest, token: str | None = None, **kwargs) -> HttpResponse:
    """Any other path under /v1/ (`/v1/models/` with no id, say), in OpenAI's shape."""
    return _unknown(request, openai_wire.error_response)


@gateway_view(ollama_wire.error_response)
async def ollama_version(request: HttpRequest, token: str | None = None) -> HttpResponse:
    if refused := _methods(request, ("GET", "HEAD"), ollama_wire.error_response):
        return refused
    return JsonResponse({"version": OLLAMA_API_VERSION})


@gateway_view(ollama_wire.error_response)
async def ollama_root(request: HttpRequest, token: str | None = None) -> HttpResponse:
    """The Ollama CLI's heartbeat (`HEAD /`) under the token prefix."""
    if refused := _methods(request, ("GET", "HEAD"), ollama_wire.error_response):
        return refused
    return HttpResponse("Ollama is running", content_type="text/plain; charset=utf-8")


async def _models(request: HttpRequest, token: str | None, render: Callable) -> list[Any] | HttpResponse:
    try:
        await authenticate(request, token)
        return await router.available_models()
    except GatewayError as exc:
        return render(exc)
    except ProviderError as exc:
        return render(GatewayError(502, f"could not list models: {exc.message}", code="provider_error"))


def _ollama_entry(info, modified_at: str) -> dict[str, Any]:
    return {
        "name": info.model,
        "model": info.model,
        "modified_at": modified_at,
        "size": 0,
        "digest": "",
        "details": {
            "parent_model": "",
            "format": "",
            "family": "",
            "families": None,
            "parameter_size": "",
            "quantization_level": "",
        },
    }


@gateway_view(ollama_wire.error_response)
async def ollama_tags(request: HttpRequest, token: str | None = None) -> HttpResponse:
    if refused := _methods(request, ("GET", "HEAD"), ollama_wire.error_response):
        return refused
    models = await _models(request, token, ollama_wire.error_response)
    if isinstance(models, HttpResponse):
        return models
    now = ollama_wire.now_rfc3339()
    return JsonResponse({"models": [_ollama_entry(m, now) for m in models if m.provider == "ollama"]})


@gateway_view(ollama_wire.error_response)
async def ollama_ps(request: HttpRequest, token: str | None = None) -> HttpResponse:
    """Running models: the gateway holds none itself."""
    if refused := _methods(request, ("GET",), ollama_wire.error_response):
        return refused
    try:
        await authenticate(request, token)
    except GatewayError as exc:
        return ollama_wire.error_response(exc)
    return JsonResponse({"models": []})


@gateway_view(ollama_wire.error_response)
async def ollama_show(request: HttpRequest, token: str | None = None) -> HttpResponse:
    """What `ollama run` asks before chatting; answered from the model list."""
    if refused := _methods(request, ("POST",), ollama_wire.error_response):
        return refused
    models = await _models(request, token, ollama_wire.error_response)
    if isinstance(models, HttpResponse):
        return models
    try:
        data = read_json(_body(request))
        if "model" not in data and isinstance(data.get("name"), str):
            data["model"] = data["name"]
        name, ref = model_ref(data)
    except GatewayError as exc:
        return ollama_wire.error_response(exc)
    wanted = {ref.model, f"{ref.model}:latest"}
    for info in models:
        if info.provider == ref.provider and (info.model in wanted or info.model.removesuffix(":latest") in wanted):
            entry = _ollama_entry(info, ollama_wire.now_rfc3339())
            context = {"general.context_length": info.context_window} if info.context_window else {}
            return JsonResponse(
                {
                    "modelfile": "",
                    "parameters": "",
                    "template": "",
                    "details": entry["details"],
                    "model_info": context,
                    "capabilities": ["completion"],
                    "modified_at": entry["modified_at"],
                }
            )
    return ollama_wire.error_response(GatewayError(404, MODEL_NOT_FOUND.format(name=name), code="model_not_found"))


# --- OpenAI ---------------------------------------------------------------------------------------


@gateway_view(openai_wire.error_response)
async def openai_chat_completions(request: HttpRequest, token: str | None = None) -> HttpResponse:
    return await _chat(request, token, OPENAI_CHAT)


@gateway_view(openai_wire.error_response)
async def openai_models(request: HttpRequest, token: str | None = None) -> HttpResponse:
    if refused := _methods(request, ("GET",), openai_wire.error_response):
        return refused
    models = await _models(request, token, openai_wire.error_response)
    if isinstance(models, HttpResponse):
        return models
    return JsonResponse(openai_wire.models_object([m.name for m in models], int(time.time())))


@gateway_view(openai_wire.error_response)
async def openai_model(request: HttpRequest, model: str, token: str | None = None) -> HttpResponse:
    if refused := _methods(request, ("GET",), openai_wire.error_response):
        return refused
    models = await _models(request, token, openai_wire.error_response)
    if isinstance(models, HttpResponse):
        return models
    for info in models:
        if model in (info.name, info.model):
            return JsonResponse(openai_wire.models_object([info.name], int(time.time()))["data"][0])
    error = GatewayError(
        404, f"The model `{model}` does not exist or you do not have access to it.", code="model_not_found"
    )
    return openai_wire.error_response(error)
