"""The low-level writes every service shares: load a session, and link messages into its hash chain."""

from __future__ import annotations

from sessions_app import integrity
from sessions_app.models import (
    ChatSession,
    SessionMessage,
)


def _chain_tail(session_id) -> tuple[int, str]:
    """The next sequence number and the hash it links to."""
    last = SessionMessage.objects.filter(session_id=session_id).order_by("-seq").values_list("seq", "hash").first()
    if last is None:
        return 1, integrity.GENESIS
    return last[0] + 1, last[1] or integrity.GENESIS


def _store_linked(message: SessionMessage, previous: str) -> str:
    message.hash = integrity.link_hash(previous, message)
    message.save(force_insert=True)
    return message.hash


def _load(session_id) -> ChatSession:
    return ChatSession.objects.select_related("domain", "brand").get(pk=session_id)
