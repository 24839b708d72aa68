"""REST endpoints of the conversation tools: branch, continue, rename/hide, edit, regenerate,
versions, transcript, and the invitations of a shared session. Thin views over the services.
"""

from __future__ import annotations

from django.core.handlers.asgi import ASGIRequest
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse

from config.dbthread import db_sync_to_async
from sessions_app import selectors, services, transcript
from sessions_app.api import STREAM_NOT_BOOL, _body, _event_line, _ndjson, api_view, async_api_view
from sessions_app.errors import BadInput, ProviderFailed, SessionError
from sessions_app.events import Done
from sessions_app.models import SessionInvitation
from sessions_app.services.details import UNSET

AT_NOT_A_NUMBER = "'at' must be a message number (a whole number), or left out for all messages."
SEQ_NOT_WHOLE = "'seq' must be a message number (a whole number), or left out for the latest."
NEW_VERSION_FAILED = "{detail} The new version is session {session_id}."


def _optional_int(data: dict, key: str, message: str):
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInput(message)
    return value


def _session(session) -> JsonResponse:
    return JsonResponse(selectors.session_as_dict(session))


@api_view("POST")
def session_branch(request, user, session_id):
    data = _body(request)
    branch = services.session_branch(
        session_id=session_id,
        user=user,
        at_seq=_optional_int(data, "at", AT_NOT_A_NUMBER),
        name=data.get("name") or "",
    )
    return JsonResponse(selectors.session_as_dict(branch), status=201)


@api_view("POST")
def session_continue(request, user, session_id):
    data = _body(request)
    token = getattr(request, "api_token", None)
    client = data.get("client")
    if token is not None and token.client_id:
        # A client-bound token carries its conversations on for its own client only.
        if client not in (None, "", token.client.slug):
            raise BadInput(services.TOKEN_CLIENT.format(slug=token.client.slug))
    session = services.session_continue(
        session_id=session_id, user=user, client=client, model=data.get("model"), name=data.get("name") or ""
    )
    return JsonResponse(selectors.session_as_dict(session), status=201)


@api_view("GET", "PATCH")
def session_detail(request, user, session_id):
    if request.method == "GET":
        return _session(selectors.session_get_for_user(session_id=session_id, user=user))
    data = _body(request)
    session = services.session_update(
        session_id=session_id, user=user, name=data.get("name", UNSET), hidden=data.get("hidden", UNSET)
    )
    return _session(session)


@api_view("GET")
def session_versions(request, user, session_id):
    session = selectors.session_get_for_user(session_id=session_id, user=user)
    return JsonResponse(selectors.session_versions(session=session, user=user))


@api_view("GET")
def session_transcript(request, user, session_id):
    """The transcript as a download: ?format=markdown, or JSON (the default)."""
    session = selectors.session_get_for_user(session_id=session_id, user=user)
    kind = request.GET.get("format", "json").strip().lower()
    if kind in ("md", "markdown"):
        response = HttpResponse(
            transcript.transcript_markdown(session=session), content_type="text/markdown; charset=utf-8"
        )
        name = transcript.transcript_filename(session, "md")
    elif kind == "json":
        response = JsonResponse(
            transcript.transcript_json(session=session), json_dumps_params={"indent": 2, "ensure_ascii": False}
        )
        name = transcript.transcript_filename(session, "json")
    else:
        raise BadInput(transcript.BAD_FORMAT)
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    response["Cache-Control"] = "private, no-store"
    return response


# --- edit and regenerate: a new version, then its turn --------------------------------------


async def _run_version(request, user, data: dict, make) -> HttpResponse:
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise BadInput(STREAM_NOT_BOOL)
    version = await db_sync_to_async(make)()
    branch = version.session
    location = f"/api/ollama/session/{branch.session_id}"
    events = services.session_chat(session_id=branch.pk, user=user, message=version.message)
    if stream:
        head = _ndjson(
            {"type": "session", "replaces_seq": version.replaces_seq, "session": selectors.session_as_dict(branch)}
        )
        first = None
        if isinstance(request, ASGIRequest):
            # Failures before the first token answer with their own status, as a chat does.
            try:
                first = await anext(events, None)
            except ProviderFailed as exc:
                return _failed(exc, branch, location)

        async def body():
            yield head
            try:
                if first is not None:
                    yield _event_line(first)
                    if isinstance(first, Done):
                        return
                async for event in events:
                    yield _event_line(event)
            except SessionError as exc:
                yield _ndjson({"type": "error", **exc.as_dict()})
            finally:
                await events.aclose()

        response = StreamingHttpResponse(body(), content_type="application/x-ndjson", status=201)
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
        response["Location"] = location
        return response
    done = None
    try:
        async for event in events:
            if isinstance(event, Done):
                done = event
    except ProviderFailed as exc:
        return _failed(exc, branch, location)
    answer = await db_sync_to_async(selectors.chat_answer_as_dict)(done.message, done.session)
    response = JsonResponse({**answer, "replaces_seq": version.replaces_seq}, status=201)
    response["Location"] = location
    return response


def _failed(exc: ProviderFailed, branch, location: str) -> JsonResponse:
    """The provider failed: the new version keeps the question and what arrived; say where it is."""
    message = NEW_VERSION_FAILED.format(detail=exc.message, session_id=branch.session_id)
    response = JsonResponse({"error": {"code": exc.code, "message": message}}, status=exc.status)
    response["Location"] = location
    return response


@async_api_view("POST")
async def session_edit(request, user, data, session_id):
    seq = _optional_int(data, "seq", SEQ_NOT_WHOLE)
    message = data.get("message")
    return await _run_version(
        request,
        user,
        data,
        lambda: services.session_edit(session_id=session_id, user=user, seq=seq, message=message),
    )


@async_api_view("POST")
async def session_regenerate(request, user, data, session_id):
    seq = _optional_int(data, "seq", SEQ_NOT_WHOLE)
    return await _run_version(
        request, user, data, lambda: services.session_regenerate(session_id=session_id, user=user, seq=seq)
    )


# --- invitations ----------------------------------------------------------------------------


@api_view("GET", "POST")
def session_invitations(request, user, session_id):
    if request.method == "GET":
        session = selectors.session_get_for_user(session_id=session_id, user=user)
        invitations = SessionInvitation.objects.filter(session=session).select_related("user", "invited_by")
        return JsonResponse({"results": [selectors.invitation_as_dict(i) for i in invitations.order_by("created_at")]})
    data = _body(request)
    invitation, created = services.session_invite(session_id=session_id, user=user, invitee=data.get("user"))
    return JsonResponse(selectors.invitation_as_dict(invitation), status=201 if created else 200)


@api_view("DELETE")
def session_invitation_revoke(request, user, session_id, username):
    invitation = services.session_revoke(session_id=session_id, user=user, invitee=username)
    return JsonResponse(selectors.invitation_as_dict(invitation))
