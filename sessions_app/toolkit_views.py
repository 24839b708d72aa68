"""Search, stats, export and import for the caller's own sessions.

`/api/ollama/search`, `/api/ollama/stats`, `/api/ollama/session/<id>/export`,
`/api/ollama/session/import`, and the `/search/` page.
"""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.core.exceptions import RequestDataTooBig
from django.http import JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from sessions_app import conversation, selectors, transfer
from sessions_app.api import api_view
from sessions_app.auth import session_for_caller
from sessions_app.errors import BadInput, MessageTooLarge
from sessions_app.services import TOKEN_CLIENT as TOKEN_BILLS_ONLY

TOKEN_CLIENT = "This token is bound to client {slug!r}; it imports into that client only."
IMPORT_TOO_LARGE = "The file is larger than this server accepts in one request; use manage.py chat --import."


def _bound_client(request, client: str | None) -> str | None:
    """The `client` filter, held to a client-bound token's client."""
    token = getattr(request, "api_token", None)
    if token is None or not token.client_id:
        return client
    if client not in (None, token.client.slug):
        raise BadInput(TOKEN_BILLS_ONLY.format(slug=token.client.slug))
    return token.client.slug


@never_cache
@api_view("GET")
def search_api(request, user):
    """GET ?q=TEXT[&limit=N][&client=SLUG]: ranked messages from the caller's sessions."""
    query = request.GET.get("q", "")
    limit = request.GET.get("limit", conversation.SEARCH_DEFAULT_LIMIT)
    client = _bound_client(request, request.GET.get("client") or None)
    hits = conversation.messages_search(user=user, query=query, limit=limit, client=client)
    return JsonResponse({"query": query.strip(), "count": len(hits), "results": [hit.as_dict() for hit in hits]})


@never_cache
@api_view("GET")
def stats_api(request, user):
    """GET [?client=SLUG]: sessions, messages, averages, oldest and most active session, per client."""
    client = _bound_client(request, request.GET.get("client") or None)
    return JsonResponse(conversation.sessions_stats(user=user, client=client))


@never_cache
@api_view("GET")
def session_export_api(request, user, session_id):
    """The session as the versioned export document, as a download."""
    session = session_for_caller(request, user, session_id)
    response = JsonResponse(transfer.session_export(session=session), json_dumps_params={"indent": 2})
    response["Content-Disposition"] = f'attachment; filename="session-{session.session_id}.json"'
    return response


@api_view("POST")
def session_import_api(request, user):
    """Body: an export document. 201 with the new session and the integrity report."""
    try:
        raw = request.body
    except RequestDataTooBig:
        raise MessageTooLarge(IMPORT_TOO_LARGE) from None
    client = request.GET.get("client") or None
    token = getattr(request, "api_token", None)
    if token is not None and token.client_id:
        # A client-bound token works for its client only (as a switch does).
        if client not in (None, token.client.slug):
            raise BadInput(TOKEN_CLIENT.format(slug=token.client.slug))
        client = token.client.slug
    result = transfer.session_import(user=user, data=raw, client=client)
    return JsonResponse(
        {
            "session": selectors.session_as_dict(result.session),
            "integrity": {"valid": result.valid, "trusted": result.trusted, "detail": result.detail},
        },
        status=201,
    )


@login_required
@require_GET
def search_page(request):
    """The search box: results ranked, snippets escaped with matches in <mark>."""
    query = request.GET.get("q", "").strip()
    hits: list[conversation.SearchHit] = []
    error = ""
    if query:
        try:
            hits = conversation.messages_search(user=request.user, query=query, limit=50)
        except BadInput as exc:
            error = exc.message
    return render(
        request,
        "sessions_app/search.html",
        {"query": query, "hits": hits, "error": error, "max_chars": conversation.SEARCH_MAX_CHARS},
    )
