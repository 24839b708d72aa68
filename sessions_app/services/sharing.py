"""Shared sessions: the owner invites consultants who may bill the session's client, and revokes.

An invited consultant sees the session wherever its owner does and chats in it; every message
records who typed it (`SessionMessage.author`). Nothing about billing changes: the session,
its client, its segments and its totals are the owner's, so time is counted once. Only the
owner (or staff) ends the session, switches its client, renames, hides or shares it. The
access rule itself is `ChatSession.objects.for_user` / `participating`, used by every front end.
"""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.utils import timezone

from billing.models import ClientDomain
from sessions_app.errors import NOT_OWNER, BadInput, NotFound, NotOwner, SessionEnded
from sessions_app.live import announce_revoked
from sessions_app.models import ChatSession, SessionInvitation, SessionStatus
from sessions_app.selectors import session_get_for_owner, session_get_for_user
from sessions_app.services.inputs import NOT_TEXT

INVITE_ENDED = "This session has ended; only a running session can be shared."


INVITE_SELF = "You started this session; invite someone else."


INVITE_UNKNOWN = "No active consultant named {name!r}."


INVITE_NOT_ALLOWED = "{name} may not bill {client}; only consultants who may bill the session's client can join it."


INVITE_NAME_REQUIRED = "Name the consultant to invite (their username)."


REVOKE_NONE = "{name} has no invitation to this session."


def _consultant(name):
    User = get_user_model()
    if isinstance(name, User):
        found = name if name.is_active else None
        label = name.get_username()
    else:
        if name is not None and not isinstance(name, str):
            raise BadInput(NOT_TEXT.format(field="user"))
        label = (name or "").strip()
        if not label:
            raise BadInput(INVITE_NAME_REQUIRED)
        found = User.objects.filter(**{User.USERNAME_FIELD: label[:150]}, is_active=True).first()
    if found is None:
        raise BadInput(INVITE_UNKNOWN.format(name=label[:150]))
    return found


def session_invite(*, session_id, user, invitee) -> tuple[SessionInvitation, bool]:
    """Invite `invitee` (a username or user) into a running session; (invitation, created).

    Inviting someone already invited returns their live invitation unchanged.
    """
    session = session_get_for_owner(session_id=session_id, user=user)
    if session.status != SessionStatus.ACTIVE:
        raise SessionEnded(INVITE_ENDED)
    guest = _consultant(invitee)
    if guest.pk == session.user_id:
        raise BadInput(INVITE_SELF)
    if not ClientDomain.objects.open_to(guest).filter(pk=session.domain_id).exists():
        raise BadInput(INVITE_NOT_ALLOWED.format(name=guest.get_username(), client=session.domain.name))
    existing = SessionInvitation.objects.live().filter(session=session, user=guest).first()
    if existing is not None:
        return existing, False
    try:
        with transaction.atomic():
            invitation = SessionInvitation.objects.create(session=session, user=guest, invited_by=user)
    except IntegrityError:  # invited by a concurrent request a moment ago
        return SessionInvitation.objects.live().get(session=session, user=guest), False
    return invitation, True


def session_revoke(*, session_id, user, invitee) -> SessionInvitation:
    """End `invitee`'s access: the owner (or staff) revokes anyone; an invited consultant may leave."""
    session = session_get_for_user(session_id=session_id, user=user)
    guest = _consultant(invitee)
    if guest.pk != user.pk and session.user_id != user.pk and not user.is_staff:
        raise NotOwner(NOT_OWNER)
    now = timezone.now()
    with transaction.atomic():
        invitation = SessionInvitation.objects.select_for_update().live().filter(session=session, user=guest).first()
        if invitation is None:
            raise NotFound(REVOKE_NONE.format(name=guest.get_username()))
        invitation.revoked_at = max(now, invitation.created_at)
        invitation.save(update_fields=["revoked_at"])
        # Their open chat pages close at once (their next frame would find it revoked anyway).
        transaction.on_commit(lambda: announce_revoked(session_id=session.pk, user_ids=[guest.pk]))
    return invitation


def session_check_client_switch(*, session: ChatSession, user) -> None:
    """Only the owner (or staff) moves a session to another client: the bill is theirs."""
    if session.user_id != user.pk and not user.is_staff:
        raise NotOwner(NOT_OWNER)


def invitations_revoke_unbillable(*, session: ChatSession, client: ClientDomain) -> int:
    """After a switch to `client`: revoke the invitations of consultants who may not bill it."""
    live = SessionInvitation.objects.live().filter(session=session).select_related("user")
    gone = [inv for inv in live if not ClientDomain.objects.open_to(inv.user).filter(pk=client.pk).exists()]
    if not gone:
        return 0
    users = [inv.user_id for inv in gone]
    transaction.on_commit(lambda: announce_revoked(session_id=session.pk, user_ids=users))
    return SessionInvitation.objects.filter(pk__in=[inv.pk for inv in gone]).update(revoked_at=timezone.now())
