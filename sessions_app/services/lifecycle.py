"""Start and end the timer: start, end (by the consultant, staff or the guardian), stuck sessions."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import cache
from django.db import transaction
from django.utils import timezone

from billing import budgets
from config.dbthread import db_sync_to_async
from sessions_app import integrity
from sessions_app.errors import (
    SESSION_LOCKED,
    BadInput,
    MessageTooLarge,
    SessionLocked,
)
from sessions_app.models import (
    ChatSession,
    EndReason,
    SessionSegment,
    SessionSource,
    SessionStatus,
)
from sessions_app.selectors import session_get_for_owner, session_summary
from sessions_app.services.claims import (
    _no_live_turn,
    turn_is_live,
    turn_stale_after,
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
from sessions_app.services.store import _load
from sessions_app.services.turns import (
    _TURNS,
    _TURNS_LOCK,
    _stop_key,
    _store_answer,
)

logger = logging.getLogger(__name__)

UNKNOWN_END_REASON = "Unknown end reason {reason!r}; use one of {choices}."


# A worker streaming an answer polls for a stop request every half second; if it has not let go
# of the session after this long it is gone, and the end goes ahead (its answer, should it still
# arrive, is stored and the seal renewed).
REMOTE_STOP_WAIT_SECONDS = 10.0


@budgets.alerts_on_refusal
def session_start(
    *,
    user,
    client,
    model,
    brand=None,
    name: str = "",
    system_prompt: str = "",
    source: str = SessionSource.WEB,
    api_token=None,
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
        raise BadInput(TOKEN_CLIENT.format(slug=api_token.client.slug))
    model_name = _resolve_model(model)
    budgets.budget_check(client_id=domain.pk, model=model_name)  # a paid model for a client over budget
    brand_obj = _resolve_brand(brand, domain)
    now = timezone.now()
    with transaction.atomic():
        session = ChatSession.objects.create(
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
        SessionSegment.objects.create(session=session, domain=domain, brand=brand_obj, model=model_name, started_at=now)
    return session


def _wait_for_remote_turn(session: ChatSession, *, timeout: float | None = None) -> None:
    """Ask a streaming answer in another process to stop, then wait for it to store itself."""
    claim = session.turn_started_at
    if claim is None:
        return
    cache.set(_stop_key(session.pk, claim), True, timeout=int(turn_stale_after().total_seconds()) + 60)
    deadline = time.monotonic() + (timeout if timeout is not None else REMOTE_STOP_WAIT_SECONDS)
    while time.monotonic() < deadline:
        current = ChatSession.objects.filter(pk=session.pk).values_list("turn_started_at", flat=True).first()
        if current != claim:
            return
        time.sleep(0.1)


def _end(session: ChatSession, *, reason: str, at: datetime | None = None, wait_remote: bool = True) -> dict:
    if session.status == SessionStatus.ENDED:
        return session_summary(session=session)
    if session.is_locked:
        raise SessionLocked(SESSION_LOCKED)

    with _TURNS_LOCK:
        turn = _TURNS.get(str(session.pk))
    taken = False
    if turn is not None:
        taken = turn.take_over()
        if taken:
            turn.request_stop()
        else:
            # The answer is being stored right now in another thread: let it finish.
            turn.finished.wait(timeout=30)
    elif wait_remote and turn_is_live(session):
        _wait_for_remote_turn(session)

    now = timezone.now()
    with transaction.atomic():
        locked = ChatSession.objects.select_for_update().get(pk=session.pk)
        if locked.status == SessionStatus.ENDED:
            ended = True
        else:
            ended = False
            if taken:
                _store_answer(turn, now=now)
                locked = ChatSession.objects.select_for_update().get(pk=session.pk)
            ended_at = at or now
            last_start = (
                locked.segments.order_by("-started_at").values_list("started_at", flat=True).first()
                or locked.started_at
            )
            ended_at = max(ended_at, locked.started_at, last_start)
            SessionSegment.objects.filter(session=locked, ended_at__isnull=True).update(ended_at=ended_at)
            locked.status = SessionStatus.ENDED
            locked.ended_at = ended_at
            locked.duration_seconds = int((ended_at - locked.started_at).total_seconds() // 1)
            locked.end_reason = reason
            locked.turn_started_at = None
            locked.save(update_fields=["status", "ended_at", "duration_seconds", "end_reason", "turn_started_at"])
            locked.soulfra_hash = integrity.build_seal(locked)
            locked.save(update_fields=["soulfra_hash"])
    if taken:
        turn.finished.set()  # state stays "taken": the chat generator must not store it again
    if ended:
        logger.info("session %s was already ended", session.pk)
    return session_summary(session=_load(session.pk))


def session_end(*, session_id, user, reason: str = EndReason.USER) -> dict:
    """Stop the timer, close the last segment, seal, and return the summary (idempotent).

    Only the owner (or staff) ends a session; an invited consultant gets `NotOwner`.
    """
    session = session_get_for_owner(session_id=session_id, user=user)
    if reason not in EndReason.values:
        raise BadInput(UNKNOWN_END_REASON.format(reason=reason, choices=", ".join(EndReason.values)))
    return _end(session, reason=reason)


async def asession_end(*, session_id, user, reason: str = EndReason.USER) -> dict:
    """`session_end` for async callers: waits for an answer in another process without a thread."""
    if reason not in EndReason.values:
        raise BadInput(UNKNOWN_END_REASON.format(reason=reason, choices=", ".join(EndReason.values)))
    session = await db_sync_to_async(session_get_for_owner)(session_id=session_id, user=user)
    with _TURNS_LOCK:
        local = str(session.pk) in _TURNS
    if not local and session.status == SessionStatus.ACTIVE and turn_is_live(session):
        await sync_to_async(
            lambda: cache.set(
                _stop_key(session.pk, session.turn_started_at), True, int(turn_stale_after().total_seconds()) + 60
            ),
            thread_sensitive=False,
        )()
        await wait_for_turn(session.pk, limit=REMOTE_STOP_WAIT_SECONDS)

    def end() -> dict:
        fresh = session_get_for_owner(session_id=session.pk, user=user)
        return _end(fresh, reason=reason, wait_remote=False)

    return await db_sync_to_async(end)()


def sessions_end_idle(*, now: datetime | None = None) -> list[ChatSession]:
    """The guardian: end sessions idle past SESSION_IDLE_TIMEOUT at their last activity."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.SESSION_IDLE_TIMEOUT)
    ended = []
    for session in ChatSession.objects.idle_since(cutoff).filter(_no_live_turn(now)).select_related("domain"):
        _end(session, reason=EndReason.IDLE_TIMEOUT, at=session.last_activity_at)
        ended.append(_load(session.pk))
    return ended


def sessions_stuck(*, now: datetime | None = None):
    """Active sessions whose answer claim is older than the provider timeouts allow."""
    now = now or timezone.now()
    first = settings.PROVIDER_CONNECT_TIMEOUT + settings.PROVIDER_FIRST_TOKEN_TIMEOUT
    cutoff = now - timedelta(seconds=first + settings.PROVIDER_IDLE_TIMEOUT)
    return ChatSession.objects.active().filter(turn_started_at__lt=cutoff).select_related("domain", "user")


def session_end_as_staff(*, session: ChatSession) -> dict:
    """End any session for staff (the admin action)."""
    return _end(session, reason=EndReason.STAFF)
