"""What `session_chat` yields to its callers (WebSocket, REST, CLI, gateway)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sessions_app.models import ChatSession, SessionMessage


@dataclass(frozen=True)
class Token:
    """A text delta from the provider, handed on as it arrives (no database write)."""

    text: str


@dataclass(frozen=True)
class Done:
    """The turn finished: the stored assistant message and the session with new totals."""

    message: SessionMessage
    session: ChatSession
