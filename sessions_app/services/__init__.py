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
- `versions`: continue an ended session, edit a message, regenerate an answer (new sessions).
- `sharing`: invite consultants into a session, revoke them.
- `details`: rename, hide from lists.
- `presets`: start a session from a conversation template.
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
from sessions_app.services.details import HIDDEN_NOT_BOOL, UPDATE_NOTHING, session_update
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
from sessions_app.services.presets import (
    TEMPLATE_AMBIGUOUS,
    TEMPLATE_OTHER_CLIENT,
    TEMPLATE_UNKNOWN,
    session_start_from_template,
    template_resolve,
)
from sessions_app.services.sharing import (
    INVITE_ENDED,
    INVITE_NAME_REQUIRED,
    INVITE_NOT_ALLOWED,
    INVITE_SELF,
    INVITE_UNKNOWN,
    REVOKE_NONE,
    session_invite,
    session_revoke,
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
from sessions_app.services.versions import (
    CONTINUE_ACTIVE,
    CONTINUE_ARCHIVED,
    EDIT_NOT_A_QUESTION,
    EDIT_NOTHING,
    REGENERATE_NO_QUESTION,
    REGENERATE_NOT_AN_ANSWER,
    REGENERATE_NOTHING,
    SEQ_NOT_A_NUMBER,
    NewVersion,
    session_continue,
    session_edit,
    session_regenerate,
)

__all__ = [
    "BRANCH_EMPTY",
    "BRANCH_RANGE",
    "CANCELLED",
    "CLIENT_REQUIRED",
    "CONTINUE_ACTIVE",
    "CONTINUE_ARCHIVED",
    "EDIT_NOTHING",
    "EDIT_NOT_A_QUESTION",
    "ENDED_DURING_ANSWER",
    "HIDDEN_NOT_BOOL",
    "HISTORY_EMPTY",
    "HISTORY_LIMIT_FACTOR",
    "HISTORY_SHAPE",
    "INVITE_ENDED",
    "INVITE_NAME_REQUIRED",
    "INVITE_NOT_ALLOWED",
    "INVITE_SELF",
    "INVITE_UNKNOWN",
    "KNOWN_HISTORY_MAX_CHARS",
    "MODEL_REQUIRED",
    "NAME_LIMIT",
    "NAME_TOO_LONG",
    "NOT_TEXT",
    "PROVIDER_FAILED",
    "PROVIDER_TIMED_OUT",
    "REASON_LIMIT",
    "REASON_TOO_LONG",
    "REGENERATE_NOTHING",
    "REGENERATE_NOT_AN_ANSWER",
    "REGENERATE_NO_QUESTION",
    "REMOTE_STOP_WAIT_SECONDS",
    "REVOKE_NONE",
    "SEQ_NOT_A_NUMBER",
    "STOPPED_BY_END",
    "SWITCH_BUSY",
    "SWITCH_NOTHING",
    "SWITCH_SAME",
    "SYSTEM_PROMPT_TOO_LARGE",
    "TEMPLATE_AMBIGUOUS",
    "TEMPLATE_OTHER_CLIENT",
    "TEMPLATE_UNKNOWN",
    "TOKEN_CLIENT",
    "TURN_GRACE_SECONDS",
    "TURN_ROW_FIELDS",
    "UNKNOWN_BRAND",
    "UNKNOWN_END_REASON",
    "UNKNOWN_SOURCE",
    "UPDATE_NOTHING",
    "KnownSession",
    "NewVersion",
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
    "session_continue",
    "session_edit",
    "session_end",
    "session_end_as_staff",
    "session_invite",
    "session_regenerate",
    "session_revoke",
    "session_start",
    "session_start_from_template",
    "session_switch",
    "session_update",
    "sessions_end_idle",
    "sessions_stuck",
    "template_resolve",
    "turn_is_live",
    "turn_stale_after",
    "wait_for_turn",
    "with_pending_stream",
]
