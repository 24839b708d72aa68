"""Start and end the timer: start, end (by the consultant, staff or the guardian), stuck sessions."""

from __future__ import annotations

import logging
import socket
import time
from datetime import datetime, timedelta

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from billing import budgets
from config import statements
from config.dbthread import db_sync_to_async
from sessions_app import integrity
from sessions_app.errors import (
    SESSION_LOCKED,
    BadInput,
    MessageTooLarge,
    SessionLocked,
)
from sessions_app.models import (
    ORPHANED_TURN,
    ApiToken,
    ChatSession,
    EndReason,
    SessionMessage,
    SessionSegment,
    SessionSource,
    SessionStatus,
    stale_turn_q,
)
from sessions_app.refs import Person, SessionRef
from sessions_app.selectors import session_get_for_owner, session_summary
from sessions_app.services.claims import (
    CLAIM_FIELDS,
    _claim_is_live,
    _no_live_turn,
    turn_is_live,
    wait_for_turn,
)
from sessions_app.services.inputs import (
    NAME_LIMIT,
    NAME_TOO_LONG,
    SYSTEM_PROMPT_TOO_LARGE,
    TOKEN_CLIENT,
    UNKNOWN_SOURCE,
    _require_text,
    _resolve_brand,
    _resolve_client,
    _resolve_model,
)
from sessions_app.services.recovery import CLAIM_CLEARED, turn_settle
from sessions_app.services.store import _load
from sessions_app.services.turns import (
    STOP_END,
    StreamingAnswer,
    _store_answer,
    local_turn,
    turn_stop_request,
)
from sessions_app.shapes import SummaryShape

logger = logging.getLogger(__name__)

UNKNOWN_END_REASON = "Unknown end reason {reason!r}; use one of {choices}."


# A worker streaming an answer polls for a stop request every half second; if it has not let go
# of the session after this long it is taken for gone, and the end settles its answer from the
# last checkpoint (should the worker still finish, its answer is logged, never stored after the end).
REMOTE_STOP_WAIT_SECONDS = 10.0


@budgets.alerts_on_refusal
def session_start(
    *,
    user: Person,
    client: object,
    model: object,
    brand: object = None,
    name: str = "",
    system_prompt: str = "",
    source: str = SessionSource.WEB,
    api_token: ApiToken | None = None,
) -> ChatSession:
    """Start the timer: a session on `client` with `model`, and its first segment."""
    name = _require_text(name, "name").strip()
    if len(name) > NAME_LIMIT:
        raise BadInput(NAME_TOO_LONG.format(size=len(name), limit=NAME_LIMIT))
    system_prompt = _require_text(system_prompt, "system_prompt")
    if len(system_prompt) > settings.CHAT_MAX_MESSAGE_CHARS:
        raise MessageTooLarge(
            SYSTEM_PROMPT_TOO_LARGE.format(size=len(system_prompt), limit=settings.CHAT_MAX_MESSAGE_CHARS)
        )
    if source not in SessionSource.values:
        raise BadInput(UNKNOWN_SOURCE.format(source=source))
    domain = _resolve_client(client, user)
    if api_token is not None and api_token.client_id and api_token.client_id != domain.pk:
        bound = api_token.client
        raise BadInput(TOKEN_CLIENT.format(slug=bound.slug if bound is not None else api_token.client_id))
    model_name = _resolve_model(model)
    budgets.budget_check(client_id=domain.pk, model=model_name)  # a paid model for a client over budget
    brand_obj = _resolve_brand(brand, domain)
    now = timezone.now()
    session = ChatSession(
        user=user,
        domain=domain,
        brand=brand_obj,
        name=name,
        system_prompt=system_prompt,
        started_at=now,
        last_activity_at=now,
        primary_model=model_name,
        current_model=model_name,
        source=source,
        api_token=api_token,
    )
    # Every gateway conversation starts here: prepared statements, as `save()` would store them.
    with transaction.atomic():
        statements.insert(session)
        statements.insert(
            SessionSegment(session=session, domain=domain, brand=brand_obj, model=model_name, started_at=now)
        )
    return session


def _wait_for_remote_turn(session: ChatSession, *, timeout: float | None = None) -> StreamingAnswer | None:
    """Ask a streaming answer in another process to stop, then wait for it to store itself.

    Returns the turn if it turns out to stream in this process after all (it was claimed but
    not yet registered when the end looked): the end takes it over.
    """
    claim = session.turn_started_at
    if claim is None:
        return None
    turn_stop_request(session_id=session.pk, claim=claim, reason=STOP_END)
    deadline = time.monotonic() + (timeout if timeout is not None else REMOTE_STOP_WAIT_SECONDS)
    while time.monotonic() < deadline:
        turn = local_turn(session.pk)
        if turn is not None and turn.start.claim == claim:
            return turn
        current = ChatSession.objects.filter(pk=session.pk).values_list("turn_started_at", flat=True).first()
        if current != claim:
            return None
        time.sleep(0.1)
    return None


def _take_over(turn: StreamingAnswer) -> bool:
    """Take a streaming answer over for the end, and stop it; False once its stream has ended."""
    if not turn.take_over():
        return False
    turn.request_stop(STOP_END)
    return True


def _end(
    session: ChatSession,
    *,
    reason: str,
    at: datetime | None = None,
    wait_remote: bool = True,
    taken: StreamingAnswer | None = None,
) -> SummaryShape:
    """End the session, ordered with any answer streaming in it.

    An answer streaming here is taken over and stored (partial) before the seal; one streaming
    elsewhere is asked to stop and waited for; one whose process is gone, or that did not let
    go in time, is settled from its checkpoint. So no answer is ever stored after `ended_at`,
    and ending twice returns the same summary.
    """
    if session.status == SessionStatus.ENDED:
        return session_summary(session=session)
    if session.is_locked:
        raise SessionLocked(SESSION_LOCKED)

    turn = taken
    if turn is None:
        turn = local_turn(session.pk)
        if turn is None and wait_remote and turn_is_live(session):
            turn = _wait_for_remote_turn(session)
        if turn is not None and not _take_over(turn):
            # Its stream has ended: it stores its own answer (complete or failed) right now.
            turn.finished.wait(timeout=30)
            turn = None

    now = timezone.now()
    with transaction.atomic():
        locked = ChatSession.objects.select_for_update().get(pk=session.pk)
        if locked.status == SessionStatus.ENDED:
            ended = True
        else:
            ended = False
            if turn is not None:
                _store_answer(turn, now=now)
            claim = ChatSession.objects.filter(pk=session.pk).values_list("turn_started_at", flat=True).first()
            if claim is not None:
                # Another process's answer that did not let go in time, or one whose process is
                # gone: its question keeps the checkpointed text, dated before the end.
                turn_settle(session_id=session.pk, claim=claim, now=now)
            locked = ChatSession.objects.select_for_update().get(pk=session.pk)
            ended_at = at or now
            last_start = (
                locked.segments.order_by("-started_at").values_list("started_at", flat=True).first()
                or locked.started_at
            )
            ended_at = max(ended_at, locked.started_at, last_start)
            if at is not None:
                # Never before the last stored answer (one settled just now may be later than `at`).
                ended_at = max(ended_at, locked.last_activity_at)
            SessionSegment.objects.filter(session=locked, ended_at__isnull=True).update(ended_at=ended_at)
            locked.status = SessionStatus.ENDED
            locked.ended_at = ended_at
            locked.duration_seconds = int((ended_at - locked.started_at).total_seconds() // 1)
            locked.end_reason = reason
            for name, value in CLAIM_CLEARED.items():
                setattr(locked, name, value)
            locked.save(update_fields=["status", "ended_at", "duration_seconds", "end_reason", *CLAIM_CLEARED])
            locked.soulfra_hash = integrity.build_seal(locked)
            locked.save(update_fields=["soulfra_hash"])
    if turn is not None:
        turn.finished.set()  # state stays "taken": the chat generator must not store it again
    if ended:
        logger.info("session %s was already ended", session.pk)
    return session_summary(session=_load(session.pk))


def session_end(*, session_id: SessionRef, user: Person, reason: str = EndReason.USER) -> SummaryShape:
    """Stop the timer, close the last segment, seal, and return the summary (idempotent).

    Only the owner (or staff) ends a session; an invited consultant gets `NotOwner`.
    """
    session = session_get_for_owner(session_id=session_id, user=user)
    if reason not in EndReason.values:
        raise BadInput(UNKNOWN_END_REASON.format(reason=reason, choices=", ".join(EndReason.values)))
    return _end(session, reason=reason)


async def asession_end(*, session_id: SessionRef, user, reason: str = EndReason.USER) -> SummaryShape:
    """`session_end` for async callers: waits for an answer in another process without a thread."""
    if reason not in EndReason.values:
        raise BadInput(UNKNOWN_END_REASON.format(reason=reason, choices=", ".join(EndReason.values)))
    session = await db_sync_to_async(session_get_for_owner)(session_id=session_id, user=user)
    if local_turn(session.pk) is None and session.status == SessionStatus.ACTIVE and turn_is_live(session):
        claim = session.turn_started_at
        await sync_to_async(
            lambda: turn_stop_request(session_id=session.pk, claim=claim, reason=STOP_END), thread_sensitive=False
        )()
        await wait_for_turn(session.pk, limit=REMOTE_STOP_WAIT_SECONDS)

    turn = local_turn(session.pk)
    if turn is not None and not _take_over(turn):
        # Its stream has ended and it stores its own answer on the database thread: wait off it.
        await sync_to_async(turn.finished.wait, thread_sensitive=False)(30)
        turn = None

    def end() -> SummaryShape:
        fresh = session_get_for_owner(session_id=session.pk, user=user)
        return _end(fresh, reason=reason, wait_remote=False, taken=turn)

    return await db_sync_to_async(end)()


def sessions_end_idle(*, now: datetime | None = None) -> list[ChatSession]:
    """The guardian: end sessions idle past SESSION_IDLE_TIMEOUT at their last activity."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.SESSION_IDLE_TIMEOUT)
    ended = []
    for session in ChatSession.objects.idle_since(cutoff).filter(_no_live_turn(now)).select_related("domain"):
        session_end_idle(session=session)
        ended.append(_load(session.pk))
    return ended


def session_end_idle(*, session: ChatSession) -> SummaryShape:
    """End a forgotten session at its last activity, never "now": the idle hours are not billed.

    The guardian's rule, also used by `manage.py chat --clean`.
    """
    return _end(session, reason=EndReason.IDLE_TIMEOUT, at=session.last_activity_at)


def sessions_stuck(*, now: datetime | None = None) -> QuerySet[ChatSession]:
    """Active sessions whose answer claim is stale (`models.turn_stale_after`): the monitoring page's stuck."""
    return ChatSession.objects.with_stale_turn(now or timezone.now()).select_related("domain", "user")


def sessions_settle_abandoned(*, now: datetime | None = None) -> list[tuple[ChatSession, SessionMessage]]:
    """Settle every answer whose process is gone: stale ones, and those of dead processes on this host.

    The guardian calls it on every pass and daphne at start-up; each settled turn's checkpointed
    text becomes its answer (`recovery.turn_settle`). Returns the sessions with their new answers.
    """
    now = now or timezone.now()
    here = Q(turn_owner__startswith=f"{socket.gethostname()}:") | Q(turn_owner=ORPHANED_TURN)
    candidates = (
        ChatSession.objects.active()
        .filter(turn_started_at__isnull=False)
        .filter(stale_turn_q(now) | here)
        .values_list("pk", *CLAIM_FIELDS)
    )
    settled = []
    for pk, *claim in list(candidates):
        if _claim_is_live(*claim, now):
            continue
        message = turn_settle(session_id=pk, claim=claim[0], now=now)
        if message is not None:
            settled.append((_load(pk), message))
    return settled


def session_end_as_staff(*, session: ChatSession) -> SummaryShape:
    """End any session for staff (the admin action)."""
    return _end(session, reason=EndReason.STAFF)
