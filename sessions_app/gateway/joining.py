"""Join a gateway call to the token's automatic work session.

Clients of the Ollama and OpenAI APIs resend the whole conversation on every call. The
gateway stores only what is new: it recognizes the prefix already stored in the session the
call continues and appends the rest; when the conversation diverges from what was stored
(an edited or regenerated turn) it branches from the stored conversation that shares the
longest prefix, so nothing is stored (or billed) twice.

A tool that holds several conversations (chats, or side requests such as title generation)
gets a session per conversation: each call continues the session whose stored turns its
history matches, and a call whose history matches none (a new conversation) starts a session
of its own, even while the token's other conversations are answering. A session ends when its conversation is edited away from (it is branched), or
when it goes idle: the guardian ends it at its last activity, so idle time is never billed.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from config import statements
from providers.base import ChatMessage
from sessions_app import services
from sessions_app.errors import SessionError
from sessions_app.gateway.common import TOKEN_WITHOUT_CLIENT, ChatRequest, GatewayError
from sessions_app.models import ApiToken, ChatSession, EndReason, SessionMessage, SessionSource

log = logging.getLogger(__name__)

# How many of the token's recent sessions a diverging conversation is compared with.
CANDIDATE_SESSIONS = 5
# How many tokens' last conversations a process remembers (`remember`).
REMEMBERED_TOKENS = 1024


@dataclass(frozen=True)
class Stored:
    seq: int
    role: str
    content: str


@dataclass(frozen=True)
class Match:
    """How far a client's history agrees with a stored conversation."""

    matched: int  # non-system messages that agree, from the start
    next_index: int  # index in the client's history right after the last agreeing message
    last_seq: int  # seq of the last agreeing stored message (0: none)
    complete: bool  # every stored non-system message agreed: the history extends it


def _same(a: str, b: str) -> bool:
    # Clients trim answers they display; surrounding whitespace is not a different turn.
    return a.strip() == b.strip()


def match_history(stored: list[Stored], history: list[ChatMessage]) -> Match:
    """Compare the stored turns with the client's, in order, ignoring system messages.

    System messages in the middle of a conversation (a stored summary of older turns, or a
    client's mid-conversation instruction) do not take part in recognizing the prefix.
    """
    turns = [m for m in stored if m.role != "system"]
    matched, last_seq, next_index = 0, 0, 0
    for index, message in enumerate(history):
        if message["role"] == "system":
            if matched == len(turns):
                break
            continue
        if matched == len(turns):
            break
        turn = turns[matched]
        if turn.role != message["role"] or not _same(turn.content, message["content"]):
            break
        matched += 1
        last_seq = turn.seq
        next_index = index + 1
    return Match(matched=matched, next_index=next_index, last_seq=last_seq, complete=matched == len(turns))


def same_model(a: str, b: str) -> bool:
    """`ollama:llama3.2` and `ollama:llama3.2:latest` are the same Ollama model."""

    def norm(name: str) -> str:
        return name.removesuffix(":latest") if name.startswith("ollama:") else name

    return norm(a) == norm(b)


def _idle_cutoff():
    """Sessions last active before this are idle: the guardian ends them, no call continues them."""
    return timezone.now() - timedelta(seconds=settings.SESSION_IDLE_TIMEOUT)


def _is_live(session: ChatSession, cutoff) -> bool:
    return session.is_active and session.last_activity_at >= cutoff


def _continued_exactly(rows: list[tuple], chat: ChatRequest) -> tuple[Match, bool]:
    """How the client's history matches `rows` (`TURN_ROW_FIELDS`), and whether it is exactly
    that conversation with nothing new before the message (no session can do better)."""
    match = match_history([Stored(seq, role, content) for seq, role, content, *_ in rows], chat.history)
    return match, bool(match.complete and match.matched and match.next_index == len(chat.history))


def _stored_messages(sessions: list[ChatSession]) -> dict:
    rows = (
        SessionMessage.objects.filter(session__in=sessions)
        .order_by("seq")
        .values_list("session_id", "seq", "role", "content")
    )
    by_session: dict = {s.pk: [] for s in sessions}
    for session_id, seq, role, content in rows:
        by_session[session_id].append(Stored(seq, role, content))
    return by_session


def _turn_rows(session: ChatSession) -> list[tuple]:
    """The session's messages as a turn reads them (`services.TURN_ROW_FIELDS`)."""
    return list(SessionMessage.objects.filter(session=session).order_by("seq").values_list(*services.TURN_ROW_FIELDS))


def _end_quietly(session: ChatSession, user, reason: str) -> None:
    """End a session the token moved away from.

    A session still streaming an answer (a concurrent call of the same tool) is left open;
    the guardian ends it at its last activity, so no time is counted twice either way.
    """
    if services.turn_is_live(session):
        return
    try:
        services.session_end(session_id=session.pk, user=user, reason=reason)
    except SessionError as exc:
        log.info("gateway: left session %s open: %s", session.pk, exc)


@dataclass
class Plan:
    """Where a call goes: `target` to continue (None: branch `source` or start anew), what to append.

    `known` is the target and its messages as read for the plan, when nothing is to be
    appended: the turn that follows reuses them (`services.KnownSession`).
    """

    live: list[ChatSession]
    target: ChatSession | None
    source: tuple[ChatSession, Match] | None
    tail: list[ChatMessage]
    known: services.KnownSession | None = None

    @property
    def read_only(self) -> bool:
        return self.target is not None and not self.tail


def _plan(token: ApiToken, chat: ChatRequest) -> Plan:
    """Read the token's recent sessions and decide where this call belongs (no writes).

    1. Continue the live session whose stored conversation the call extends (the longest
       such, then the most recent): the usual call, and also a return to a chat the tool
       left for a moment (a title or tag request in between).
    2. Otherwise branch from the recent session that shares the longest prefix (an edited
       or regenerated turn, or a conversation whose session ended).
    3. Otherwise it is a new conversation: a new session.
    """
    cutoff = _idle_cutoff()
    recent = ChatSession.objects.filter(api_token=token, user=token.user, domain_id=token.client_id)
    candidates = list(
        services.with_pending_stream(recent.select_related("domain")).order_by("-last_activity_at")[:CANDIDATE_SESSIONS]
    )
    live = [s for s in candidates if _is_live(s, cutoff)]
    usable = [s for s in candidates if _same(s.system_prompt, chat.system)]  # a new prompt needs a new session
    complete: tuple[ChatSession, Match] | None = None
    partial: tuple[ChatSession, Match] | None = None

    def consider(session: ChatSession, match: Match) -> None:
        nonlocal complete, partial
        # A session with no stored turn yet (another call's, its first message about to be
        # stored) matches anything: it is never joined, so unrelated conversations on one token
        # get sessions of their own and run side by side.
        if match.complete and match.matched and session in live:
            if complete is None or match.matched > complete[1].matched:
                complete = (session, match)
        elif match.matched and (partial is None or match.matched > partial[1].matched):
            partial = (session, match)

    # The usual call extends the most recent live conversation: read only its messages first.
    current = next((s for s in live if s in usable), None)
    if current is not None:
        rows = _turn_rows(current)
        match, exactly = _continued_exactly(rows, chat)
        if exactly:
            return Plan(live, current, None, [], services.KnownSession(current, rows))
        consider(current, match)
    others = [s for s in usable if s is not current]
    for session_id, turns in _stored_messages(others).items():
        consider(next(s for s in others if s.pk == session_id), match_history(turns, chat.history))
    if complete is not None:
        return Plan(live, complete[0], None, chat.history[complete[1].next_index :])
    tail = chat.history[partial[1].next_index :] if partial else chat.history
    return Plan(live, None, partial, tail)


class Remembered:
    """Per process: the session each token's last call was answered in, with its messages.

    A tool's next call usually continues that conversation: its history is exactly what the
    last call stored. Then the call needs neither the token's recent sessions nor their
    messages read to be placed (`_plan`): the turn claims the remembered session on
    condition that it is as remembered (`services.begin_turn(only_if_current=True)`), and a
    session that moved on meanwhile (another process's call, an end, a switch) is planned
    afresh. An entry is taken out while its call runs, so two calls never share one.
    """

    def __init__(self, size: int = REMEMBERED_TOKENS) -> None:
        self.size = size
        self._entries: OrderedDict[Any, services.KnownSession] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, token: ApiToken, known: services.KnownSession | None) -> None:
        if known is None:
            return
        with self._lock:
            self._entries[token.pk] = known
            self._entries.move_to_end(token.pk)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def recall(self, token: ApiToken, chat: ChatRequest) -> services.KnownSession | None:
        """The remembered session, if `chat` continues it exactly (taken out: see the class)."""
        with self._lock:
            known = self._entries.pop(token.pk, None)
        return known if known is not None and _continues(token, known, chat) else None

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


remembered = Remembered()


def _continues(token: ApiToken, known: services.KnownSession, chat: ChatRequest) -> bool:
    """The conditions `_plan` puts on the session it would choose first: this token's, live, the
    same system prompt and model, and a history that is exactly its conversation."""
    session = known.session
    return (
        (session.domain_id, session.user_id, session.api_token_id) == (token.client_id, token.user_id, token.pk)
        and _is_live(session, _idle_cutoff())
        and same_model(session.current_model, chat.model_name)
        and _same(session.system_prompt, chat.system)
        and _continued_exactly(known.rows, chat)[1]
    )


def is_first_message(chat: ChatRequest) -> bool:
    """A call with no earlier turns: no stored conversation can match it."""
    return not any(message["role"] != "system" for message in chat.history)


def last_conversation(token: ApiToken) -> services.KnownSession | None:
    """The token's most recently active session and its messages, as stored, in two prepared
    statements: what `remembered` holds in the process that answered the token's last call."""
    session = statements.select_instance(
        ChatSession,
        {"api_token": token.pk, "user": token.user_id, "domain": token.client_id},
        related="domain",
        order_by=("-last_activity_at",),
        also={"has_pending_stream": services.PENDING_STREAM},
    )
    if session is None:
        return None
    session.has_pending_stream = session.read_with["has_pending_stream"]  # type: ignore[attr-defined]
    rows = statements.select_rows(SessionMessage, services.TURN_ROW_FIELDS, {"session": session.pk}, order_by=("seq",))
    return services.KnownSession(session, rows)


def recollections(token: ApiToken, chat: ChatRequest) -> Iterator[services.KnownSession]:
    """Sessions the call may continue without being planned, in the order to try them.

    First the session this process remembers for the token; then, when it has none or the
    claim finds it stale (another process answered the token since: a restart, or a front
    that sent the call elsewhere), the token's last session as stored, two statements where
    `_plan` reads the token's recent sessions and messages through the ORM. Each must still
    be claimed with `only_if_current`; when neither holds, the call is planned.
    """
    known = remembered.recall(token, chat)
    if known is not None:
        yield known
    if is_first_message(chat):
        return
    stored = last_conversation(token)
    if stored is not None and _continues(token, stored, chat):
        yield stored


def _lock_token(token: ApiToken) -> None:
    """Inside a transaction: serialize the joins of one token, across processes."""
    if connection.vendor == "sqlite":
        # SQLite cannot upgrade a read lock while another writer waits ("database is locked"):
        # take the write lock first, with a no-op write.
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=F("last_used_at"))
    else:
        ApiToken.objects.select_for_update().filter(pk=token.pk).values_list("pk", flat=True).first()


def gateway_session_join(*, token: ApiToken, chat: ChatRequest) -> ChatSession:
    """Return the active session this call continues, storing the turns it has not seen yet.

    The new user message itself is not stored here: `session_chat` stores it and calls the
    provider. Raises GatewayError (400) for a token bound to no client, and the session
    services' errors (BadInput, NotFound...) for a client the consultant may no longer bill.
    """
    return gateway_join(token=token, chat=chat)[0]


def gateway_join(*, token: ApiToken, chat: ChatRequest) -> tuple[ChatSession, services.KnownSession | None]:
    """`gateway_session_join`, plus the session and messages as read when nothing was stored."""
    if token.client_id is None:
        raise GatewayError(400, TOKEN_WITHOUT_CLIENT, code="token_without_client")
    user = token.user
    if is_first_message(chat):
        # A first message: no stored conversation can match it (`_plan` would read the token's
        # sessions and their messages to find none), and no other call can join it. A session of its own.
        if not chat.history:
            return _known_empty(_new_session(token, chat, []))
        with transaction.atomic():
            return _new_session(token, chat, chat.history), None
    plan = _plan(token, chat)
    if plan.read_only and same_model(plan.target.current_model, chat.model_name):
        return plan.target, plan.known  # the usual call: nothing to store before the turn itself
    with transaction.atomic():
        _lock_token(token)
        plan = _plan(token, chat)  # again, under the lock: another call may have moved on
        target = plan.target
        if target is None and plan.source is not None:
            source, match = plan.source
            target = services.session_branch(session_id=source.pk, user=user, at_seq=match.last_seq)
            ChatSession.objects.filter(pk=target.pk).update(api_token=token)
            target.api_token = token
            if source in plan.live:
                # The client's conversation left this line (an edit, a regenerated answer): its clock stops now.
                _end_quietly(source, user, EndReason.USER)
        elif target is None:
            # A new conversation. Other live sessions are left as they are: a tool may come back
            # to them, and the guardian ends them at their last activity, so idle time is never billed.
            return _new_session(token, chat, plan.tail), None
        if plan.tail:
            services.session_append_history(session_id=target.pk, user=user, messages=plan.tail)
        if not same_model(target.current_model, chat.model_name):
            target = _switch(target, user, chat.model_name)
        return target, None


def _new_session(token: ApiToken, chat: ChatRequest, history: list[ChatMessage]) -> ChatSession:
    """Start the token's session for a new conversation, with the turns the client made up before it."""
    target = services.session_start(
        user=token.user,
        client=token.client,
        model=chat.model_name,
        name=token.name or "Gateway",
        system_prompt=chat.system,
        source=SessionSource.GATEWAY,
        api_token=token,
    )
    if history:
        services.session_append_history(session_id=target.pk, user=token.user, messages=history)
    return target


def _known_empty(session: ChatSession) -> tuple[ChatSession, services.KnownSession]:
    """A session just started, with nothing stored and no context stream waiting: the turn
    that follows claims it without reading it again (`services.begin_turn(known=...)`)."""
    session.has_pending_stream = False  # type: ignore[attr-defined]
    return session, services.KnownSession(session, [])


def _switch(session: ChatSession, user, model: str) -> ChatSession:
    services.session_switch(session_id=session.pk, user=user, model=model, reason="The client asked for this model.")
    session.refresh_from_db()
    return session
