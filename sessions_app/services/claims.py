"""The turn claim: one answer streams per session at a time.

The claim is `ChatSession.turn_started_at`, taken with a conditional UPDATE (a row lock on
PostgreSQL); a second chat gets `SessionBusy` (409). A claim older than the provider timeouts
(`turn_stale_after()`) belongs to a crashed worker and is taken over.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Exists, F, OuterRef, Q
from django.utils import timezone

from config.dbthread import db_sync_to_async
from sessions_app.errors import (
    SESSION_BUSY,
    SESSION_ENDED,
    SESSION_LOCKED,
    SessionBusy,
    SessionEnded,
    SessionLocked,
)
from sessions_app.events import KnownSession
from sessions_app.models import (
    ChatSession,
    ContextStream,
    SessionStatus,
)
from sessions_app.selectors import session_get_for_user

TURN_GRACE_SECONDS = 30


def turn_stale_after() -> timedelta:
    """How old a turn claim must be before it is considered abandoned (a crashed worker)."""
    first = settings.PROVIDER_CONNECT_TIMEOUT + settings.PROVIDER_FIRST_TOKEN_TIMEOUT
    return timedelta(
        seconds=first * (settings.PROVIDER_MAX_RETRIES + 1) + settings.PROVIDER_IDLE_TIMEOUT + TURN_GRACE_SECONDS
    )


def _no_live_turn(now: datetime) -> Q:
    return Q(turn_started_at__isnull=True) | Q(turn_started_at__lt=now - turn_stale_after())


def turn_is_live(session: ChatSession, now: datetime | None = None) -> bool:
    now = now or timezone.now()
    return session.turn_started_at is not None and session.turn_started_at >= now - turn_stale_after()


def _check_writable(session: ChatSession) -> None:
    if session.status != SessionStatus.ACTIVE:
        raise SessionEnded(SESSION_ENDED)
    if session.is_locked:
        raise SessionLocked(SESSION_LOCKED)


def _claim_or_explain(session_id, now: datetime, *, busy_message: str = SESSION_BUSY, **updates) -> None:
    """Inside a transaction: lock the active session row unless an answer is streaming."""
    claimed = (
        ChatSession.objects.filter(pk=session_id, status=SessionStatus.ACTIVE)
        .filter(_no_live_turn(now))
        .update(**updates)
    )
    if claimed:
        return
    status = ChatSession.objects.filter(pk=session_id).values_list("status", flat=True).first()
    if status != SessionStatus.ACTIVE:
        raise SessionEnded(SESSION_ENDED)
    raise SessionBusy(busy_message)


def with_pending_stream(sessions):
    """Annotate `has_pending_stream`: a switch's context stream waits for this model's first call.

    A turn reads the stream only when there is one, which saves every other turn a query.
    """
    pending = ContextStream.objects.filter(
        session=OuterRef("pk"), settled_at__isnull=True, target_model=OuterRef("current_model")
    )
    return sessions.annotate(has_pending_stream=Exists(pending))


def _claim_fields(now: datetime) -> dict[str, Any]:
    """What claiming a session for one answer writes: the claim, the activity, the user message's count."""
    return {"turn_started_at": now, "last_activity_at": now, "total_messages": F("total_messages") + 1}


def _quick_claim(pk, user, now: datetime, **still) -> bool:
    """One UPDATE that claims the caller's active, uninvoiced session with no answer streaming.

    `still` adds conditions on what the caller read (see `_claim_known`).
    """
    # Owners (and staff) only: a consultant the session is shared with takes `_claim_turn`'s
    # general path, which goes through the full access rule.
    sessions = ChatSession.objects.owned_by(user).filter(
        _no_live_turn(now), pk=pk, status=SessionStatus.ACTIVE, invoice__isnull=True, **still
    )
    return bool(sessions.update(**_claim_fields(now)))


def _claim_turn(pk, user, now: datetime) -> None:
    """Inside a transaction: claim the session for one answer and count the user message.

    One UPDATE does it in the usual case; otherwise the session is read to say why not, or
    claimed after all when only a draft invoice kept the quick claim from matching.
    """
    if _quick_claim(pk, user, now):
        return
    session = session_get_for_user(session_id=pk, user=user)
    _check_writable(session)
    _claim_or_explain(session.pk, now, **_claim_fields(now))


def _claim_known(pk, user, now: datetime, known: KnownSession) -> bool:
    """Inside a transaction: the quick claim, only if `known` is still current.

    Every stored message counts in `total_messages` (invariant 1), and a switch moves the
    client or the model: a claim that matches the count, client and model read with `known`
    proves its rows are the session's messages now. False leaves the session untouched.
    """
    session = known.session
    if session.pk != pk or len(known.rows) != session.total_messages or not hasattr(session, "has_pending_stream"):
        return False
    current = {
        "total_messages": session.total_messages,
        "domain_id": session.domain_id,
        "current_model": session.current_model,
    }
    if not _quick_claim(pk, user, now, **current):
        return False
    session.turn_started_at = session.last_activity_at = now
    session.total_messages += 1
    return True


def _release_claim(session_id, claim: datetime) -> None:
    """Transaction 2 (only when a turn fails before streaming): give the session back."""
    ChatSession.objects.filter(pk=session_id, turn_started_at=claim).update(turn_started_at=None)


async def wait_for_turn(session_id, *, poll: float = 0.1, limit: float | None = None) -> None:
    """Wait (without blocking a thread) until no answer streams in the session."""
    deadline = time.monotonic() + (limit if limit is not None else turn_stale_after().total_seconds())
    while time.monotonic() < deadline:
        claim = await db_sync_to_async(
            lambda: ChatSession.objects.filter(pk=session_id).values_list("turn_started_at", flat=True).first()
        )()
        if claim is None or claim < timezone.now() - turn_stale_after():
            return
        await asyncio.sleep(poll)
