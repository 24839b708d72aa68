"""Writes: start, chat, switch, end, branch and import into work sessions (docs/DESIGN.md "Flows").

Every service takes keyword arguments only and raises the `sessions_app.errors` classes. The
package is split by lifecycle; callers import from here:

- `inputs`: checks of what callers hand in (text, client, model, brand, stream options).
- `claims`: the one-answer-at-a-time claim on a session and when it counts as stale.
- `store`: loading a session and linking messages into its hash chain.
- `turns`: the chat turn (`begin_turn`, `session_chat`).
- `switching`: moving a session to another client or model.
- `lifecycle`: start, end, the guardian's idle end, stuck sessions.
- `history`: branch, append already-answered messages.
"""

from sessions_app.events import TURN_ROW_FIELDS, KnownSession
from sessions_app.services.claims import (
    TURN_GRACE_SECONDS,
    _check_writable,
    _claim_or_explain,
    _release_claim,
    turn_is_live,
    turn_stale_after,
    wait_for_turn,
    with_pending_stream,
)
from sessions_app.services.history import (
    BRANCH_EMPTY,
    BRANCH_RANGE,
    HISTORY_EMPTY,
    HISTORY_LIMIT_FACTOR,
    HISTORY_SHAPE,
    session_append_history,
    session_branch,
)
from sessions_app.services.inputs import (
    CLIENT_REQUIRED,
    MODEL_REQUIRED,
    NAME_LIMIT,
    NAME_TOO_LONG,
    NOT_TEXT,
    SYSTEM_PROMPT_TOO_LARGE,
    TOKEN_CLIENT,
    UNKNOWN_BRAND,
    UNKNOWN_SOURCE,
    quantize_money,
)
from sessions_app.services.lifecycle import (
    REMOTE_STOP_WAIT_SECONDS,
    UNKNOWN_END_REASON,
    _end,
    asession_end,
    session_end,
    session_end_as_staff,
    session_start,
    sessions_end_idle,
    sessions_stuck,
)
from sessions_app.services.store import _load
from sessions_app.services.switching import (
    REASON_LIMIT,
    REASON_TOO_LONG,
    SWITCH_BUSY,
    SWITCH_NOTHING,
    SWITCH_SAME,
    asession_switch,
    session_switch,
)
from sessions_app.services.turns import (
    CANCELLED,
    ENDED_DURING_ANSWER,
    KNOWN_HISTORY_MAX_CHARS,
    PROVIDER_FAILED,
    PROVIDER_TIMED_OUT,
    STOPPED_BY_END,
    _stop_key,
    begin_turn,
    session_chat,
)

__all__ = [
    "BRANCH_EMPTY",
    "BRANCH_RANGE",
    "CANCELLED",
    "CLIENT_REQUIRED",
    "ENDED_DURING_ANSWER",
    "HISTORY_EMPTY",
    "HISTORY_LIMIT_FACTOR",
    "HISTORY_SHAPE",
    "KNOWN_HISTORY_MAX_CHARS",
    "MODEL_REQUIRED",
    "NAME_LIMIT",
    "NAME_TOO_LONG",
    "NOT_TEXT",
    "PROVIDER_FAILED",
    "PROVIDER_TIMED_OUT",
    "REASON_LIMIT",
    "REASON_TOO_LONG",
    "REMOTE_STOP_WAIT_SECONDS",
    "STOPPED_BY_END",
    "SWITCH_BUSY",
    "SWITCH_NOTHING",
    "SWITCH_SAME",
    "SYSTEM_PROMPT_TOO_LARGE",
    "TOKEN_CLIENT",
    "TURN_GRACE_SECONDS",
    "TURN_ROW_FIELDS",
    "UNKNOWN_BRAND",
    "UNKNOWN_END_REASON",
    "UNKNOWN_SOURCE",
    "KnownSession",
    "_check_writable",
    "_claim_or_explain",
    "_end",
    "_load",
    "_release_claim",
    "_stop_key",
    "asession_end",
    "asession_switch",
    "begin_turn",
    "quantize_money",
    "session_append_history",
    "session_branch",
    "session_chat",
    "session_end",
    "session_end_as_staff",
    "session_start",
    "session_switch",
    "sessions_end_idle",
    "sessions_stuck",
    "turn_is_live",
    "turn_stale_after",
    "wait_for_turn",
    "with_pending_stream",
]
