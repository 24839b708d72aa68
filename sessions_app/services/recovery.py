"""Turns whose process is gone: which process owns a turn, whether it still runs, and settling it.

A turn's claim names its process (`turn_owner`: host, pid and the process's start time) and
carries a checkpoint of the answer so far (`turn_partial`, written at most every 2 seconds).
When that process is gone (killed, crashed, or it gave the turn up because its final store
failed) the turn is *settled*: its checkpointed text is stored as the answer, `partial` (or
`error` when nothing had been saved), billed from estimates, and the claim is released, all
in one transaction. So a process that dies mid-answer loses at most the last 2 seconds of it
(DESIGN.md invariant 5), and nothing stays "in progress".

Who settles: the next daphne start-up (turns of dead processes on its host), the guardian
(those, and every stale turn: `models.turn_stale_after()`), the next chat or switch in the
session (a claim that is not live is taken over by settling it first), and an end.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from datetime import datetime
from decimal import Decimal

from django.db import transaction
from django.utils import timezone

from billing import pricing
from billing.models import LLMUsage, TokenSource, UsageStatus
from providers import router, tokens
from providers.naming import parse_model
from sessions_app import integrity
from sessions_app.models import ORPHANED_TURN, ChatSession, MessageRole, MessageStatus, SessionMessage
from sessions_app.refs import SessionRef
from sessions_app.services.inputs import quantize_money
from sessions_app.services.store import _store_linked

logger = logging.getLogger(__name__)

SETTLED_CUT_OFF = "Cut off: the server stopped while this answer streamed; the text saved at {at:%H:%M:%S} UTC is kept."
SETTLED_UNSTORED = (
    "Cut off: this answer could not be stored when it ended (the database was unreachable); "
    "the text saved at {at:%H:%M:%S} UTC is kept."
)

# What a settled turn's claim fields go back to.
CLAIM_CLEARED = {
    "turn_started_at": None,
    "turn_owner": "",
    "turn_checkpoint_at": None,
    "turn_partial": "",
    "turn_prompt_tokens": 0,
}


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is told apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # The command name (field 2) may hold spaces; fields after its closing paren are plain.
            return stat.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return "0"


@functools.cache
def _owner_for(pid: int) -> str:
    return f"{socket.gethostname()}:{pid}:{_process_start(pid)}"


def process_owner() -> str:
    """This process as a turn's owner: `host:pid:start` (recomputed after a fork)."""
    return _owner_for(os.getpid())


def owner_is_gone(owner: str) -> bool:
    """True when the turn's process is known to be gone: given up, or dead on this host.

    A process on another host cannot be checked from here: False (the stale rule covers it).
    """
    if owner == ORPHANED_TURN:
        return True
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return False  # no owner recorded (a claim written by hand or before owners): the stale rule applies
    host, pid, start = parts[0], int(parts[1]), parts[2]
    if host != socket.gethostname():
        return False
    if start != "0":
        return _process_start(pid) != start  # gone, or its pid now belongs to another process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def turn_settle(*, session_id: SessionRef, claim: datetime, now: datetime | None = None) -> SessionMessage | None:
    """Store an abandoned turn's checkpointed text as its answer and release its claim.

    Does nothing (None) when the session no longer holds `claim`: its own process stored the
    answer, or someone settled it first.
    """
    now = now or timezone.now()
    with transaction.atomic():
        session = (
            ChatSession.objects.select_for_update(of=("self",))
            .select_related("domain")
            .filter(pk=session_id, turn_started_at=claim)
            .first()
        )
        if session is None:
            return None
        text = session.turn_partial
        last = (
            SessionMessage.objects.filter(session_id=session.pk)
            .order_by("-seq")
            .values_list("seq", "hash", "timestamp")
            .first()
        )
        seq, previous, asked = (
            (last[0] + 1, last[1] or integrity.GENESIS, last[2]) if last else (1, integrity.GENESIS, claim)
        )
        # The answer is dated when its text was last saved: never before the question, never
        # later than now (an end's `ended_at`).
        at = min(max(session.turn_checkpoint_at or claim, claim, asked), now)
        ref = parse_model(session.current_model)
        prompt = session.turn_prompt_tokens if text else 0
        completion = tokens.estimate_tokens(text) if text else 0
        cost = Decimal("0")
        if prompt or completion:
            cost = quantize_money(
                pricing.cost_of(
                    provider=ref.provider,
                    model_id=router.resolve_alias(ref).model,
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    at=at,
                )
            )
        reason = (SETTLED_UNSTORED if session.turn_owner == ORPHANED_TURN else SETTLED_CUT_OFF).format(at=at)
        message = SessionMessage(
            session=session,
            seq=seq,
            role=MessageRole.ASSISTANT,
            content=text,
            timestamp=at,
            model=session.current_model,
            provider=ref.provider,
            domain=session.domain,
            prompt_tokens=prompt,
            completion_tokens=completion,
            tokens=prompt + completion,
            token_source=TokenSource.ESTIMATED,
            cost_usd=cost,
            status=MessageStatus.PARTIAL if text else MessageStatus.ERROR,
            error_text=reason,
        )
        _store_linked(message, previous)
        LLMUsage.objects.create(
            user_id=session.user_id,
            session_id=session.pk,
            message=message,
            client_id=session.domain_id,
            provider=ref.provider,
            model=ref.model,
            prompt_tokens=prompt,
            completion_tokens=completion,
            token_source=TokenSource.ESTIMATED,
            cost=cost,
            duration_ms=max(0, int((at - claim).total_seconds() * 1000)),
            status=UsageStatus.ERROR,
            error_text=reason,
            created_at=at,
        )
        ChatSession.objects.filter(pk=session.pk).update(
            total_messages=session.total_messages + 1,
            total_tokens=session.total_tokens + prompt + completion,
            estimated_cost_usd=quantize_money(session.estimated_cost_usd + (cost or Decimal("0"))),
            last_activity_at=max(session.last_activity_at, at),
            **CLAIM_CLEARED,
        )
    logger.warning(
        "settled the answer streaming in session %s since %s (owner %s): %d characters kept as %s",
        session_id,
        claim.isoformat(),
        session.turn_owner or "unknown",
        len(text),
        message.status,
    )
    return message
