"""Pages of the work session: the consultant's home page (their sessions)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.contrib.auth.decorators import login_required
from django.contrib.auth.views import LoginView
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from billing import panel
from billing import selectors as billing_selectors
from billing.models import ClientDomain
from sessions_app import selectors, services
from sessions_app.errors import SESSION_NOT_FOUND, NotFound, SessionError
from sessions_app.forms import NewSessionForm, SessionFilterForm, SignInForm, client_for_host, load_models
from sessions_app.live import chat_page_config, display_name, session_brand_style
from sessions_app.models import ChatSession, StreamReason

HOME_PAGE_SIZE = 25


@require_GET
@login_required
def home(request: HttpRequest) -> HttpResponse:
    """The signed-in consultant's own sessions, newest first (staff review others in the admin)."""
    sessions = (
        ChatSession.objects.participating(request.user)
        .listed()
        .select_related("domain", "user")
        .order_by("-started_at")
    )
    sessions = billing_selectors.with_unpriced_flag(sessions)  # a total missing unknown prices says so
    page = Paginator(sessions, HOME_PAGE_SIZE).get_page(request.GET.get("page"))
    rows = list(page.object_list)
    context = {
        "page": page,
        "sessions": rows,
        "active_count": sum(1 for s in rows if s.is_active),
        "server_now": timezone.now(),  # the live timers' clock
    }
    return render(request, "sessions_app/home.html", context)


# --- Live chat pages: list, new session, chat, summary, and the chat page's JSON ------------

SESSION_PAGE_SIZE = 25
UNAUTHENTICATED = {"error": {"code": "unauthenticated", "message": "Sign in first."}}


def _get_session_for_user(request: HttpRequest, session_id) -> ChatSession:
    """The session if this user may see it; 404 otherwise (never 403: ids cannot be probed)."""
    try:
        return selectors.session_get_for_user(session_id=session_id, user=request.user)
    except NotFound:
        raise Http404(SESSION_NOT_FOUND) from None


@require_GET
@login_required
def session_list_page(request: HttpRequest) -> HttpResponse:
    """Sessions filtered by client, status and dates; active ones show a live timer."""
    hidden = "only" if request.GET.get("hidden") == "only" else "exclude"
    form = SessionFilterForm(request.GET or None, user=request.user)
    sessions = ChatSession.objects.none()
    if not form.is_bound:
        sessions = selectors.session_list(user=request.user)
    elif form.is_valid():
        start, end = form.period()
        data = form.cleaned_data
        sessions = selectors.session_list(
            user=request.user,
            client=data["client"] or None,
            status=data["status"] or None,
            start=start,
            end=end,
            hidden=hidden,
        )
    sessions = billing_selectors.with_unpriced_flag(sessions.select_related("user"))
    page = Paginator(sessions, SESSION_PAGE_SIZE).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    context = {
        "form": form,
        "page": page,
        "sessions": list(page.object_list),
        "query": query.urlencode(),
        "filtered": any(request.GET.get(k) for k in ("client", "status", "start", "end")),
        "server_now": timezone.now(),
        "showing_hidden": hidden == "only",
        "hidden_count": selectors.session_list(user=request.user, hidden="only").count(),
    }
    return render(request, "sessions_app/session_list.html", context, status=200 if not form.errors else 400)


@login_required
def session_new_page(request: HttpRequest) -> HttpResponse:
    """Pick a client, a model from the router's live list, a brand; start; go to the chat."""
    models, models_error = load_models()
    initial = {"client": request.GET.get("client", "")}
    form = NewSessionForm(
        request.POST or None,
        user=request.user,
        models=models,
        models_error=models_error,
        initial=initial,
        host_client=client_for_host(request.get_host()),
    )
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        start, extra = services.session_start, {}
        if data["template_obj"] is not None:
            start, extra = services.session_start_from_template, {"template": data["template_obj"]}
        try:
            session = start(
                user=request.user,
                client=data["client"],
                model=data["model"],
                brand=data["brand"] or None,
                name=data["name"],
                system_prompt=data["system_prompt"],
                source="web",
                **extra,
            )
        except SessionError as exc:
            form.add_error(None, exc.message)
        else:
            return redirect("session-chat", session_id=session.session_id)
    status = 400 if form.is_bound and form.errors else 200
    context = {"form": form, "templates": form.template_data()}
    return render(request, "sessions_app/session_new.html", context, status=status)


@require_GET
@login_required
def session_chat_page(request: HttpRequest, session_id) -> HttpResponse:
    """The chat page: history, live answers over the WebSocket, timer, cost, switch, stop, end."""
    session = _get_session_for_user(request, session_id)
    request.brand_style = session_brand_style(session)
    is_owner = session.user_id == request.user.pk
    # A consultant the session is shared with chats in it live too (not staff who only review it).
    invited = (
        not is_owner and session.is_active and selectors.session_is_shared_with(session=session, user=request.user)
    )
    can_chat = session.is_active and (is_owner or invited)
    owner: Any = request.user if is_owner else session.user
    messages = list(selectors.session_messages(session=session))
    # A template's first message waits in the composer of a session that has none yet.
    first_message = session.template.first_message if can_chat and session.template_id and not messages else ""
    streams = list(session.context_streams.select_related("source_domain", "target_domain").order_by("streamed_at"))
    history = sorted(
        [("message", m.timestamp, m) for m in messages] + [("switch", s.streamed_at, s) for s in streams],
        key=lambda item: item[1],
    )
    # Only the owner moves the session to another client or model: the bill is theirs.
    clients = (
        list(ClientDomain.objects.open_to(request.user).active().order_by("name")) if can_chat and is_owner else []
    )
    config = chat_page_config(session, can_chat=can_chat)
    people = {owner.get_username(): display_name(owner)}
    people.update({author.get_username(): display_name(author) for m in messages if (author := m.author) is not None})
    config.update(
        {"owner": is_owner, "owner_username": owner.get_username(), "me": request.user.get_username(), "people": people}
    )
    config["client_names"] = {
        c.slug: c.name
        for c in [*clients, session.domain, *(m.domain for m in messages), *(s.target_domain for s in streams)]
    }
    context = {
        "session": session,
        "history": history,
        "clients": clients,
        "can_chat": can_chat,
        "is_owner": is_owner,
        "owner_name": display_name(owner),
        "owner_username": owner.get_username(),
        "config": config,
        "first_message": first_message,
        "shared": not is_owner and not request.user.is_staff,
    }
    context["billing"] = panel.chat_billing(session=session, clients=clients)  # budget, increments
    return render(request, "sessions_app/session_chat.html", context)


@require_GET
@login_required
def session_summary_page(request: HttpRequest, session_id) -> HttpResponse:
    """Duration, time and cost per client and per model, context streams, the integrity badge."""
    session = _get_session_for_user(request, session_id)
    request.brand_style = session_brand_style(session)
    summary = selectors.session_summary(session=session)
    slugs = {row["client"] for row in summary["by_client"]}
    for stream in summary["context_streams"]:
        slugs.update((stream["source_client"], stream["target_client"]))
    names = dict(ClientDomain.objects.filter(slug__in=slugs).values_list("slug", "name"))
    streams = [
        {
            **stream,
            "when": datetime.fromisoformat(stream["streamed_at"]),
            "source_name": names.get(stream["source_client"], stream["source_client"]),
            "target_name": names.get(stream["target_client"], stream["target_client"]),
            "reason_label": StreamReason(stream["reason"]).label if stream["reason"] in StreamReason.values else "",
        }
        for stream in summary["context_streams"]
    ]
    duration = summary["duration_seconds"] or sum(row["seconds"] for row in summary["by_client"])
    by_client = [
        {
            **row,
            "name": names.get(row["client"], row["client"]),
            "share": (row["seconds"] * 100 / duration) if duration else 0,
        }
        for row in summary["by_client"]
    ]
    context = {
        "session": session,
        "summary": summary,
        "by_client": by_client,
        "streams": streams,
        "duration": duration,
        "transcript_url": f"/api/ollama/session/{session.session_id}/transcript",
        "can_manage": session.user_id == request.user.pk or request.user.is_staff,
        "lineage": selectors.session_versions(session=session, user=request.user),
        "branch_points": range(1, (session.messages.order_by("-seq").values_list("seq", flat=True).first() or 0) + 1)
        if session.archived_at is None
        else [],
        "continue_clients": []
        if session.is_active
        else list(ClientDomain.objects.open_to(request.user).active().order_by("name")),
    }
    return render(request, "sessions_app/session_summary.html", context)


@never_cache  # a consultant's own conversation: no cache may keep it
@require_GET
def session_messages_json(request: HttpRequest, session_id) -> JsonResponse:
    """The stored history as JSON: the chat page refetches it after a dropped connection."""
    if not request.user.is_authenticated:
        return JsonResponse(UNAUTHENTICATED, status=401)
    try:
        session = selectors.session_get_for_user(session_id=session_id, user=request.user)
    except NotFound as exc:
        return JsonResponse(exc.as_dict(), status=404)
    return JsonResponse(
        {
            "session": selectors.session_as_dict(session),
            "streaming": session.turn_started_at is not None,
            "messages": [selectors.message_as_dict(m) for m in selectors.session_messages(session=session)],
            "context_streams": [
                selectors.stream_as_dict(s)
                for s in session.context_streams.select_related("source_domain", "target_domain").order_by(
                    "streamed_at"
                )
            ],
        }
    )


@never_cache
@require_GET
def session_models_json(request: HttpRequest) -> JsonResponse:
    """The router's live model list, for the chat page's switch control."""
    if not request.user.is_authenticated:
        return JsonResponse(UNAUTHENTICATED, status=401)
    models, error = load_models()
    return JsonResponse(
        {"models": [{"name": m.name, "provider": m.provider, "paid": m.paid} for m in models], "error": error}
    )


# --- Sign-in, throttled (sessions_app/throttle.py) ------------------------------------------


def _throttled_status(response: HttpResponse) -> HttpResponse:
    """A refused sign-in answers 429 with Retry-After, not 200: clients and scripts can tell."""
    form = (getattr(response, "context_data", None) or {}).get("form")
    if getattr(form, "throttled_for", 0):
        response.status_code = 429
        response["Retry-After"] = str(form.throttled_for)
    return response


_sign_in = LoginView.as_view(authentication_form=SignInForm)


def sign_in(request: HttpRequest) -> HttpResponse:
    """`/accounts/login/`: Django's login view with the throttled form."""
    return _throttled_status(_sign_in(request))


def admin_sign_in(request: HttpRequest) -> HttpResponse:
    """`/admin/login/`: the admin's own login view (its form is `AdminSignInForm`), 429 when refused."""
    from django.contrib import admin

    return _throttled_status(admin.site.login(request))


@require_GET
@login_required
def session_billing_json(request, session_id):
    """The chat page's billing panel, refreshed after each answer: the session's owner (or staff) only."""

    try:
        session = selectors.session_get_for_user(session_id=session_id, user=request.user)
    except NotFound as exc:
        return JsonResponse(exc.as_dict(), status=404)
    clients = ClientDomain.objects.open_to(request.user).active()
    response = JsonResponse(panel.chat_billing(session=session, clients=clients))
    response["Cache-Control"] = "no-store"
    return response
