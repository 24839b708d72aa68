"""The chat WebSocket's frames (docs/WEBSOCKET.md), as TypedDicts.

`consumers.py` reads the inbound ones (after `boundary.py` has checked them) and it and
`livechat.py` send the outbound ones; `OUTBOUND` maps each `type` to its shape, and the
consumer tests hold every frame they receive to it (`check_outbound`). Money and times inside
the nested shapes are as the REST API writes them (`shapes.py`).
"""

from typing import Any, Literal, NotRequired, TypedDict, get_type_hints

from sessions_app.shapes import MessageShape, SessionShape, StreamShape

# --- Inbound: what a page sends ---------------------------------------------------------------


class ChatFrame(TypedDict):
    type: Literal["chat"]
    message: str
    turn: NotRequired[str | None]  # the page's id for the turn, echoed on its frames


class ResumeFrame(TypedDict):
    type: Literal["resume"]
    turn: str | None
    after: int  # the page has this turn's token frames 1..after


class StopFrame(TypedDict):
    type: Literal["stop"]


class SwitchFrame(TypedDict):
    type: Literal["switch"]
    client: NotRequired[str]
    model: NotRequired[str]
    reason: NotRequired[str]


class EndFrame(TypedDict):
    type: Literal["end"]


class EditFrame(TypedDict):
    type: Literal["edit"]
    seq: int
    message: str


class RegenerateFrame(TypedDict):
    type: Literal["regenerate"]
    seq: int


class PingFrame(TypedDict):
    type: Literal["ping"]


InboundFrame = ChatFrame | ResumeFrame | StopFrame | SwitchFrame | EndFrame | EditFrame | RegenerateFrame | PingFrame


# --- Outbound: what the server sends ----------------------------------------------------------


class QuestionShape(MessageShape):
    """A turn's stored user message, with its author's name (shared sessions)."""

    author_name: str | None


class ReadyFrame(TypedDict):
    type: Literal["ready"]
    session: SessionShape
    streaming: bool  # an answer is streaming: send `resume` to receive it
    owner: bool  # False for an invited consultant: no End, no switch


class TurnStartedFrame(TypedDict):
    type: Literal["turn.started"]
    turn: str
    message: str
    question: NotRequired[QuestionShape]
    resumed: NotRequired[bool]  # replayed to a page that resumed mid-answer


class TokenFrame(TypedDict):
    type: Literal["token"]
    turn: str
    n: int  # numbered from 1 within the turn: a resuming page says the last it has
    text: str


class MessageDoneFrame(TypedDict):
    type: Literal["message.done"]
    turn: str
    message: MessageShape
    session: SessionShape
    question: NotRequired[QuestionShape]


class StoppedFrame(TypedDict):
    type: Literal["stopped"]
    turn: str
    stored: MessageShape | None
    session: SessionShape
    question: NotRequired[QuestionShape]


class ErrorFrame(TypedDict):
    type: Literal["error"]
    code: str
    message: str
    turn: NotRequired[str]
    stored: NotRequired[MessageShape | None]  # present when a turn failed: what is stored, if anything
    session: NotRequired[SessionShape]
    question: NotRequired[QuestionShape]


class ResumedFrame(TypedDict):
    type: Literal["resumed"]
    turn: str | None  # None: nothing is streaming any more
    n: NotRequired[int]


class SwitchedFrame(TypedDict):
    type: Literal["switched"]
    stream: StreamShape
    session: SessionShape
    client: dict[str, str]  # slug and name
    model: str
    brand: dict[str, Any]


class EndedFrame(TypedDict):
    type: Literal["ended"]
    summary: dict[str, Any]  # the summary as GET …/summary answers it
    summary_url: NotRequired[str]


class VersionFrame(TypedDict):
    type: Literal["version"]
    kind: str  # edit | regenerate
    replaces_seq: int
    session: SessionShape
    url: str  # the new version's chat page


class RevokedFrame(TypedDict):
    type: Literal["revoked"]
    message: str


class PongFrame(TypedDict):
    type: Literal["pong"]


OutboundFrame = (
    ReadyFrame
    | TurnStartedFrame
    | TokenFrame
    | MessageDoneFrame
    | StoppedFrame
    | ErrorFrame
    | ResumedFrame
    | SwitchedFrame
    | EndedFrame
    | VersionFrame
    | RevokedFrame
    | PongFrame
)

OUTBOUND: dict[str, type] = {
    "ready": ReadyFrame,
    "turn.started": TurnStartedFrame,
    "token": TokenFrame,
    "message.done": MessageDoneFrame,
    "stopped": StoppedFrame,
    "error": ErrorFrame,
    "resumed": ResumedFrame,
    "switched": SwitchedFrame,
    "ended": EndedFrame,
    "version": VersionFrame,
    "revoked": RevokedFrame,
    "pong": PongFrame,
}


def check_outbound(frame: dict) -> list[str]:
    """What is wrong with a frame the server sent, against its TypedDict (empty when nothing)."""
    shape = OUTBOUND.get(frame.get("type", ""))
    if shape is None:
        return [f"unknown frame type {frame.get('type')!r}"]
    keys = set(get_type_hints(shape))
    required = set(shape.__required_keys__)  # type: ignore[attr-defined]
    problems = [f"{frame['type']}: missing {key!r}" for key in sorted(required - frame.keys())]
    problems += [f"{frame['type']}: unexpected {key!r}" for key in sorted(frame.keys() - keys)]
    return problems
