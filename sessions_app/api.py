"""The REST API under /api/ollama/ (docs/DESIGN.md "Interfaces"): thin views over the services.

Errors are `{"error": {"code", "message"}}` with the status the domain error carries.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, time, timedelta
from functools import wraps
from pathlib import Path
from urllib.parse import urlencode

from asgiref.sync import sync_to_async
from django.core.exceptions import RequestDataTooBig
from django.core.handlers.asgi import ASGIRequest
from django.db import InterfaceError, OperationalError
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.utils.dateparse import parse_date, parse_datetime
from django.views.decorators.csrf import csrf_exempt

from sessions_app import boundary, selectors, services
from sessions_app.auth import api_user, session_for_caller
from sessions_app.errors import BadInput, MessageTooLarge, SessionError, Unavailable
from sessions_app.events import Done, Token
from sessions_app.integrity import public_key_info

logger = logging.getLogger(__name__)
OPENAPI_FILE = Path(__file__).with_name("openapi.json")
BODY_NOT_OBJECT = "The body must be a JSON object."
BODY_TOO_LARGE = "The request body is too large."
STREAM_NOT_BOOL = "'stream' must be true or false."
BAD_DATE = "{name!r} must be a date (YYYY-MM-DD) or an ISO 8601 date-time, got {value!r}."
BAD_PAGING = "'limit' must be 1 to {max} and 'offset' 0 or more."
NO_SUCH_ENDPOINT = "No such API endpoint."
INTERNAL_ERROR = "Something went wrong on our side; the error is logged. Nothing you sent was lost."
DATABASE_UNAVAILABLE = "The database is unavailable; retry in a moment."
DEFAULT_LIMIT = 50
MAX_LIMIT = 200
MAX_OFFSET = 2**31 - 1
# Seconds a client should wait before retrying a 503.
log = logging.getLogger(__name__)


def error_response(exc: SessionError) -> JsonResponse:
    response = JsonResponse(exc.as_dict(), status=exc.status)
    if retry_after := getattr(exc, "retry_after", None):
        response["Retry-After"] = str(retry_after)
    return response


def unexpected_error_response(request, exc: BaseException) -> JsonResponse:
    """An exception no view expected, in the API's error shape (never Django's HTML page).

    A database that cannot be reached is a condition to retry (503 with Retry-After); anything
    else is a bug, logged with its traceback.
    """
    if isinstance(exc, OperationalError | InterfaceError):
        log.warning("API %s %s: database unavailable", request.method, request.path, exc_info=exc)
        return error_response(Unavailable(DATABASE_UNAVAILABLE, code="database_unavailable"))
    log.error("API %s %s failed", request.method, request.path, exc_info=exc)
    return JsonResponse({"error": {"code": "internal_error", "message": INTERNAL_ERROR}}, status=500)


def _not_allowed(methods: tuple[str, ...]) -> JsonResponse:
    response = JsonResponse(
        {"error": {"code": "method_not_allowed", "message": f"Use {' or '.join(methods)}."}}, status=405
    )
    response["Allow"] = ", ".join(methods)
    return response


def _body(request) -> dict:
    try:
        raw = request.body
    except RequestDataTooBig:
        raise MessageTooLarge(BODY_TOO_LARGE) from None
    if not raw.strip():
        return {}
    data = boundary.load_json(raw)
    if not isinstance(data, dict):
        raise BadInput(BODY_NOT_OBJECT)
    return data


def _no_store(response: HttpResponse) -> HttpResponse:
    """Answers for a signed-in caller or a token are the caller's own: no cache may keep them."""
    if not response.has_header("Cache-Control"):
        response["Cache-Control"] = "no-store"
    return response


def _enter(request, methods: tuple[str, ...]) -> JsonResponse | None:
    """The input boundary's checks that need no database: the method and the query string."""
    if request.method not in methods:
        return _not_allowed(methods)
    boundary.check_query(request.GET)
    return None


def api_view(*methods: str, public: bool = False):
    """The input boundary, authentication, and every error as JSON, for sync views.

    Refuses other methods (405), a query string holding NUL, and answers domain errors with
    their status and any unexpected exception in the same error shape.
    """

    def decorator(view):
        @wraps(view)
        def wrapper(request, *args, **kwargs):
            try:
                if refused := _enter(request, methods):
                    return _no_store(refused)
                user = None if public else api_user(request)
                response = view(request, user, *args, **kwargs)
            except SessionError as exc:
                response = error_response(exc)
            except Exception as exc:
                response = unexpected_error_response(request, exc)
            return _no_store(response)

        wrapper.csrf_exempt = True  # cookie sign-ins are CSRF-checked in api_user; Bearer needs none
        return wrapper

    return decorator


def async_api_view(*methods: str):
    """`api_view` for async views (those that stream or wait for a streaming answer)."""

    def decorator(view):
        @wraps(view)
        async def wrapper(request, *args, **kwargs):
            try:
                if refused := _enter(request, methods):
                    return _no_store(refused)
                user = await sync_to_async(api_user)(request)
                data = await sync_to_async(_body)(request)
                response = await view(request, user, data, *args, **kwargs)
            except SessionError as exc:
                response = error_response(exc)
            except Exception as exc:
                response = unexpected_error_response(request, exc)
            return _no_store(response)

        wrapper.csrf_exempt = True
        return wrapper

    return decorator


# --- sessions ------------------------------------------------------------------------------


@api_view("POST")
def session_start(request, user):
    data = _body(request)
    token = getattr(request, "api_token", None)
    start = services.session_start
    extra = {}
    if data.get("template") not in (None, ""):
        start, extra = services.session_start_from_template, {"template": data["template"]}
    session = start(
        user=user,
        client=data.get("client"),
        model=data.get("model"),
        brand=data.get("brand"),
        name=data.get("name") or "",
        system_prompt=data.get("system_prompt") or "",
        source="api" if token is not None else "web",
        api_token=token,
        **extra,
    )
    return JsonResponse(
        selectors.session_as_dict(selectors.session_get_for_user(session_id=session.pk, user=user)), status=201
    )


def _ndjson(payload: dict) -> bytes:
    return (json.dumps(payload, ensure_ascii=False) + "\n").encode()


def _event_line(event) -> bytes:
    if isinstance(event, Token):
        return _ndjson({"type": "token", "text": event.text})
    return _ndjson({"type": "done", **selectors.chat_answer_as_dict(event.message, event.session)})


def _stream_response(events, first=None) -> StreamingHttpResponse:
    async def body():
        try:
            if first is not None:
                yield _event_line(first)
                if isinstance(first, Done):
                    return
            async for event in events:
                yield _event_line(event)
        except SessionError as exc:
            yield _ndjson({"type": "error", **exc.as_dict()})
        except (OperationalError, InterfaceError):
            logger.warning("API chat stream: the database is unreachable", exc_info=True)
            yield _ndjson({"type": "error", "error": {"code": "database_unavailable", "message": DATABASE_UNAVAILABLE}})
        finally:
            await events.aclose()

    response = StreamingHttpResponse(body(), content_type="application/x-ndjson")
    response["Cache-Control"] = "no-store"
    response["X-Accel-Buffering"] = "no"
    return response


@async_api_view("POST")
async def session_chat(request, user, data, session_id):
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise BadInput(STREAM_NOT_BOOL)
    message = data.get("message")
    session = await sync_to_async(session_for_caller)(request, user, session_id)
    if stream:
        # Everything that can fail before streaming answers with its own status; under ASGI we
        # wait for the first event too, so a provider failing before any token is a real 502/504.
        events = services.session_chat(session_id=session.pk, user=user, message=message)
        if not isinstance(request, ASGIRequest):
            return _stream_response(events)
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            return _stream_response(events)
        return _stream_response(events, first)
    done = None
    # The caller wants one object: the provider is asked for one response too (no token relay).
    async for event in services.session_chat(session_id=session.pk, user=user, message=message, stream=False):
        if isinstance(event, Done):
            done = event
    return JsonResponse(await sync_to_async(selectors.chat_answer_as_dict)(done.message, done.session))


@async_api_view("POST")
async def session_switch(request, user, data, session_id):
    token = getattr(request, "api_token", None)
    client = data.get("client")
    if token is not None and token.client_id and client not in (None, "", token.client.slug):
        raise BadInput(services.TOKEN_CLIENT.format(slug=token.client.slug))
    session = await sync_to_async(session_for_caller)(request, user, session_id)
    stream = await services.asession_switch(
        session_id=session.pk,
        user=user,
        client=data.get("client"),
        model=data.get("model"),
        reason=data.get("reason") or "",
    )
    return JsonResponse(await sync_to_async(selectors.stream_as_dict)(stream))


@async_api_view("POST")
async def session_end(request, user, data, session_id):
    session = await sync_to_async(session_for_caller)(request, user, session_id)
    summary = await services.asession_end(session_id=session.pk, user=user)
    return JsonResponse(summary)


@api_view("GET")
def session_summary(request, user, session_id):
    session = session_for_caller(request, user, session_id)
    return JsonResponse(selectors.session_summary(session=session))


def _when(request, name: str, *, end: bool = False) -> datetime | None:
    raw = request.GET.get(name, "").strip()
    if not raw:
        return None
    try:
        day = parse_date(raw) if len(raw) == 10 else None
        moment = None if day is not None else parse_datetime(raw)
        if moment is None:
            if day is None:
                raise ValueError(raw)
            # A bare date is a whole UTC day: `to` includes it (the bound is the next midnight).
            moment = datetime.combine(day, time.min, tzinfo=UTC)
            if end:
                moment += timedelta(days=1)
        elif moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    except ValueError:
        raise BadInput(BAD_DATE.format(name=name, value=raw[:40])) from None
    return moment


def _int_param(request, name: str, default: int, *, low: int, high: int) -> int:
    raw = request.GET.get(name, "").strip()
    if not raw:
        return default
    return boundary.int_param(raw, name, low=low, high=high, message=BAD_PAGING.format(max=MAX_LIMIT))


@api_view("GET")
def session_list(request, user):
    limit = _int_param(request, "limit", DEFAULT_LIMIT, low=1, high=MAX_LIMIT)
    offset = _int_param(request, "offset", 0, low=0, high=MAX_OFFSET)
    client = request.GET.get("client", "").strip() or None
    status = request.GET.get("status", "").strip() or None
    hidden = request.GET.get("hidden", "").strip() or "exclude"
    sessions = selectors.session_list(
        user=user,
        client=client,
        status=status,
        start=_when(request, "from"),
        end=_when(request, "to", end=True),
        hidden=hidden,
    )
    token = getattr(request, "api_token", None)
    if token is not None and token.client_id:
        sessions = sessions.filter(domain_id=token.client_id)  # a bound token sees its client's sessions only
    page = list(sessions[offset : offset + limit + 1])
    next_url = None
    if len(page) > limit:
        page = page[:limit]
        query = request.GET.copy()
        query["offset"] = str(offset + limit)
        query["limit"] = str(limit)
        next_url = request.build_absolute_uri(f"{request.path}?{urlencode(sorted(query.items()))}")
    return JsonResponse({"results": [selectors.session_as_dict(s) for s in page], "next": next_url})


# --- public --------------------------------------------------------------------------------


# Public documents: the same for everyone, so caches may keep them (every other answer is no-store).
PUBLIC_CACHE = "public, max-age=300"


@api_view("GET", public=True)
def signing_key(request, user):
    response = JsonResponse(public_key_info())
    response["Cache-Control"] = PUBLIC_CACHE
    return response


@api_view("GET", public=True)
def openapi(request, user):
    response = HttpResponse(OPENAPI_FILE.read_bytes(), content_type="application/json")
    response["Cache-Control"] = PUBLIC_CACHE
    return response


@csrf_exempt
def not_found(request, *args, **kwargs):
    """Any other path under /api/ollama/, whatever the method: a JSON 404, never a CSRF page."""
    return JsonResponse({"error": {"code": "not_found", "message": NO_SUCH_ENDPOINT}}, status=404)
