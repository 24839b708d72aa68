"""A chat turn: claim, store the user message, stream from the provider, store the answer.

A chat turn is at most three write transactions: (1) claim the session and store the user
message, (2) only when the turn fails before streaming, release the claim, (3) store the
assistant message, its `LLMUsage`, the session totals and the hash chain together. Nothing is
written per token; a long answer is checkpointed (its text so far, one UPDATE on the session
row) at most every `CHECKPOINT_SECONDS`, so a process that dies loses at most that much of it
(`recovery.turn_settle` stores the checkpoint).

Every turn is registered in `_TURNS` from the moment it is claimed, so anything in this
process can stop it: an end takes the answer over and stores it before sealing (the caller
gets `SessionEnded` with `ENDED_DURING_ANSWER`); Stop and a server shutdown stop it and the
caller gets `Done` with the partial answer. Other processes ask through the shared cache
(`_stop_key`), which a turn polls when `REDIS_URL` is set. An answer is never stored after
its session ended or after its claim was settled by someone else: it is logged instead.
If the final store fails (the database is lost), the text goes to the log, the claim is
handed to the guardian (`ORPHANED_TURN`, with the whole text as its checkpoint) and the
caller gets `StoreFailed` (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import cache
from django.db import DatabaseError, transaction
from django.utils import timezone

from billing import budgets, pricing
from billing.catalogue import catalogue_at, catalogue_pinned, catalogue_version_column
from billing.models import LLMUsage, TokenSource, UsageStatus
from config import statements
from config.dbthread import db_sync_to_async
from providers import router, tokens
from providers.base import ErrorKind, ProviderError, StreamOptions, Usage
from providers.naming import ModelRef, parse_model
from sessions_app import integrity
from sessions_app.context import ContextPlan, build_context
from sessions_app.errors import (
    MESSAGE_EMPTY,
    MESSAGE_TOO_LARGE,
    SESSION_NOT_FOUND,
    BadInput,
    MessageTooLarge,
    NotFound,
    ProviderFailed,
    ProviderTimeout,
    ServerStopping,
    SessionEnded,
    StoreFailed,
)
from sessions_app.events import TURN_ROW_FIELDS, Done, KnownIsStale, KnownSession, Token
from sessions_app.models import (
    ORPHANED_TURN,
    ChatSession,
    ContextStream,
    MessageRole,
    MessageStatus,
    SessionMessage,
    SessionStatus,
    turn_stale_after,
)
from sessions_app.selectors import parse_session_id, session_get_for_user
from sessions_app.services.claims import (
    _claim_known,
    _claim_turn,
    _release_claim,
    with_pending_stream,
)
from sessions_app.services.inputs import (
    NOT_TEXT,
    _stream_options,
    quantize_money,
)
from sessions_app.services.recovery import CLAIM_CLEARED
from sessions_app.services.store import _chain_tail, _load, _store_linked

logger = logging.getLogger(__name__)

ENDED_DURING_ANSWER = "The session was ended while the answer streamed; the partial answer was stored."


STOPPED_BY_END = "Stopped: the session was ended while the answer streamed."


CANCELLED = "Cancelled: the app that asked disconnected before the answer was complete; what arrived is kept."


STOPPED_BY_USER = "Stopped: the consultant pressed Stop."


STOPPED_BY_SHUTDOWN = (
    "Cut off: the server was restarting and its grace period ran out; the text that had arrived is kept."
)


SERVER_STOPPING = "The server is restarting and takes no new answers; send again in a few seconds."


ANSWER_NOT_STORED = (
    "The answer could not be stored (the database is unreachable). Its text is kept in the server log, "
    "and it is restored as a partial answer once the database is back."
)

# Why a turn was asked to stop (a local request or the value of its cache key), and how its
# stored answer says so. An end's stop raises `SessionEnded`; the others end with `Done`.
STOP_END = "end"
STOP_USER = "user"
STOP_SHUTDOWN = "shutdown"
_STOP_TEXTS = {STOP_END: STOPPED_BY_END, STOP_USER: STOPPED_BY_USER, STOP_SHUTDOWN: STOPPED_BY_SHUTDOWN}

# At most one checkpoint (one UPDATE of the session row with the text so far) this often.
CHECKPOINT_SECONDS = 2.0


PROVIDER_FAILED = "{model} failed: {detail} Your message and the text that arrived are stored."


PROVIDER_TIMED_OUT = "{model} timed out: {detail} Your message and the text that arrived are stored."


@dataclass
class _TurnStart:
    session: ChatSession
    user_message: SessionMessage
    claim: datetime
    ref: ModelRef
    model_name: str
    model_id: str  # after aliases: what pricing looks up when the provider reports no id
    plan: ContextPlan
    stream: ContextStream | None
    carried_seqs: set[int]
    rows: list[tuple]  # the stored messages before this turn (`TURN_ROW_FIELDS`)
    turn: StreamingAnswer | None = None  # registered in `_TURNS` until the answer is stored
    # The session's `total_messages` once the user message is stored: while the count stays
    # so, that message is the chain's tail.
    messages: int = 0


@dataclass
class StreamingAnswer:
    """What one answer has gathered; registered from its claim on, shared with `_end` for a take-over."""

    start: _TurnStart
    loop: asyncio.AbstractEventLoop | None = None
    began: float = field(default_factory=time.monotonic)
    parts: list[str] = field(default_factory=list)
    usage: Usage | None = None
    error: ProviderError | None = None
    outcome: str = "streaming"  # ok | error | cancelled | stopped (by an end)
    stop_reason: str | None = None  # STOP_END | STOP_USER | STOP_SHUTDOWN, once asked to stop
    first_token_ms: int | None = None
    state: str = "streaming"  # streaming | finishing | taken | done
    lock: threading.Lock = field(default_factory=threading.Lock)
    finished: threading.Event = field(default_factory=threading.Event)
    on_stop: Callable[[], None] | None = None
    next_checkpoint: float = 0.0
    checkpoint: asyncio.Task | None = None
    prompt_estimate: int | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def request_stop(self, reason: str = STOP_END) -> None:
        """Ask the turn to stop (from any thread); the first reason given is the one stored."""
        with self.lock:
            if self.stop_reason is None:
                self.stop_reason = reason
            on_stop, loop = self.on_stop, self.loop
        if on_stop is not None and loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                loop.call_soon_threadsafe(on_stop)

    def take_over(self) -> bool:
        """Claim the right to store this answer (for `session_end`) while it still streams.

        False once the provider's stream has ended (the turn is about to store its own answer,
        complete or failed, and the end waits for that) or the answer is being stored.
        """
        with self.lock:
            if self.state == "streaming" and self.outcome == "streaming":
                self.state = "taken"
                self.outcome = "stopped"
                return True
        return False

    def conclude(self, outcome: str) -> None:
        """Set how the answer ended, unless that is already settled (under the lock: an end races it)."""
        with self.lock:
            if self.outcome == "streaming":
                self.outcome = outcome

    def begin_finishing(self) -> bool:
        with self.lock:
            if self.state != "streaming":
                return False
            self.state = "finishing"
            return True

    def estimated_prompt(self) -> int:
        if self.prompt_estimate is None:
            self.prompt_estimate = tokens.estimate_messages(self.start.plan.messages)
        return self.prompt_estimate


# In-process registry of streaming answers, so an end in this process can stop and store them.
_TURNS: dict[str, StreamingAnswer] = {}


_TURNS_LOCK = threading.Lock()


_END = object()


_STOPPED = object()


def _stop_key(session_id, claim: datetime) -> str:
    return f"sessions:stop:{session_id}:{claim.timestamp():.6f}"


def _register(turn: StreamingAnswer) -> None:
    with _TURNS_LOCK:
        _TURNS[str(turn.start.session.pk)] = turn


def _unregister(turn: StreamingAnswer) -> None:
    with _TURNS_LOCK:
        key = str(turn.start.session.pk)
        if _TURNS.get(key) is turn:
            del _TURNS[key]


def local_turn(session_id) -> StreamingAnswer | None:
    """The answer streaming in this process for the session, if any (claimed, not yet stored)."""
    with _TURNS_LOCK:
        return _TURNS.get(str(session_id))


def local_turns() -> list[StreamingAnswer]:
    with _TURNS_LOCK:
        return list(_TURNS.values())


# While the process shuts down (SIGTERM), no turn begins: `begin_turn` raises `ServerStopping`.
_admission = {"open": True}


def turns_stop_admission() -> None:
    _admission["open"] = False


def turns_resume_admission() -> None:
    _admission["open"] = True


def turn_stop_request(*, session_id, claim: datetime, reason: str) -> bool:
    """Ask the answer holding `claim` to stop, wherever it streams; True if it streams here.

    Here: at once. Elsewhere: through the shared cache, which a turn polls every half second
    when `REDIS_URL` is set (without Redis there is only this process to ask).
    """
    turn = local_turn(session_id)
    if turn is not None and turn.start.claim == claim:
        turn.request_stop(reason)
        return True
    cache.set(_stop_key(session_id, claim), reason, timeout=int(turn_stale_after().total_seconds()) + 60)
    return False


def session_stop(*, session_id, user) -> bool:
    """Stop the answer streaming in the session (Stop, from any tab or process); False if none is.

    The answer's own caller stores what had arrived (`partial`) and ends with `Done`.
    """
    session = session_get_for_user(session_id=session_id, user=user)
    if session.turn_started_at is None:
        return False
    return turn_stop_request(session_id=session.pk, claim=session.turn_started_at, reason=STOP_USER) or True


@budgets.alerts_on_refusal
@catalogue_pinned()
def begin_turn(
    *, session_id, user, message, known: KnownSession | None = None, only_if_current: bool = False
) -> _TurnStart:
    """Transaction 1: claim the session and store the user message before any provider call.

    The hot path of every turn, so it reads as little as it can: the claim, the session, its
    messages (the context and the chain's tail in one read), the insert, the model's alias and,
    only after a switch, the pending context stream. With `known` (the session and messages
    the caller has just read) the claim alone proves them current and neither is read again;
    when it does not, the session is read afresh, or, with `only_if_current`, `KnownIsStale`
    is raised with nothing written (the caller chose the session by what it knew).

    Pass the result to `session_chat(start=...)` at once: until it ends, the session is claimed.
    """
    if not _admission["open"]:
        raise ServerStopping(SERVER_STOPPING)
    if not isinstance(message, str):
        raise BadInput(NOT_TEXT.format(field="message"))
    message = message.replace("\x00", "")
    if not message.strip():
        raise BadInput(MESSAGE_EMPTY)
    limit = settings.CHAT_MAX_MESSAGE_CHARS
    if len(message) > limit:
        raise MessageTooLarge(MESSAGE_TOO_LARGE.format(size=len(message), limit=limit))
    pk = parse_session_id(session_id)
    if user is None or not getattr(user, "is_authenticated", False):
        raise NotFound(SESSION_NOT_FOUND)
    now = timezone.now()
    with transaction.atomic():
        if known is not None and _claim_known(pk, user, now, known):
            session, rows = known.session, known.rows
        elif only_if_current:
            raise KnownIsStale(pk)
        else:
            _claim_turn(pk, user, now)
            session = with_pending_stream(ChatSession.objects.select_related("domain", "brand")).get(pk=pk)
            # No client ids: a turn's plan never needs them (a switch's snapshot does, and reads
            # its own), and converting one per stored message costs a long session dearly.
            rows = list(SessionMessage.objects.filter(session_id=pk).order_by("seq").values_list(*TURN_ROW_FIELDS))
        # Paid model, client over budget: refused before anything is stored (the claim rolls back).
        budgets.budget_check_turn(client_id=session.domain_id, model=session.current_model, now=now)
        ref = parse_model(session.current_model)
        seq, previous = (rows[-1][0] + 1, rows[-1][5] or integrity.GENESIS) if rows else (1, integrity.GENESIS)
        user_message = SessionMessage(
            session=session,
            seq=seq,
            role=MessageRole.USER,
            content=message,
            timestamp=now,
            model=session.current_model,
            provider=ref.provider,
            domain=session.domain,
            cost_usd=Decimal("0"),
            status=MessageStatus.COMPLETE,
            author=user,  # in a shared session, who typed it
        )
        _store_linked(user_message, previous)
    try:
        history = [(seq_, role, content, model, None, status) for seq_, role, content, model, status, _hash in rows]
        history.append((seq, MessageRole.USER, message, session.current_model, None, MessageStatus.COMPLETE))
        plan = build_context(session=session, target=ref, rows=history)
        model_id = router.resolve_alias(ref).model
        stream = None
        if session.has_pending_stream:
            stream = (
                ContextStream.objects.filter(
                    session=session, settled_at__isnull=True, target_model=session.current_model
                )
                .only("stream_id", "context_snapshot")
                .order_by("-streamed_at")
                .first()
            )
        carried = {entry["seq"] for entry in (stream.context_snapshot if stream else []) if entry.get("seq")}
    except BaseException:
        _release_claim(session.pk, now)
        raise
    start = _TurnStart(
        session=session,
        user_message=user_message,
        claim=now,
        ref=ref,
        model_name=session.current_model,
        model_id=model_id,
        plan=plan,
        stream=stream,
        carried_seqs=carried,
        rows=rows,
        messages=session.total_messages,
    )
    # Registered before anything else can run on this thread, so an end in this process finds
    # the turn even before its first token, and stops it (DESIGN.md: an end and a starting
    # turn are ordered).
    start.turn = StreamingAnswer(start=start)
    _register(start.turn)
    return start


def _turn_usage(turn: StreamingAnswer) -> tuple[int, int, str, str]:
    """Token counts to bill: the provider's, else an estimate (marked so), else none at all."""
    usage = turn.usage or (turn.error.usage if turn.error is not None else None)
    if usage is not None and (usage.prompt_tokens or usage.completion_tokens or turn.outcome == "ok"):
        return usage.prompt_tokens, usage.completion_tokens, usage.source, usage.provider_model
    text = turn.text
    if turn.outcome == "ok" or text:
        # No usage reported but text arrived: the provider did the work; estimate it.
        prompt = tokens.estimate_messages(turn.start.plan.messages)
        return prompt, tokens.estimate_tokens(text), TokenSource.ESTIMATED, ""
    # Failed before any output: nothing was generated, nothing is billed.
    return 0, 0, TokenSource.ESTIMATED, ""


def _carried_tokens(turn: StreamingAnswer, prompt_tokens: int) -> int:
    """The part of the reported prompt that is the history carried by the pending switch."""
    start = turn.start
    if start.stream is None or not prompt_tokens:
        return 0
    carried_estimate = sum(entry.tokens for entry in start.plan.entries if entry.seq in start.carried_seqs)
    total_estimate = start.plan.estimated_tokens
    if not total_estimate or not carried_estimate:
        return 0
    return min(prompt_tokens, round(prompt_tokens * carried_estimate / total_estimate))


def _store_answer(turn: StreamingAnswer, *, now: datetime | None = None) -> SessionMessage | None:
    """Store the assistant message, usage, stream settlement, totals and chain link.

    The caller holds a transaction. None, with the text logged, when the session no longer
    holds this turn's claim (ended, or the claim settled by someone who took it for dead):
    an answer is never stored after its session's end, nor twice.
    """
    start = turn.start
    now = now or timezone.now()
    session_id = start.session.pk
    fields = ("status", "turn_started_at", "total_messages", "total_tokens", "estimated_cost_usd", "last_activity_at")
    state = statements.select_row(
        ChatSession,
        (*fields, "invoice"),
        {"session_id": session_id},
        for_update=True,
        also={"catalogue": catalogue_version_column()},  # the prices' version, in the same read
    )
    if state is None:
        raise ChatSession.DoesNotExist(session_id)
    with catalogue_at(state.pop("catalogue")):
        return _store_locked(turn, state, now)


def _store_locked(turn: StreamingAnswer, state: dict[str, Any], now: datetime) -> SessionMessage | None:
    """`_store_answer` once the session row is locked and read (`state`)."""
    start = turn.start
    session_id = start.session.pk
    if state["status"] != SessionStatus.ACTIVE or state["turn_started_at"] != start.claim:
        logger.warning(
            "answer in session %s (claimed %s) not stored: the session %s; its %d characters were: %s",
            session_id,
            start.claim.isoformat(),
            "ended meanwhile" if state["status"] != SessionStatus.ACTIVE else "claim was settled meanwhile",
            len(turn.text),
            turn.text,
        )
        return None
    prompt, completion, source, provider_model = _turn_usage(turn)
    model_id = provider_model or start.model_id
    cost = _call_cost(start, model_id, prompt, completion, now)
    status, usage_status, error_text = _outcome_fields(turn)

    session = start.session
    # The message's lock check (sessions_app/locks.py) reads the invoice from the session it is given.
    session.invoice_id = state.pop("invoice")
    if state["total_messages"] == start.messages:
        # Every stored message counts (invariant 1): none came after the user message.
        seq, previous = start.user_message.seq + 1, start.user_message.hash
    else:
        seq, previous = _chain_tail(session_id)
    message = SessionMessage(
        session=session,
        seq=seq,
        role=MessageRole.ASSISTANT,
        content=turn.text,
        timestamp=now,
        model=start.model_name,
        provider=start.ref.provider,
        domain=session.domain,
        prompt_tokens=prompt,
        completion_tokens=completion,
        tokens=prompt + completion,
        token_source=source,
        cost_usd=cost,
        status=status,
        error_text=error_text[:2000],
        context_omitted=start.plan.omitted_count,
    )
    _store_linked(message, previous)
    carried = _settle_stream(turn, model_id, prompt, cost, now)
    usage = LLMUsage(
        user_id=start.user_message.author_id or session.user_id,  # who asked (shared sessions)
        session_id=session_id,
        message=message,
        client_id=session.domain_id,
        provider=start.ref.provider,
        model=start.ref.model,
        provider_model=provider_model,
        prompt_tokens=prompt,
        completion_tokens=completion,
        token_source=source,
        cost=cost,
        carried_tokens=carried,
        time_to_first_token_ms=turn.first_token_ms,
        duration_ms=max(0, int((time.monotonic() - turn.began) * 1000)),
        status=usage_status,
        error_text=error_text[:2000],
        created_at=now,
    )
    statements.insert(usage)
    _add_to_totals(session, state, tokens=prompt + completion, cost=cost, now=now)
    return message


def _call_cost(start: _TurnStart, model_id: str, prompt: int, completion: int, now: datetime) -> Decimal | None:
    """What the call cost at the price in force (None: no known price; zero when nothing was used)."""
    if not (prompt or completion):
        return Decimal("0")
    return quantize_money(
        pricing.cost_of(
            provider=start.ref.provider, model_id=model_id, prompt_tokens=prompt, completion_tokens=completion, at=now
        )
    )


def _outcome_fields(turn: StreamingAnswer) -> tuple[str, str, str]:
    """The message status, the usage status and the error text the answer's outcome stores."""
    if turn.outcome == "ok":
        return MessageStatus.COMPLETE, UsageStatus.OK, ""
    status = MessageStatus.PARTIAL if turn.text else MessageStatus.ERROR
    if turn.outcome == "error":
        error = turn.error
        return status, UsageStatus.ERROR, f"{error.kind}: {error.message}" if error is not None else "error"
    if turn.outcome == "stopped":
        return status, UsageStatus.CANCELLED, STOPPED_BY_END
    return status, UsageStatus.CANCELLED, _STOP_TEXTS.get(turn.stop_reason or "", CANCELLED)


def _settle_stream(turn: StreamingAnswer, model_id: str, prompt: int, cost: Decimal | None, now: datetime) -> int:
    """Settle the context a switch carried from this first call's prompt; the tokens it carried."""
    start = turn.start
    if start.stream is None or not prompt:
        return 0
    carried = _carried_tokens(turn, prompt)
    stream_cost = quantize_money(
        pricing.input_cost(provider=start.ref.provider, model_id=model_id, tokens=carried, at=now)
    )
    if stream_cost is not None and cost is not None:
        stream_cost = min(stream_cost, cost)  # a breakdown of the call's cost, never more
    ContextStream.objects.filter(pk=start.stream.pk, settled_at__isnull=True).update(
        total_tokens=carried, cost_usd=stream_cost, settled_at=now
    )
    return carried


def _add_to_totals(
    session: ChatSession, state: dict[str, Any], *, tokens: int, cost: Decimal | None, now: datetime
) -> None:
    """Add the answer to the session's totals and release the claim, in one UPDATE."""
    update = {
        "total_messages": state["total_messages"] + 1,
        "total_tokens": state["total_tokens"] + tokens,
        "estimated_cost_usd": quantize_money(Decimal(state["estimated_cost_usd"]) + (cost or Decimal("0"))),
        "last_activity_at": max(now, state["last_activity_at"]),
    }
    # A message could be added, so no issued invoice covers the session: a plain UPDATE under
    # the row lock (no lock-check read) is safe. The claim and its checkpoint go with it.
    statements.update(ChatSession, {"session_id": session.pk}, {**update, **CLAIM_CLEARED})
    for name, value in (*state.items(), *update.items(), *CLAIM_CLEARED.items()):
        setattr(session, name, value)


def _finish_turn(turn: StreamingAnswer) -> tuple[SessionMessage, ChatSession] | None:
    """The last write transaction of a turn; None when it is not this turn's to store.

    That is when `session_end` took the answer over, or the session no longer holds the claim.
    Raises `StoreFailed` when the database fails: see `_give_up`.
    """
    if not turn.begin_finishing():
        return None
    try:
        with transaction.atomic():
            message = _store_answer(turn)
        if message is None:
            return None
        session = turn.start.session
        # The session's totals are current (set under the row lock); an ended one is re-read whole.
        return message, (_load(session.pk) if session.status == SessionStatus.ENDED else session)
    except DatabaseError:
        _give_up(turn)
        raise StoreFailed(ANSWER_NOT_STORED) from None
    finally:
        with turn.lock:
            turn.state = "done"
        turn.finished.set()


def _give_up(turn: StreamingAnswer) -> None:
    """The final store failed: log the text, and hand the claim to the guardian with all of it.

    The claim is marked `ORPHANED_TURN` (no longer this process's: the next chat, end or
    guardian pass settles it at once) and its checkpoint becomes the whole text. When the
    database is still unreachable for that too, the claim stays as it was and is settled once
    it goes stale; the text is in the log either way.
    """
    start = turn.start
    logger.error(
        "could not store the answer in session %s (claimed %s, %s, %d characters); its text: %s",
        start.session.pk,
        start.claim.isoformat(),
        turn.outcome,
        len(turn.text),
        turn.text,
        exc_info=True,
    )
    try:
        ChatSession.objects.filter(pk=start.session.pk, turn_started_at=start.claim).update(
            turn_owner=ORPHANED_TURN,
            turn_partial=turn.text,
            turn_checkpoint_at=timezone.now(),
            turn_prompt_tokens=turn.estimated_prompt(),
        )
    except DatabaseError:
        logger.warning("session %s: the claim stays until it is stale (the database is unreachable)", start.session.pk)


def _write_checkpoint(turn: StreamingAnswer, text: str) -> None:
    """One UPDATE: the answer so far on the session row, while this turn still holds the claim."""
    start = turn.start
    ChatSession.objects.filter(pk=start.session.pk, turn_started_at=start.claim).update(
        turn_partial=text, turn_checkpoint_at=timezone.now(), turn_prompt_tokens=turn.estimated_prompt()
    )


async def _checkpoint(turn: StreamingAnswer) -> None:
    try:
        await db_sync_to_async(_write_checkpoint)(turn, turn.text)
    except DatabaseError:
        # The final store will tell; a missed checkpoint only widens what a crash could lose.
        logger.warning("checkpoint of the answer in session %s failed", turn.start.session.pk, exc_info=True)


async def _pump(stream: AsyncIterator, queue: asyncio.Queue) -> None:
    """Read the provider stream onto the queue; closing it closes the upstream connection."""
    try:
        async for item in stream:
            queue.put_nowait(item)
        queue.put_nowait(_END)
    except ProviderError as exc:
        queue.put_nowait(exc)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # an adapter bug must still leave the partial answer stored
        logger.exception("provider stream raised an unexpected error")
        queue.put_nowait(ProviderError(ErrorKind.SERVER, f"unexpected error: {exc}"))
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


async def _watch_stop(key: str, turn: StreamingAnswer) -> None:
    """Across processes: poll the shared cache for a stop asked by another worker (its reason)."""
    while True:
        await asyncio.sleep(0.5)
        try:
            reason = await sync_to_async(cache.get, thread_sensitive=False)(key)
        except Exception:  # the cache is down: a stop from elsewhere waits for it to come back
            logger.debug("stop watch: the cache did not answer", exc_info=True)
            continue
        if reason:
            turn.request_stop(reason if isinstance(reason, str) else STOP_END)
            return


async def session_chat(
    *,
    session_id,
    user,
    message,
    options=None,
    start: _TurnStart | None = None,
    known: KnownSession | None = None,
    stream: bool = True,
) -> AsyncIterator[Token | Done]:
    """One chat turn: yield `Token`s as the provider streams, then `Done` with the stored answer.

    `start` is a turn the caller has begun itself (`begin_turn`, in the same trip to the
    database thread as its own reads); by default the turn begins here, with `known` (the
    previous turn's `Done.known`, say) if the caller has it.

    With `stream=False` (a caller that relays no deltas) the provider is asked for the whole
    answer at once; it arrives as one `Token`, stored and billed exactly as a streamed one.

    Closing the generator (the caller went away) cancels the answer and stores what arrived.
    A Stop (`session_stop`) or a shutdown ends it early with `Done` and the partial answer.
    Raises `ProviderFailed`/`ProviderTimeout` after storing a failed answer, `SessionEnded`
    when the session was ended mid-answer (the partial answer is stored), and `StoreFailed`
    when the answer could not be stored.

    The stages: begin (claim, store the user message), open the provider, relay what it
    sends, wind down (store the answer whatever happened), then answer or raise.
    """
    start, opts = await _begin(
        session_id=session_id, user=user, message=message, options=options, start=start, known=known
    )
    provider_stream = await _open_provider(start, opts, stream=stream)
    turn = start.turn
    assert turn is not None  # begin_turn registers it
    queue: asyncio.Queue = asyncio.Queue()
    pump = asyncio.create_task(_pump(provider_stream, queue))
    watcher = _arm_stop(start, turn, pump, queue)
    stored: tuple[tuple[SessionMessage, ChatSession] | None, StoreFailed | None] = (None, None)
    try:
        while True:
            text = _take(turn, await queue.get())
            if text is None:
                break
            if text:
                yield Token(text)
    finally:
        stored = await _wind_down(turn, pump, watcher)
    yield _answer(start, turn, *stored)


async def _begin(
    *, session_id: Any, user: Any, message: Any, options: Any, start: _TurnStart | None, known: KnownSession | None
) -> tuple[_TurnStart, StreamOptions]:
    """The turn begun (claimed, the user message stored) and its options; bad options store nothing."""
    try:
        opts = _stream_options(options)
    except BaseException:
        if start is not None:
            await db_sync_to_async(_abandon_start)(start)
        raise
    if start is None:
        start = await db_sync_to_async(begin_turn)(session_id=session_id, user=user, message=message, known=known)
    return start, opts


async def _open_provider(start: _TurnStart, opts: StreamOptions, *, stream: bool = True) -> AsyncIterator:
    """The provider's stream for the turn; a begun turn that cannot stream is abandoned."""
    try:
        if start.ref.provider == "ollama" and opts.num_ctx is None:
            opts.num_ctx = start.plan.window
        resolved = ModelRef(start.ref.provider, start.model_id)
        return router.stream_chat(resolved, start.plan.messages, opts, resolved=True, stream=stream)
    except BaseException:
        await db_sync_to_async(_abandon_start)(start)
        raise


def _arm_stop(
    start: _TurnStart, turn: StreamingAnswer, pump: asyncio.Task, queue: asyncio.Queue
) -> asyncio.Task | None:
    """Let a Stop or an End (in this process, or through Redis from another) cut the relay short."""

    def stop() -> None:
        turn.conclude("stopped" if turn.stop_reason == STOP_END else "cancelled")
        pump.cancel()
        queue.put_nowait(_STOPPED)

    with turn.lock:
        turn.loop, turn.on_stop = asyncio.get_running_loop(), stop
        asked = turn.stop_reason is not None or turn.state == "taken"
    if asked:
        stop()  # stopped (or taken over by an end) before it began streaming
    turn.next_checkpoint = turn.began + CHECKPOINT_SECONDS
    if not getattr(settings, "REDIS_URL", ""):
        return None
    return asyncio.create_task(_watch_stop(_stop_key(start.session.pk, start.claim), turn))


def _take(turn: StreamingAnswer, item: object) -> str | None:
    """What the relay does with one item from the provider: text to pass on, "" for none, None to stop."""
    if item is _STOPPED:
        return None
    if item is _END:
        turn.conclude("ok")
        return None
    if isinstance(item, ProviderError):
        turn.error = item
        turn.conclude("error")
        return None
    if isinstance(item, Usage):
        turn.usage = item
        return ""
    if not item:
        return ""
    text = str(item)
    with turn.lock:
        if turn.state == "taken":
            return None  # `session_end` stores what was yielded so far
        turn.parts.append(text)
    now = time.monotonic()
    if turn.first_token_ms is None:
        turn.first_token_ms = int((now - turn.began) * 1000)
    if now >= turn.next_checkpoint and (turn.checkpoint is None or turn.checkpoint.done()):
        turn.next_checkpoint = now + CHECKPOINT_SECONDS
        turn.checkpoint = asyncio.create_task(_checkpoint(turn))
    return text


async def _wind_down(
    turn: StreamingAnswer, pump: asyncio.Task, watcher: asyncio.Task | None
) -> tuple[tuple[SessionMessage, ChatSession] | None, StoreFailed | None]:
    """Stop the pump and the watcher, then store the answer, whatever ended the relay."""
    turn.conclude("cancelled")  # if still streaming: the caller closed us or our task was cancelled
    if watcher is not None:
        watcher.cancel()
    if not pump.done():
        pump.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await pump
    if turn.checkpoint is not None:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await turn.checkpoint
    # Store even when cancelled: shield the write from a second cancellation. The turn
    # stays registered until it is stored, so an end meanwhile takes it over rather than
    # waiting for a claim that only this process's database thread can release.
    try:
        return await asyncio.shield(asyncio.ensure_future(db_sync_to_async(_finish_turn)(turn))), None
    except StoreFailed as exc:
        return None, exc  # raised by `_answer`, unless the caller is gone (then the log tells)
    finally:
        _unregister(turn)


def _answer(
    start: _TurnStart,
    turn: StreamingAnswer,
    result: tuple[SessionMessage, ChatSession] | None,
    store_failed: StoreFailed | None,
) -> Done:
    """`Done` with the stored answer, or the error that says why there is none to go on with."""
    if store_failed is not None:
        raise store_failed
    if result is None or turn.outcome == "stopped":
        raise SessionEnded(ENDED_DURING_ANSWER)
    stored, session = result
    if turn.outcome == "error":
        error = turn.error
        detail = error.message if error is not None else "unknown error"
        if error is not None and error.kind == ErrorKind.TIMEOUT:
            raise ProviderTimeout(
                PROVIDER_TIMED_OUT.format(model=start.model_name, detail=detail),
                kind=str(error.kind),
                message_id=stored.message_id,
            )
        raise ProviderFailed(
            PROVIDER_FAILED.format(model=start.model_name, detail=detail),
            kind=str(error.kind) if error is not None else "server",
            message_id=stored.message_id,
        )
    return Done(message=stored, session=session, known=_known_after(start, stored, session))


def _abandon_start(start: _TurnStart) -> None:
    """A begun turn that will not stream (bad options, no provider): unregister it, release the claim."""
    if start.turn is not None:
        _unregister(start.turn)
    _release_claim(start.session.pk, start.claim)


# A session's messages a caller may keep between turns (`Done.known`): beyond this much text,
# reading them again costs less than holding them.
KNOWN_HISTORY_MAX_CHARS = 200_000


def _turn_row(message: SessionMessage) -> tuple:
    return tuple(getattr(message, name) for name in TURN_ROW_FIELDS)


def _known_after(start: _TurnStart, answer: SessionMessage, session: ChatSession) -> KnownSession | None:
    """The session and its messages after this turn, for the caller's next one (None: read them again)."""
    rows = [*start.rows, _turn_row(start.user_message), _turn_row(answer)]
    if session.status != SessionStatus.ACTIVE or len(rows) != session.total_messages:
        return None  # ended, or a message arrived from elsewhere during the turn
    if sum(len(row[2]) for row in rows) > KNOWN_HISTORY_MAX_CHARS:
        return None
    return KnownSession(session, rows)
