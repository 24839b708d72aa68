"""Pages of the conversation tools: continue an ended session, rename, hide, share.

Each loads the session through the one access helper (404 for anyone it is not shared with),
calls one service, and redirects with a message; a refused input re-renders with its reason.
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_http_methods, require_POST

from sessions_app import selectors, services
from sessions_app.auth import signed_in
from sessions_app.errors import NOT_OWNER, SESSION_NOT_FOUND, NotFound, SessionError
from sessions_app.forms import ContinueForm, InviteForm, RenameForm, load_models
from sessions_app.live import session_brand_style
from sessions_app.models import SessionInvitation

RENAMED = "Renamed to “{name}”."
BRANCHED = "A branch with messages 1 to {at}; they are not billed again. What you say here is."
HIDDEN = "“{name}” is hidden from your lists. Its time and cost are still billed; find it under Hidden."
SHOWN = "“{name}” is back in your lists."
INVITED = "{user} can now open this session and chat in it."
REVOKED = "{user} no longer has access to this session."
LEFT = "You left “{name}”."


def _session(request: HttpRequest, session_id):
    """The session if this user may see it (owner, invited, staff); 404 otherwise."""
    try:
        return selectors.session_get_for_user(session_id=session_id, user=request.user)
    except NotFound:
        raise Http404(SESSION_NOT_FOUND) from None


def _back(request: HttpRequest, default: str) -> str:
    target = request.POST.get("next", "")
    if target and url_has_allowed_host_and_scheme(target, {request.get_host()}, request.is_secure()):
        return target
    return default


@login_required
@require_http_methods(["GET", "POST"])
def session_continue_page(request: HttpRequest, session_id) -> HttpResponse:
    """Pick the client (the old one first) and model, and carry the ended session on."""
    session = _session(request, session_id)
    request.brand_style = session_brand_style(session)
    models, models_error = load_models()
    form = ContinueForm(
        request.POST or None, user=request.user, session=session, models=models, models_error=models_error
    )
    if request.method == "POST" and form.is_valid():
        try:
            new = services.session_continue(
                session_id=session.pk,
                user=request.user,
                client=form.cleaned_data["client"],
                model=form.cleaned_data["model"] or None,
                name=form.cleaned_data["name"],
            )
        except SessionError as exc:
            form.add_error(None, exc.message)
        else:
            return redirect("session-chat", session_id=new.session_id)
    status = 400 if form.is_bound and form.errors else 200
    return render(request, "sessions_app/session_continue.html", {"session": session, "form": form}, status=status)


@login_required
@require_POST
def session_branch_page(request: HttpRequest, session_id) -> HttpResponse:
    """A new session with the messages up to the one picked; go on from there."""
    session = _session(request, session_id)
    at = request.POST.get("at", "").strip()
    try:
        branch = services.session_branch(
            session_id=session.pk,
            user=signed_in(request),
            at_seq=int(at) if at.isdigit() else None,
            name=request.POST.get("name", ""),
        )
    except SessionError as exc:
        messages.error(request, exc.message)
        return redirect("session-summary", session_id=session.session_id)
    messages.success(request, BRANCHED.format(at=branch.branched_at_seq))
    return redirect("session-chat", session_id=branch.session_id)


@login_required
@require_POST
def session_rename(request: HttpRequest, session_id) -> HttpResponse:
    session = _session(request, session_id)
    back = _back(request, f"/sessions/{session.session_id}/summary/")
    form = RenameForm(request.POST)
    if not form.is_valid():
        messages.error(request, " ".join(e for errors in form.errors.values() for e in errors))
        return redirect(back)
    try:
        renamed = services.session_update(
            session_id=session.pk, user=signed_in(request), name=form.cleaned_data["name"]
        )
    except SessionError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, RENAMED.format(name=renamed))
    return redirect(back)


@login_required
@require_POST
def session_hide(request: HttpRequest, session_id) -> HttpResponse:
    session = _session(request, session_id)
    hide = request.POST.get("hidden", "1") != "0"
    try:
        updated = services.session_update(session_id=session.pk, user=signed_in(request), hidden=hide)
    except SessionError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, (HIDDEN if hide else SHOWN).format(name=updated))
    return redirect(_back(request, "/sessions/"))


@login_required
@require_http_methods(["GET", "POST"])
def session_share_page(request: HttpRequest, session_id) -> HttpResponse:
    """Who is in the session; the owner invites consultants who may bill its client."""
    session = _session(request, session_id)
    request.brand_style = session_brand_style(session)
    can_manage = session.user_id == request.user.pk or request.user.is_staff
    form = InviteForm(request.POST or None, session=session) if can_manage and session.is_active else None
    if request.method == "POST":
        if not can_manage:
            raise PermissionDenied(NOT_OWNER)
        if form is None:
            messages.error(request, services.INVITE_ENDED)
            return redirect("session-share", session_id=session.session_id)
        if form.is_valid():
            try:
                services.session_invite(session_id=session.pk, user=request.user, invitee=form.cleaned_data["user"])
            except SessionError as exc:
                form.add_error(None, exc.message)
            else:
                messages.success(request, INVITED.format(user=form.cleaned_data["user"]))
                return redirect("session-share", session_id=session.session_id)
    invitations = list(
        SessionInvitation.objects.filter(session=session).select_related("user", "invited_by").order_by("-created_at")
    )
    context = {
        "session": session,
        "form": form,
        "can_manage": can_manage,
        "live": [i for i in invitations if i.revoked_at is None],
        "past": [i for i in invitations if i.revoked_at is not None],
        "participants": selectors.session_participants(session=session),
    }
    status = 400 if form is not None and form.is_bound and form.errors else 200
    return render(request, "sessions_app/session_share.html", context, status=status)


@login_required
@require_POST
def session_revoke_page(request: HttpRequest, session_id, username: str) -> HttpResponse:
    session = _session(request, session_id)
    leaving = username == request.user.get_username()
    try:
        services.session_revoke(session_id=session.pk, user=request.user, invitee=username)
    except SessionError as exc:
        messages.error(request, exc.message)
        return redirect("session-share", session_id=session.session_id)
    if leaving and session.user_id != request.user.pk:
        messages.success(request, LEFT.format(name=session))
        return redirect("session-list")
    messages.success(request, REVOKED.format(user=username))
    return redirect("session-share", session_id=session.session_id)
