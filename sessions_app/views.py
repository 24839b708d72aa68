"""Pages of the work session: the consultant's home page (their sessions)."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from sessions_app.models import ChatSession

HOME_PAGE_SIZE = 25


@require_GET
@login_required
def home(request: HttpRequest) -> HttpResponse:
    """The signed-in consultant's own sessions, newest first (staff review others in the admin)."""
    sessions = ChatSession.objects.filter(user=request.user).select_related("domain").order_by("-started_at")
    page = Paginator(sessions, HOME_PAGE_SIZE).get_page(request.GET.get("page"))
    rows = list(page.object_list)
    context = {"page": page, "sessions": rows, "active_count": sum(1 for s in rows if s.is_active)}
    return render(request, "sessions_app/home.html", context)
