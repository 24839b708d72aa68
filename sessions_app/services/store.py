"""The low-level writes every service shares: load a session, and its hash chain and totals.

One rule each, in one place:
- `chain_link` is where a message's `seq` and `hash` are set (the chain of docs/DESIGN.md's
  integrity seal), for live sessions and for whole sessions built at once (import, demo).
- `billable_totals` is how a session's totals follow from its messages (invariant 1).
- `chain_append` is the one writer that adds messages to a stored session: linked after the
  chain's tail, inserted, and added to the session's totals.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.utils import timezone

from billing.money import quantize_micro
from config import statements
from sessions_app import integrity
from sessions_app.models import ChatSession, SessionMessage

ZERO = Decimal("0")


def chain_tail(session_id: Any) -> tuple[int, str]:
    """The last stored message's seq and hash (0 and the genesis hash for none)."""
    last = SessionMessage.objects.filter(session_id=session_id).order_by("-seq").values_list("seq", "hash").first()
    if last is None:
        return 0, integrity.GENESIS
    return last[0], last[1] or integrity.GENESIS


def chain_link(messages: Iterable[SessionMessage], *, after: tuple[int, str] = (0, integrity.GENESIS)) -> str:
    """Number `messages` after `after` (a seq and hash) and link each into the chain; return the head."""
    seq, previous = after
    for message in messages:
        seq += 1
        message.seq = seq
        message.hash = previous = integrity.link_hash(previous, message)
    return previous


def billable_totals(messages: Iterable[SessionMessage]) -> tuple[int, int, Decimal]:
    """(messages, tokens, cost) as invariant 1 counts them: every stored message; the tokens and
    cost of those billed in this session (not copies from another, not imports)."""
    count, tokens, cost = 0, 0, ZERO
    for message in messages:
        count += 1
        if message.copied_from_id is None and not message.is_imported:
            tokens += message.tokens
            cost += message.cost_usd or ZERO
    return count, tokens, cost


def chain_append(session: ChatSession, messages: Sequence[SessionMessage], *, now: datetime | None = None) -> None:
    """Add `messages` to a stored session: link them after its tail, insert them, count them.

    Call inside a transaction that holds the session row (or owns the session alone). Each
    message is saved on its own, so the invoice lock (sessions_app/locks.py) sees it; the totals are
    summed in Decimal and written in one UPDATE.
    """
    now = now or timezone.now()
    chain_link(messages, after=chain_tail(session.pk))
    for message in messages:
        message.save(force_insert=True)
    count, tokens, cost = billable_totals(messages)
    state = ChatSession.objects.filter(pk=session.pk).values(
        "total_messages", "total_tokens", "estimated_cost_usd", "last_activity_at"
    )[0]
    update = {
        "total_messages": state["total_messages"] + count,
        "total_tokens": state["total_tokens"] + tokens,
        "estimated_cost_usd": quantize_micro(Decimal(state["estimated_cost_usd"]) + cost),
        "last_activity_at": max(now, state["last_activity_at"]),
    }
    ChatSession.objects.filter(pk=session.pk).update(**update)
    for name, value in update.items():
        setattr(session, name, value)


def _chain_tail(session_id: Any) -> tuple[int, str]:
    """The next sequence number and the hash it links to (the turn's hot path reads it so)."""
    seq, previous = chain_tail(session_id)
    return seq + 1, previous


def _store_linked(message: SessionMessage, previous: str) -> str:
    """Link one numbered message after `previous` and insert it (the turn's hot path)."""
    chain_link([message], after=(message.seq - 1, previous))
    statements.insert(message)  # `save(force_insert=True)`, its SQL built once
    return message.hash


def _load(session_id: Any) -> ChatSession:
    return ChatSession.objects.select_related("domain", "brand").get(pk=session_id)
