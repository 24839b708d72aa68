"""What `session_chat` yields to its callers (WebSocket, REST, CLI, gateway), and what they hand back.

`KnownSession` travels with `Done`: a caller that chats again soon hands it to its next turn.
"""

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
    """The turn finished: the stored assistant message and the session with new totals.

    `known` is the session with all its messages, for a caller that will chat again soon
    (the chat socket) to hand to its next turn, which then need not read them again.
    """

    message: SessionMessage
    session: ChatSession
    known: KnownSession | None = None


class KnownIsStale(Exception):
    """`begin_turn(..., only_if_current=True)`: the session moved on since `known` was read; nothing was written."""


# The columns a turn reads of each stored message: its plan's history and the chain's tail.
TURN_ROW_FIELDS = ("seq", "role", "content", "model", "status", "hash")


@dataclass(frozen=True)
class KnownSession:
    """A session and its messages (`TURN_ROW_FIELDS`, in seq order) as a caller just read them.

    The gateway reads both to recognize a client's history; a turn that begins right after
    reuses them instead of reading them again, when its claim proves nothing has changed in
    between (see `_claim_known`).
    """

    session: ChatSession
    rows: list[tuple]
