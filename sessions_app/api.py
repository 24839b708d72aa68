"""The REST API under /api/ollama/ (DESIGN.md "Interfaces"): thin views over the services.

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

from sessions_app import selectors, services
from sessions_app.auth import api_user
from sessions_app.errors import BadInput, MessageTooLarge, SessionError, Unavailable
from sessions_app.events import Done, Token
from sessions_app.integrity import public_key_info

logger = logging.getLogger(__name__)
OPENAPI_FILE = Path(__file__).with_name("openapi.json")
MALFORMED_JSON = "The body is not valid JSON."
BODY_NOT_OBJECT = "The body must be a JSON object."
BODY_TOO_LARGE = "The request body is too large."
STREAM_NOT_BOOL = "'stream' must be true or false."
BAD_DATE = "{name!r} must be a date (YYYY-MM-DD) or an ISO 8601 date-time, got {value!r}."
BAD_PAGING = "'limit' must be 1 to {max} and 'offset' 0 or more."
NO_SUCH_ENDPOINT = "No such API endpoint."
DATABASE_UNAVAILABLE = "The database is unreachable; retry in a moment."
DEFAULT_LIMIT = 50
MAX_LIMIT = 200


def error_response(exc: SessionError) -> JsonResponse:
    response = JsonResponse(exc.as_dict(), status=exc.status)
    if isinstance(exc, Unavailable):
        response["Retry-After"] = str(exc.retry_after)
    return response


def _database_unavailable(request) -> JsonResponse:
    # A condition to retry, not a bug: 503 in the error shape (never the HTML 500 page).
    logger.warning("API %s %s: the database is unreachable", request.method, request.path, exc_info=True)
    return error_response(Unavailable(DATABASE_UNAVAILABLE, code="database_unavailable"))


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
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadInput(MALFORMED_JSON) from None
    if not isinstance(data, dict):
        raise BadInput(BODY_NOT_OBJECT)
    return data


def api_view(*methods: str, public: bool = False):
    """Method check, authentication, JSON body, and domain errors as JSON, for sync views."""

    def decorator(view):
        @wraps(view)
        def wrapper(request, *args, **kwargs):
            if request.method not in methods:
                return _not_allowed(methods)
            try:
                user = None if public else api_user(request)
                return view(request, user, *args, **kwargs)
            except SessionError as exc:
                return error_response(exc)
            except (OperationalError, InterfaceError):
                return _database_unavailable(request)

        wrapper.csrf_exempt = True  # cookie sign-ins are CSRF-checked in api_user; Bearer needs none
        return wrapper

    return decorator


def async_api_view(*methods: str):
    """`api_view` for async views (those that stream or wait for a streaming answer)."""

    def decorator(view):
        @wraps(view)
        async def wrapper(request, *args, **kwargs):
            if request.method not in methods:
                return _not_allowed(methods)
            try:
                user = await sync_to_async(api_user)(request)
                data = await sync_to_async(_body)(request)
                return await view(request, user, data, *args, **kwargs)
            except SessionError as exc:
                return error_response(exc)
            except (OperationalError, InterfaceError):
                return _database_unavailable(request)

        wrapper.csrf_exempt = True
        return wrapper

    return decorator


# --- sessions ------------------------------------------------------------------------------


@api_view("POST")
def session_start(request, user):
    data = _body(request)
    token = getattr(request, "api_token", None)
    session = services.session_start(
        user=user,
        client=data.get("client"),
        model=data.get("model"),
        brand=data.get("brand"),
        name=data.get("name") or "",
        system_prompt=data.get("system_prompt") or "",
        source="api" if token is not None else "web",
        api_token=token,
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
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


@async_api_view("POST")
async def session_chat(request, user, data, session_id):
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise BadInput(STREAM_NOT_BOOL)
    message = data.get("message")
    if stream:
        # Everything that can fail before streaming answers with its own status; under ASGI we
        # wait for the first event too, so a provider failing before any token is a real 502/504.
        session = await sync_to_async(selectors.session_get_for_user)(session_id=session_id, user=user)
        events = services.session_chat(session_id=session.pk, user=user, message=message)
        if not isinstance(request, ASGIRequest):
            return _stream_response(events)
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            return _stream_response(events)
        return _stream_response(events, first)
    done = None
    async for event in services.session_chat(session_id=session_id, user=user, message=message):
        if isinstance(event, Done):
            done = event
    return JsonResponse(await sync_to_async(selectors.chat_answer_as_dict)(done.message, done.session))


@async_api_view("POST")
async def session_switch(request, user, data, session_id):
    token = getattr(request, "api_token", None)
    client = data.get("client")
    if token is not None and token.client_id and client not in (None, "", token.client.slug):
        raise BadInput(services.TOKEN_CLIENT.format(slug=token.client.slug))
    stream = await services.asession_switch(
        session_id=session_id,
        user=user,
        client=data.get("client"),
        model=data.get("model"),
        reason=data.get("reason") or "",
    )
    return JsonResponse(await sync_to_async(selectors.stream_as_dict)(stream))


@async_api_view("POST")
async def session_end(request, user, data, session_id):
    summary = await services.asession_end(session_id=session_id, user=user)
    return JsonResponse(summary)


@api_view("GET")
def session_summary(request, user, session_id):
    session = selectors.session_get_for_user(session_id=session_id, user=user)
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


def _int_param(request, name: str, default: int) -> int:
    raw = request.GET.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise BadInput(BAD_PAGING.format(max=MAX_LIMIT)) from None


@api_view("GET")
def session_list(request, user):
    limit = _int_param(request, "limit", DEFAULT_LIMIT)
    offset = _int_param(request, "offset", 0)
    if not 1 <= limit <= MAX_LIMIT or offset < 0:
        raise BadInput(BAD_PAGING.format(max=MAX_LIMIT))
    client = request.GET.get("client", "").replace("\x00", "").strip() or None
    status = request.GET.get("status", "").replace("\x00", "").strip() or None
    sessions = selectors.session_list(
        user=user, client=client, status=status, start=_when(request, "from"), end=_when(request, "to", end=True)
    )
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


@api_view("GET", public=True)
def signing_key(request, user):
    return JsonResponse(public_key_info())


@api_view("GET", public=True)
def openapi(request, user):
    return HttpResponse(OPENAPI_FILE.read_bytes(), content_type="application/json")


def not_found(request, *args, **kwargs):
    return JsonResponse({"error": {"code": "not_found", "message": NO_SUCH_ENDPOINT}}, status=404)
