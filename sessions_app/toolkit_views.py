"""Search and stats over the caller's own sessions: `/api/ollama/search`, `/api/ollama/stats`, `/search/`."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from sessions_app import conversation
from sessions_app.auth import api_user
from sessions_app.errors import BadInput, SessionError


def _error(exc: SessionError) -> JsonResponse:
    return JsonResponse(exc.as_dict(), status=exc.status)


def _method_not_allowed() -> JsonResponse:
    response = JsonResponse({"error": {"code": "method_not_allowed", "message": "Use GET."}}, status=405)
    response["Allow"] = "GET"
    return response


@never_cache
def search_api(request):
    """GET ?q=TEXT[&limit=N][&client=SLUG]: ranked messages from the caller's sessions."""
    if request.method != "GET":
        return _method_not_allowed()
    try:
        user = api_user(request)
        query = request.GET.get("q", "")
        limit = request.GET.get("limit", conversation.SEARCH_DEFAULT_LIMIT)
        hits = conversation.messages_search(
            user=user, query=query, limit=limit, client=request.GET.get("client") or None
        )
    except SessionError as exc:
        return _error(exc)
    return JsonResponse({"query": query.strip(), "count": len(hits), "results": [hit.as_dict() for hit in hits]})


@never_cache
def stats_api(request):
    """GET [?client=SLUG]: sessions, messages, averages, oldest and most active session, per client."""
    if request.method != "GET":
        return _method_not_allowed()
    try:
        user = api_user(request)
        data = conversation.sessions_stats(user=user, client=request.GET.get("client") or None)
    except SessionError as exc:
        return _error(exc)
    return JsonResponse(data)


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
