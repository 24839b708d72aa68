"""What `session_chat` yields to its callers (WebSocket, REST, CLI, gateway)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sessions_app.models import ChatSession, SessionMessage
    from sessions_app.services import KnownSession


@dataclass(frozen=True)
class Token:
    """A text delta from the provider, handed on as it arrives (no database write)."""

    text: str


@dataclass(frozen=True)
class Done:
    """The turn finished: the stored assistant message and the session with new totals.

    `known` is the session with all its messages, for a caller that will chat again soon
    (the chat socket) to hand to its next turn, which then need not read them again.
    """

    message: SessionMessage
    session: ChatSession
    known: KnownSession | None = None
