"""The turn claim: one answer streams per session at a time.

The claim is `ChatSession.turn_started_at`, taken with a conditional UPDATE (a row lock on
PostgreSQL) that also names the claiming process (`turn_owner`); a second chat gets
`SessionBusy` (409). A claim is live while its process runs and something has been heard of
it (its claim or its last checkpoint) within `TURN_STALE_SECONDS` (`models.turn_stale_after`,
the one definition of a stale turn). A claim that is not live is taken over by settling it
first (`recovery.turn_settle`: its checkpointed text becomes the answer), never by silently
overwriting it.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

from django.db.models import Exists, F, OuterRef, Q
from django.utils import timezone

from config import statements
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
    stale_turn_q,
    turn_stale_after,
)
from sessions_app.selectors import session_get_for_user
from sessions_app.services.recovery import CLAIM_CLEARED, owner_is_gone, process_owner, turn_settle

__all__ = ["turn_stale_after"]

# The claim's fields, read to tell a live claim from an abandoned one.
CLAIM_FIELDS = ("turn_started_at", "turn_owner", "turn_checkpoint_at")


def _no_live_turn(now: datetime) -> Q:
    """No claim, or a stale one (in SQL: a dead process on this host is found by `turn_is_live`)."""
    return Q(turn_started_at__isnull=True) | stale_turn_q(now)


def _claim_is_live(claim: datetime | None, owner: str, checkpoint: datetime | None, now: datetime) -> bool:
    if claim is None or owner_is_gone(owner):
        return False
    heard = max(claim, checkpoint) if checkpoint is not None else claim
    return heard >= now - turn_stale_after()


def turn_is_live(session: ChatSession, now: datetime | None = None) -> bool:
    """An answer is streaming in the session and its process is, as far as can be told, alive."""
    return _claim_is_live(
        session.turn_started_at, session.turn_owner, session.turn_checkpoint_at, now or timezone.now()
    )


def settle_abandoned_claim(session_id, now: datetime) -> bool:
    """Inside a transaction: settle the session's claim if it is not live; True if one was settled."""
    row = ChatSession.objects.filter(pk=session_id).values_list(*CLAIM_FIELDS).first()
    if row is None or row[0] is None or _claim_is_live(*row, now):
        return False
    return turn_settle(session_id=session_id, claim=row[0], now=now) is not None


def _check_writable(session: ChatSession) -> None:
    if session.status != SessionStatus.ACTIVE:
        raise SessionEnded(SESSION_ENDED)
    if session.is_locked:
        raise SessionLocked(SESSION_LOCKED)


def _claim_or_explain(session_id, now: datetime, *, busy_message: str = SESSION_BUSY, **updates) -> None:
    """Inside a transaction: lock the active session row unless an answer is streaming.

    An abandoned claim is settled first, so its question keeps an answer.
    """
    settle_abandoned_claim(session_id, now)
    claimed = ChatSession.objects.filter(
        pk=session_id, status=SessionStatus.ACTIVE, turn_started_at__isnull=True
    ).update(**updates)
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


# `with_pending_stream`'s condition as a column of a prepared statement (`config.statements`).
PENDING_STREAM = statements.Exists(
    ContextStream,
    {"session": statements.Outer("session_id"), "settled_at": None, "target_model": statements.Outer("current_model")},
)


def _claim_fields(now: datetime) -> dict[str, Any]:
    """What claiming a session for one answer writes: the claim, the activity, the user message's count."""
    return {
        "turn_started_at": now,
        "turn_owner": process_owner(),
        "last_activity_at": now,
        "total_messages": F("total_messages") + 1,
    }


def _quick_claim(pk, user, now: datetime, **still) -> bool:
    """One UPDATE that claims the caller's active, uninvoiced session with no answer streaming.

    `still` adds conditions on what the caller read (see `_claim_known`). A session holding a
    claim, even an abandoned one, takes the slow path (`_claim_turn`), which settles it.
    """
    # Owners (and staff) only: a consultant the session is shared with takes `_claim_turn`'s
    # general path, which goes through the full access rule. (`ChatSession.objects.owned_by`,
    # as one prepared statement: it runs on every turn.)
    where = {"session_id": pk, "status": SessionStatus.ACTIVE, "invoice": None, "turn_started_at": None, **still}
    if not user.is_staff:
        where["user"] = user.pk
    claim = {"turn_started_at": now, "turn_owner": process_owner(), "last_activity_at": now}
    return bool(statements.update(ChatSession, where, claim, add={"total_messages": 1}))


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
        "domain": session.domain_id,
        "current_model": session.current_model,
    }
    if not _quick_claim(pk, user, now, **current):
        return False
    session.turn_started_at = session.last_activity_at = now
    session.turn_owner = process_owner()
    session.total_messages += 1
    return True


def _release_claim(session_id, claim: datetime) -> None:
    """Transaction 2 (only when a turn fails before streaming): give the session back."""
    ChatSession.objects.filter(pk=session_id, turn_started_at=claim).update(**CLAIM_CLEARED)


async def wait_for_turn(session_id, *, poll: float = 0.1, limit: float | None = None) -> None:
    """Wait (without blocking a thread) until no live answer streams in the session."""
    deadline = time.monotonic() + (limit if limit is not None else turn_stale_after().total_seconds())
    while time.monotonic() < deadline:
        row = await db_sync_to_async(
            lambda: ChatSession.objects.filter(pk=session_id).values_list(*CLAIM_FIELDS).first()
        )()
        if row is None or not _claim_is_live(*row, timezone.now()):
            return
        await asyncio.sleep(poll)
