"""What a session is called and whether it shows in lists: never billed, so never sealed.

Hiding keeps everything (messages, time, cost, reports, invoices); it only leaves the session
out of the consultant's lists until it is shown again.
"""

from __future__ import annotations

from django.utils import timezone

from sessions_app.errors import SESSION_LOCKED, BadInput, SessionLocked
from sessions_app.models import ChatSession
from sessions_app.refs import Person, SessionRef
from sessions_app.selectors import session_get_for_owner
from sessions_app.services.inputs import NAME_LIMIT, NAME_TOO_LONG, _require_text
from sessions_app.services.store import _load

UPDATE_NOTHING = "Send 'name' and/or 'hidden' to change."


HIDDEN_NOT_BOOL = "'hidden' must be true or false."


UNSET = object()


def session_update(
    *, session_id: SessionRef, user: Person, name: object = UNSET, hidden: object = UNSET
) -> ChatSession:
    """Rename and/or hide (or show again) a session; only its owner (or staff) may."""
    if name is UNSET and hidden is UNSET:
        raise BadInput(UPDATE_NOTHING)
    session = session_get_for_owner(session_id=session_id, user=user)
    changes: dict = {}
    if name is not UNSET:
        name = _require_text(name, "name").strip()
        if len(name) > NAME_LIMIT:
            raise BadInput(NAME_TOO_LONG.format(size=len(name), limit=NAME_LIMIT))
        if name != session.name:
            # An issued invoice printed the session under its name; the admin keeps it too.
            if session.is_locked:
                raise SessionLocked(SESSION_LOCKED)
            changes["name"] = name
    if hidden is not UNSET:
        if not isinstance(hidden, bool):
            raise BadInput(HIDDEN_NOT_BOOL)
        if hidden != (session.hidden_at is not None):
            changes["hidden_at"] = timezone.now() if hidden else None
    if changes:
        ChatSession.objects.filter(pk=session.pk).update(**changes)
    return _load(session.pk)
