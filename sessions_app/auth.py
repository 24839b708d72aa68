"""Who is calling the REST API: a signed-in browser (session cookie + CSRF) or a Bearer token."""

from __future__ import annotations

from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest
from django.middleware.csrf import CsrfViewMiddleware

from sessions_app import throttle
from sessions_app.errors import SESSION_NOT_FOUND, NotFound, SessionError
from sessions_app.models import ApiToken, ChatSession
from sessions_app.refs import Person
from sessions_app.selectors import session_get_for_user

NO_CREDENTIALS = "Sign in, or send 'Authorization: Bearer <token>' (create one with manage.py create_api_token)."
BAD_TOKEN = "The API token is unknown, revoked or malformed."
BAD_SCHEME = "Use 'Authorization: Bearer <token>'."
CSRF_FAILED = "CSRF check failed: send the csrftoken cookie's value in the X-CSRFToken header."
SAFE_METHODS = ("GET", "HEAD", "OPTIONS", "TRACE")


class Unauthorized(SessionError):
    code, status = "unauthorized", 401


class CsrfFailed(SessionError):
    code, status = "csrf_failed", 403


class Throttled(SessionError):
    """Too many unknown tokens from the caller's address (429, with Retry-After)."""

    code, status = "throttled", 429

    def __init__(self, wait: int) -> None:
        super().__init__(throttle.token_message(wait))
        self.retry_after = wait


def signed_in(request: HttpRequest) -> Person:
    """The user of a view that only signed-in users reach (`login_required`)."""
    user = request.user
    if not isinstance(user, User) or not user.is_authenticated:
        raise PermissionDenied("Sign in first.")
    return user


def _csrf_ok(request) -> bool:
    check = CsrfViewMiddleware(lambda req: None)
    check.process_request(request)
    # No view callback: the check runs even though our API views are csrf_exempt (for Bearer).
    return check.process_view(request, None, (), {}) is None


def api_user(request):
    """The user behind the request; sets `request.api_token` (None for cookie sign-ins).

    A Bearer header wins over a cookie and must be valid. Cookie sign-ins must pass CSRF on
    unsafe methods; Bearer calls need no CSRF token (a browser never adds the header itself).
    Raises `Unauthorized` (401), `CsrfFailed` (403), or `Throttled` (429) once an address has
    sent too many unknown tokens.
    """
    header = request.META.get("HTTP_AUTHORIZATION", "").strip()
    if header:
        scheme, _, raw = header.partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthorized(BAD_SCHEME)
        if wait := throttle.token_wait(request):
            raise Throttled(wait)
        token = ApiToken.authenticate(raw.strip())
        if token is None:
            if wait := throttle.token_failed(request):
                raise Throttled(wait)
            raise Unauthorized(BAD_TOKEN)
        token.touch()
        request.api_token = token
        return token.user
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated or not user.is_active:
        raise Unauthorized(NO_CREDENTIALS)
    if request.method not in SAFE_METHODS and not _csrf_ok(request):
        raise CsrfFailed(CSRF_FAILED)
    request.api_token = None
    return user


def token_client_id(request):
    """The client a Bearer token is bound to (None: a cookie sign-in or an unbound token)."""
    token = getattr(request, "api_token", None)
    return token.client_id if token is not None else None


def session_for_caller(request, user, session_id) -> ChatSession:
    """The session if the caller may act on it: the user's own (staff: any) and, for a token
    bound to a client, only a session billed to that client now.

    Anything else is `NotFound` (404), exactly as another consultant's session, so a token
    cannot probe which ids exist for other clients.
    """
    session = session_get_for_user(session_id=session_id, user=user)
    bound = token_client_id(request)
    if bound is not None and session.domain_id != bound:
        raise NotFound(SESSION_NOT_FOUND)
    return session
