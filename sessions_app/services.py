"""Writes: start, chat, switch, end, branch and import into work sessions (DESIGN.md "Flows").

Every service takes keyword arguments only and raises the `sessions_app.errors` classes.

A chat turn is at most three write transactions: (1) claim the session and store the user
message, (2) only when the turn fails before streaming, release the claim, (3) store the
assistant message, its `LLMUsage`, the session totals and the hash chain together. Nothing is
written per token.

One answer streams per session at a time. The claim is `ChatSession.turn_started_at`, taken
with a conditional UPDATE (a row lock on PostgreSQL); a second chat gets `SessionBusy` (409).
A claim older than the provider timeouts (`turn_stale_after()`) belongs to a crashed worker
and is taken over.

- A switch during an answer: `session_switch` raises `SessionBusy` with `SWITCH_BUSY`;
  `asession_switch` (used by the REST API) waits for the answer to finish, then switches,
  which is what a consultant expects when they pick another model mid-answer.
- An end during an answer stops it: the partial answer is stored (status `partial`, usage
  `cancelled`) before the session is sealed, and the chat caller gets `SessionEnded` with
  `ENDED_DURING_ANSWER`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import cache
from django.db import transaction
from django.db.models import Exists, F, OuterRef, Q
from django.utils import timezone

from billing import pricing
from billing.models import Brand, ClientDomain, LLMUsage, TokenSource, UsageStatus
from providers import router, tokens
from providers.base import ChatMessage, ErrorKind, ProviderError, StreamOptions, Usage
from providers.naming import ModelRef, parse_model
from providers.router import db_sync_to_async
from sessions_app import integrity
from sessions_app.context import ContextPlan, build_context
from sessions_app.errors import (
    CLIENT_NOT_ALLOWED,
    MESSAGE_EMPTY,
    MESSAGE_TOO_LARGE,
    SESSION_BUSY,
    SESSION_ENDED,
    SESSION_LOCKED,
    SESSION_NOT_FOUND,
    UNKNOWN_CLIENT,
    UNKNOWN_MODEL,
    BadInput,
    MessageTooLarge,
    NotFound,
    ProviderFailed,
    ProviderTimeout,
    SessionBusy,
    SessionEnded,
    SessionLocked,
)
from sessions_app.events import Done, Token
from sessions_app.models import (
    ChatSession,
    ContextStream,
    EndReason,
    MessageRole,
    MessageStatus,
    SessionMessage,
    SessionSegment,
    SessionSource,
    SessionStatus,
    StreamReason,
)
from sessions_app.selectors import parse_session_id, session_get_for_user, session_summary

logger = logging.getLogger(__name__)

CLIENT_REQUIRED = "A client is required (its slug, for example 'acme')."
MODEL_REQUIRED = "A model is required, for example 'ollama:llama3.2' or 'openai:gpt-4o'."
NAME_TOO_LONG = "The name is {size} characters; the limit is {limit}."
SYSTEM_PROMPT_TOO_LARGE = "The system prompt is {size} characters; the limit is {limit}."
NOT_TEXT = "{field} must be a string."
UNKNOWN_BRAND = "Unknown brand {brand!r} for client {slug!r}."
TOKEN_CLIENT = "This API token may only bill client {slug!r}."
UNKNOWN_SOURCE = "Unknown session source {source!r}."
UNKNOWN_END_REASON = "Unknown end reason {reason!r}; use one of {choices}."
SWITCH_NOTHING = "Name a client and/or a model to switch to."
SWITCH_SAME = "The session is already on client {slug!r} with model {model!r}."
SWITCH_BUSY = "An answer is streaming in this session; the switch applies once it finishes (or stop it first)."
REASON_TOO_LONG = "The reason is {size} characters; the limit is {limit}."
ENDED_DURING_ANSWER = "The session was ended while the answer streamed; the partial answer was stored."
STOPPED_BY_END = "Stopped: the session was ended while the answer streamed."
CANCELLED = "Cancelled: the caller stopped reading the answer."
PROVIDER_FAILED = "{model} failed: {detail} Your message and the text that arrived are stored."
PROVIDER_TIMED_OUT = "{model} timed out: {detail} Your message and the text that arrived are stored."
BRANCH_RANGE = "at_seq must be a whole number from 1 to {last}."
BRANCH_EMPTY = "This session has no messages to branch from."
HISTORY_SHAPE = (
    "messages must be a list of {{'role': 'system'|'user'|'assistant', 'content': str}}; item {index} is not."
)
HISTORY_EMPTY = "messages is empty."

NAME_LIMIT = 200
REASON_LIMIT = 500
HISTORY_LIMIT_FACTOR = 8  # imported answers may be longer than what a consultant may type
TURN_GRACE_SECONDS = 30
# A worker streaming an answer polls for a stop request every half second; if it has not let go
# of the session after this long it is gone, and the end goes ahead (its answer, should it still
# arrive, is stored and the seal renewed).
REMOTE_STOP_WAIT_SECONDS = 10.0
SIX_PLACES = Decimal("0.000001")


# --- small helpers ------------------------------------------------------------------------


def quantize_money(value: Decimal | None) -> Decimal | None:
    """Costs are stored to six decimals, rounded half-up; the hash chain sees the stored value."""
    if value is None:
        return None
    return Decimal(value).quantize(SIX_PLACES, rounding=ROUND_HALF_UP)


def turn_stale_after() -> timedelta:
    """How old a turn claim must be before it is considered abandoned (a crashed worker)."""
    first = settings.PROVIDER_CONNECT_TIMEOUT + settings.PROVIDER_FIRST_TOKEN_TIMEOUT
    return timedelta(
        seconds=first * (settings.PROVIDER_MAX_RETRIES + 1) + settings.PROVIDER_IDLE_TIMEOUT + TURN_GRACE_SECONDS
    )


def _no_live_turn(now: datetime) -> Q:
    return Q(turn_started_at__isnull=True) | Q(turn_started_at__lt=now - turn_stale_after())


def turn_is_live(session: ChatSession, now: datetime | None = None) -> bool:
    now = now or timezone.now()
    return session.turn_started_at is not None and session.turn_started_at >= now - turn_stale_after()


def _require_text(value, field_name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadInput(NOT_TEXT.format(field=field_name))
    # PostgreSQL text cannot hold NUL; it is never meaningful in a chat.
    return value.replace("\x00", "")


def _has_control_characters(text: str) -> bool:
    return any(ord(ch) < 32 or ord(ch) == 127 for ch in text)


def _resolve_client(client, user) -> ClientDomain:
    if isinstance(client, ClientDomain):
        domain = client
        slug = client.slug
    else:
        if client is not None and not isinstance(client, str):
            raise BadInput(NOT_TEXT.format(field="client"))
        slug = (client or "").strip()
        if not slug:
            raise BadInput(CLIENT_REQUIRED)
        if _has_control_characters(slug) or len(slug) > 100:
            raise BadInput(UNKNOWN_CLIENT.format(slug=slug[:100]))
        domain = ClientDomain.objects.filter(slug=slug).first()
    if domain is None or not domain.is_active:
        raise BadInput(UNKNOWN_CLIENT.format(slug=slug))
    if not ClientDomain.objects.open_to(user).filter(pk=domain.pk).exists():
        raise BadInput(CLIENT_NOT_ALLOWED.format(slug=domain.slug))
    return domain


def _resolve_model(model) -> str:
    """Validate a model name; return the name the session stores (`provider:model`)."""
    if isinstance(model, ModelRef):
        model = model.name
    if model is not None and not isinstance(model, str):
        raise BadInput(NOT_TEXT.format(field="model"))
    name = (model or "").strip()
    if not name:
        raise BadInput(MODEL_REQUIRED)
    if len(name) > 200:
        raise BadInput(UNKNOWN_MODEL.format(model=name[:60] + "…") + " The name is too long.")
    if _has_control_characters(name):
        raise BadInput(UNKNOWN_MODEL.format(model=name) + " Model names cannot contain control characters.")
    try:
        router.validate_model(name)
        ref = parse_model(name)
    except ValueError as exc:
        raise BadInput(f"{UNKNOWN_MODEL.format(model=name)} {exc}".strip()) from None
    return ref.name


def _resolve_brand(brand, domain: ClientDomain) -> Brand | None:
    if brand is None or brand == "":
        return Brand.objects.filter(client=domain, is_default=True).first()
    if isinstance(brand, Brand):
        if brand.client_id != domain.pk:
            raise BadInput(UNKNOWN_BRAND.format(brand=str(brand.pk), slug=domain.slug))
        return brand
    try:
        pk = uuid.UUID(str(brand))
    except (TypeError, ValueError):
        raise BadInput(UNKNOWN_BRAND.format(brand=str(brand)[:60], slug=domain.slug)) from None
    found = Brand.objects.filter(pk=pk, client=domain).first()
    if found is None:
        raise BadInput(UNKNOWN_BRAND.format(brand=str(brand), slug=domain.slug))
    return found


def _check_writable(session: ChatSession) -> None:
    if session.status != SessionStatus.ACTIVE:
        raise SessionEnded(SESSION_ENDED)
    if session.is_locked:
        raise SessionLocked(SESSION_LOCKED)


def _claim_or_explain(session_id, now: datetime, *, busy_message: str = SESSION_BUSY, **updates) -> None:
    """Inside a transaction: lock the active session row unless an answer is streaming."""
    claimed = (
        ChatSession.objects.filter(pk=session_id, status=SessionStatus.ACTIVE)
        .filter(_no_live_turn(now))
        .update(**updates)
    )
    if claimed:
        return
    status = ChatSession.objects.filter(pk=session_id).values_list("status", flat=True).first()
    if status != SessionStatus.ACTIVE:
        raise SessionEnded(SESSION_ENDED)
    raise SessionBusy(busy_message)


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


def with_pending_stream(sessions):
    """Annotate `has_pending_stream`: a switch's context stream waits for this model's first call.

    A turn reads the stream only when there is one, which saves every other turn a query.
    """
    pending = ContextStream.objects.filter(
        session=OuterRef("pk"), settled_at__isnull=True, target_model=OuterRef("current_model")
    )
    return sessions.annotate(has_pending_stream=Exists(pending))


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


# --- start ---------------------------------------------------------------------------------


def session_start(
    *,
    user,
    client,
    model,
    brand=None,
    name: str = "",
    system_prompt: str = "",
    source: str = SessionSource.WEB,
    api_token=None,
) -> ChatSession:
    """Start the timer: a session on `client` with `model`, and its first segment."""
    name = _require_text(name, "name").strip()
    if len(name) > NAME_LIMIT:
        raise BadInput(NAME_TOO_LONG.format(size=len(name), limit=NAME_LIMIT))
    system_prompt = _require_text(system_prompt, "system_prompt")
    if len(system_prompt) > settings.CHAT_MAX_MESSAGE_CHARS:
        raise MessageTooLarge(
            SYSTEM_PROMPT_TOO_LARGE.format(size=len(system_prompt), limit=settings.CHAT_MAX_MESSAGE_CHARS)
        )
    if source not in SessionSource.values:
        raise BadInput(UNKNOWN_SOURCE.format(source=source))
    domain = _resolve_client(client, user)
    if api_token is not None and api_token.client_id and api_token.client_id != domain.pk:
        raise BadInput(TOKEN_CLIENT.format(slug=api_token.client.slug))
    model_name = _resolve_model(model)
    brand_obj = _resolve_brand(brand, domain)
    now = timezone.now()
    with transaction.atomic():
        session = ChatSession.objects.create(
            user=user,
            domain=domain,
            brand=brand_obj,
            name=name,
            system_prompt=system_prompt,
            started_at=now,
            last_activity_at=now,
            primary_model=model_name,
            current_model=model_name,
            source=source,
            api_token=api_token,
        )
        SessionSegment.objects.create(session=session, domain=domain, brand=brand_obj, model=model_name, started_at=now)
    return session


# --- chat ----------------------------------------------------------------------------------


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


@dataclass
class _Turn:
    """What one streaming answer has gathered; shared with `session_end` for a take-over."""

    start: _TurnStart
    loop: asyncio.AbstractEventLoop
    began: float = field(default_factory=time.monotonic)
    parts: list[str] = field(default_factory=list)
    usage: Usage | None = None
    error: ProviderError | None = None
    outcome: str = "streaming"  # ok | error | cancelled | stopped
    first_token_ms: int | None = None
    state: str = "streaming"  # streaming | finishing | taken | done
    lock: threading.Lock = field(default_factory=threading.Lock)
    finished: threading.Event = field(default_factory=threading.Event)
    on_stop: Callable[[], None] | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def request_stop(self) -> None:
        if self.on_stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                self.loop.call_soon_threadsafe(self.on_stop)

    def take_over(self) -> bool:
        """Claim the right to store this answer (for `session_end`); False if it is being stored."""
        with self.lock:
            if self.state == "streaming":
                self.state = "taken"
                if self.outcome == "streaming":
                    self.outcome = "stopped"
                return True
        return False

    def begin_finishing(self) -> bool:
        with self.lock:
            if self.state != "streaming":
                return False
            self.state = "finishing"
            return True


# In-process registry of streaming answers, so an end in this process can stop and store them.
_TURNS: dict[str, _Turn] = {}
_TURNS_LOCK = threading.Lock()

_END = object()
_STOPPED = object()


def _stop_key(session_id, claim: datetime) -> str:
    return f"sessions:stop:{session_id}:{claim.timestamp():.6f}"


def _stream_options(options) -> StreamOptions:
    if options is None:
        opts = StreamOptions()
    elif isinstance(options, StreamOptions):
        opts = dataclasses.replace(options)  # the caller's object is not changed
    elif isinstance(options, dict):
        known = {"temperature", "max_tokens", "num_ctx", "keep_alive", "seed"}
        opts = StreamOptions(
            **{k: v for k, v in options.items() if k in known},
            extra={k: v for k, v in options.items() if k not in known},
        )
    else:
        raise BadInput("options must be an object.")
    return opts


def _claim_fields(now: datetime) -> dict[str, Any]:
    """What claiming a session for one answer writes: the claim, the activity, the user message's count."""
    return {"turn_started_at": now, "last_activity_at": now, "total_messages": F("total_messages") + 1}


def _quick_claim(pk, user, now: datetime, **still) -> bool:
    """One UPDATE that claims the caller's active, uninvoiced session with no answer streaming.

    `still` adds conditions on what the caller read (see `_claim_known`).
    """
    sessions = ChatSession.objects.for_user(user).filter(
        _no_live_turn(now), pk=pk, status=SessionStatus.ACTIVE, invoice__isnull=True, **still
    )
    return bool(sessions.update(**_claim_fields(now)))


def _claim_turn(pk, user, now: datetime) -> None:
    """Inside a transaction: claim the session for one answer and count the user message.

    One UPDATE does it in the usual case; otherwise the session is read to say why not, or
    claimed after all when only a draft invoice kept the quick claim from matching.
    """
    if _quick_claim(pk, user, now):
        return
    session = session_get_for_user(session_id=pk, user=user)
    _check_writable(session)
    _claim_or_explain(session.pk, now, **_claim_fields(now))


def _claim_known(pk, user, now: datetime, known: KnownSession) -> bool:
    """Inside a transaction: the quick claim, only if `known` is still current.

    Every stored message counts in `total_messages` (invariant 1), and a switch moves the
    client or the model: a claim that matches the count, client and model read with `known`
    proves its rows are the session's messages now. False leaves the session untouched.
    """
    session = known.session
    if session.pk != pk or len(known.rows) != session.total_messages or not hasattr(session, "has_pending_stream"):
        return False
    current = {
        "total_messages": session.total_messages,
        "domain_id": session.domain_id,
        "current_model": session.current_model,
    }
    if not _quick_claim(pk, user, now, **current):
        return False
    session.turn_started_at = session.last_activity_at = now
    session.total_messages += 1
    return True


def begin_turn(*, session_id, user, message, known: KnownSession | None = None) -> _TurnStart:
    """Transaction 1: claim the session and store the user message before any provider call.

    The hot path of every turn, so it reads as little as it can: the claim, the session, its
    messages (the context and the chain's tail in one read), the insert, the model's alias and,
    only after a switch, the pending context stream. With `known` (the session and messages
    the caller has just read) the claim alone proves them current and neither is read again.

    Pass the result to `session_chat(start=...)` at once: until it ends, the session is claimed.
    """
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
        else:
            _claim_turn(pk, user, now)
            session = with_pending_stream(ChatSession.objects.select_related("domain", "brand")).get(pk=pk)
            # No client ids: a turn's plan never needs them (a switch's snapshot does, and reads
            # its own), and converting one per stored message costs a long session dearly.
            rows = list(SessionMessage.objects.filter(session_id=pk).order_by("seq").values_list(*TURN_ROW_FIELDS))
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
    return _TurnStart(
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
    )


def _release_claim(session_id, claim: datetime) -> None:
    """Transaction 2 (only when a turn fails before streaming): give the session back."""
    ChatSession.objects.filter(pk=session_id, turn_started_at=claim).update(turn_started_at=None)


def _turn_usage(turn: _Turn) -> tuple[int, int, str, str]:
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


def _carried_tokens(turn: _Turn, prompt_tokens: int) -> int:
    """The part of the reported prompt that is the history carried by the pending switch."""
    start = turn.start
    if start.stream is None or not prompt_tokens:
        return 0
    carried_estimate = sum(entry.tokens for entry in start.plan.entries if entry.seq in start.carried_seqs)
    total_estimate = start.plan.estimated_tokens
    if not total_estimate or not carried_estimate:
        return 0
    return min(prompt_tokens, round(prompt_tokens * carried_estimate / total_estimate))


def _store_answer(turn: _Turn, *, now: datetime | None = None) -> SessionMessage:
    """Store the assistant message, usage, stream settlement, totals and chain link.

    The caller holds a transaction and the session row.
    """
    start = turn.start
    now = now or timezone.now()
    session_id = start.session.pk
    prompt, completion, source, provider_model = _turn_usage(turn)
    model_id = provider_model or start.model_id
    if prompt or completion:
        cost = quantize_money(
            pricing.cost_of(
                provider=start.ref.provider,
                model_id=model_id,
                prompt_tokens=prompt,
                completion_tokens=completion,
                at=now,
            )
        )
    else:
        cost = Decimal("0")

    if turn.outcome == "ok":
        status, usage_status, error_text = MessageStatus.COMPLETE, UsageStatus.OK, ""
    elif turn.outcome == "error":
        status = MessageStatus.PARTIAL if turn.text else MessageStatus.ERROR
        usage_status = UsageStatus.ERROR
        error = turn.error
        error_text = f"{error.kind}: {error.message}" if error is not None else "error"
    else:
        status = MessageStatus.PARTIAL if turn.text else MessageStatus.ERROR
        usage_status = UsageStatus.CANCELLED
        error_text = STOPPED_BY_END if turn.outcome == "stopped" else CANCELLED

    session = start.session
    fields = ("status", "turn_started_at", "total_messages", "total_tokens", "estimated_cost_usd", "last_activity_at")
    state = ChatSession.objects.select_for_update().filter(pk=session_id).values(*fields, "invoice_id").get()
    # The message's lock check (billing.locks) reads the invoice from the session it is given.
    session.invoice_id = state.pop("invoice_id")
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

    carried = 0
    stream = start.stream
    if stream is not None and prompt:
        carried = _carried_tokens(turn, prompt)
        stream_cost = quantize_money(
            pricing.input_cost(provider=start.ref.provider, model_id=model_id, tokens=carried, at=now)
        )
        if stream_cost is not None and cost is not None:
            stream_cost = min(stream_cost, cost)  # a breakdown of the call's cost, never more
        ContextStream.objects.filter(pk=stream.pk, settled_at__isnull=True).update(
            total_tokens=carried, cost_usd=stream_cost, settled_at=now
        )

    elapsed_ms = int((time.monotonic() - turn.began) * 1000)
    LLMUsage.objects.create(
        user_id=session.user_id,
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
        duration_ms=max(0, elapsed_ms),
        status=usage_status,
        error_text=error_text[:2000],
        created_at=now,
    )

    update = {
        "total_messages": state["total_messages"] + 1,
        "total_tokens": state["total_tokens"] + prompt + completion,
        "estimated_cost_usd": quantize_money(Decimal(state["estimated_cost_usd"]) + (cost or Decimal("0"))),
        "last_activity_at": max(now, state["last_activity_at"]),
    }
    if state["turn_started_at"] == start.claim:
        update["turn_started_at"] = None
    if state["status"] == SessionStatus.ENDED:
        # Ended by another worker that gave up waiting for this answer: keep the answer and
        # re-seal, so the seal covers what is stored (through save(), so the invoice lock applies).
        locked = ChatSession.objects.get(pk=session_id)
        for name, value in update.items():
            setattr(locked, name, value)
        locked.save(update_fields=list(update))
        locked.soulfra_hash = integrity.build_seal(locked)
        locked.save(update_fields=["soulfra_hash"])
    else:
        # A message could be added, so no issued invoice covers the session: a plain UPDATE
        # under the row lock (no lock-check read) is safe.
        ChatSession.objects.filter(pk=session_id).update(**update)
    for name, value in (*state.items(), *update.items()):
        setattr(session, name, value)
    return message


def _finish_turn(turn: _Turn) -> tuple[SessionMessage, ChatSession] | None:
    """The last write transaction of a turn; None when `session_end` took the answer over."""
    if not turn.begin_finishing():
        return None
    try:
        with transaction.atomic():
            message = _store_answer(turn)
        session = turn.start.session
        # The session's totals are current (set under the row lock); an ended one is re-read whole.
        return message, (_load(session.pk) if session.status == SessionStatus.ENDED else session)
    finally:
        with turn.lock:
            turn.state = "done"
        turn.finished.set()


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


async def _watch_stop(key: str, turn: _Turn) -> None:
    """Across processes: poll the shared cache for an end requested by another worker."""
    while True:
        await asyncio.sleep(0.5)
        if await sync_to_async(cache.get, thread_sensitive=False)(key):
            if turn.on_stop is not None:
                turn.on_stop()
            return


async def session_chat(
    *,
    session_id,
    user,
    message,
    options=None,
    start: _TurnStart | None = None,
    known: KnownSession | None = None,
) -> AsyncIterator[Token | Done]:
    """One chat turn: yield `Token`s as the provider streams, then `Done` with the stored answer.

    `start` is a turn the caller has begun itself (`begin_turn`, in the same trip to the
    database thread as its own reads); by default the turn begins here, with `known` (the
    previous turn's `Done.known`, say) if the caller has it.

    Raises `ProviderFailed`/`ProviderTimeout` after storing a failed answer, and
    `SessionEnded` when the session was ended mid-answer (the partial answer is stored).
    """
    try:
        opts = _stream_options(options)  # bad options are refused before anything is stored
    except BaseException:
        if start is not None:
            await db_sync_to_async(_release_claim)(start.session.pk, start.claim)
        raise
    if start is None:
        start = await db_sync_to_async(begin_turn)(session_id=session_id, user=user, message=message, known=known)
    try:
        if start.ref.provider == "ollama" and opts.num_ctx is None:
            opts.num_ctx = start.plan.window
        resolved = ModelRef(start.ref.provider, start.model_id)
        provider_stream = router.stream_chat(resolved, start.plan.messages, opts, resolved=True)
    except BaseException:
        await db_sync_to_async(_release_claim)(start.session.pk, start.claim)
        raise

    turn = _Turn(start=start, loop=asyncio.get_running_loop())
    key = str(start.session.pk)
    queue: asyncio.Queue = asyncio.Queue()
    pump = asyncio.create_task(_pump(provider_stream, queue))

    def stop() -> None:
        if turn.outcome == "streaming":
            turn.outcome = "stopped"
        pump.cancel()
        queue.put_nowait(_STOPPED)

    turn.on_stop = stop
    with _TURNS_LOCK:
        _TURNS[key] = turn
    watcher = (
        asyncio.create_task(_watch_stop(_stop_key(key, start.claim), turn))
        if getattr(settings, "REDIS_URL", "")
        else None
    )
    result = None
    try:
        while True:
            item = await queue.get()
            if item is _STOPPED:
                break
            if item is _END:
                if turn.outcome == "streaming":
                    turn.outcome = "ok"
                break
            if isinstance(item, ProviderError):
                turn.error = item
                if turn.outcome == "streaming":
                    turn.outcome = "error"
                break
            if isinstance(item, Usage):
                turn.usage = item
                continue
            if item:
                with turn.lock:
                    if turn.state == "taken":
                        break  # `session_end` stores what was yielded so far
                    turn.parts.append(item)
                if turn.first_token_ms is None:
                    turn.first_token_ms = int((time.monotonic() - turn.began) * 1000)
                yield Token(item)
    finally:
        if turn.outcome == "streaming":
            turn.outcome = "cancelled"  # the caller closed us or our task was cancelled
        if watcher is not None:
            watcher.cancel()
        if not pump.done():
            pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pump
        with _TURNS_LOCK:
            if _TURNS.get(key) is turn:
                del _TURNS[key]
        # Store even when cancelled: shield the write from a second cancellation.
        result = await asyncio.shield(asyncio.ensure_future(db_sync_to_async(_finish_turn)(turn)))

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
    yield Done(message=stored, session=session, known=_known_after(start, stored, session))


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


# --- switch --------------------------------------------------------------------------------


def _snapshot(plan: ContextPlan, clients: dict) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if plan.system_prompt:
        out.append({"seq": None, "role": "system", "content": plan.system_prompt, "model": "", "client": ""})
    for entry in plan.entries:
        out.append(
            {
                "seq": entry.seq,
                "role": entry.role,
                "content": entry.content,
                "model": entry.model,
                "client": clients.get(entry.client_id, ""),
            }
        )
    return out


def session_switch(*, session_id, user, client=None, model=None, reason: str = "") -> ContextStream:
    """Move the session to another client and/or model and record what context is carried."""
    session = session_get_for_user(session_id=session_id, user=user)
    reason = _require_text(reason, "reason").strip()
    if len(reason) > REASON_LIMIT:
        raise BadInput(REASON_TOO_LONG.format(size=len(reason), limit=REASON_LIMIT))
    if client in (None, "") and model in (None, ""):
        raise BadInput(SWITCH_NOTHING)
    _check_writable(session)
    domain = _resolve_client(client, user) if client not in (None, "") else session.domain
    model_name = _resolve_model(model) if model not in (None, "") else session.current_model
    if domain.pk == session.domain_id and model_name == session.current_model:
        raise BadInput(SWITCH_SAME.format(slug=domain.slug, model=model_name))
    source_ref, target_ref = parse_model(session.current_model), parse_model(model_name)
    if domain.pk != session.domain_id:
        stream_reason = StreamReason.DOMAIN_SWITCH
        brand = _resolve_brand(None, domain)
    else:
        stream_reason = (
            StreamReason.MODEL_UPGRADE if target_ref.paid and not source_ref.paid else StreamReason.MODEL_SWITCH
        )
        brand = session.brand

    now = timezone.now()
    with transaction.atomic():
        _claim_or_explain(session.pk, now, busy_message=SWITCH_BUSY, last_activity_at=now)
        session = _load(session.pk)
        open_segment = session.segments.filter(ended_at__isnull=True).first()
        if open_segment is not None:
            now = max(now, open_segment.started_at)
        plan = build_context(session=session, target=target_ref)
        clients = {str(c.pk): c.slug for c in ClientDomain.objects.filter(messages__session=session).distinct()}
        SessionSegment.objects.filter(session=session, ended_at__isnull=True).update(ended_at=now)
        SessionSegment.objects.create(session=session, domain=domain, brand=brand, model=model_name, started_at=now)
        # A switch that was never followed by a call carried nothing: settle it at zero.
        ContextStream.objects.filter(session=session, settled_at__isnull=True).update(
            settled_at=now, total_tokens=0, cost_usd=Decimal("0")
        )
        stream = ContextStream.objects.create(
            session=session,
            source_model=session.current_model,
            target_model=model_name,
            source_domain=session.domain,
            target_domain=domain,
            context_snapshot=_snapshot(plan, clients),
            message_count=len(plan.entries),
            omitted_count=plan.omitted_count,
            total_tokens=plan.history_tokens,
            reason=stream_reason,
            note=reason,
            streamed_at=now,
            cost_usd=None,
        )
        carried = list(session.messages.filter(seq__in=plan.seqs))
        for message in carried:
            if domain.pk != message.domain_id and domain.slug not in message.shared_to_domains:
                message.shared_to_domains = [*message.shared_to_domains, domain.slug]
            if model_name != message.model and model_name not in message.shared_to_models:
                message.shared_to_models = [*message.shared_to_models, model_name]
        SessionMessage.objects.bulk_update(carried, ["shared_to_domains", "shared_to_models"])
        ChatSession.objects.filter(pk=session.pk).update(
            domain=domain, brand=brand, current_model=model_name, last_activity_at=now
        )
    stream.source_domain = session.domain
    stream.target_domain = domain
    return stream


async def wait_for_turn(session_id, *, poll: float = 0.1, limit: float | None = None) -> None:
    """Wait (without blocking a thread) until no answer streams in the session."""
    deadline = time.monotonic() + (limit if limit is not None else turn_stale_after().total_seconds())
    while time.monotonic() < deadline:
        claim = await db_sync_to_async(
            lambda: ChatSession.objects.filter(pk=session_id).values_list("turn_started_at", flat=True).first()
        )()
        if claim is None or claim < timezone.now() - turn_stale_after():
            return
        await asyncio.sleep(poll)


async def asession_switch(*, session_id, user, client=None, model=None, reason: str = "") -> ContextStream:
    """`session_switch` that applies after a streaming answer finishes instead of raising busy."""
    for attempt in range(3):
        try:
            return await db_sync_to_async(session_switch)(
                session_id=session_id, user=user, client=client, model=model, reason=reason
            )
        except SessionBusy:
            if attempt == 2:
                raise
            await wait_for_turn(session_id)
    raise SessionBusy(SWITCH_BUSY)


# --- end -----------------------------------------------------------------------------------


def _wait_for_remote_turn(session: ChatSession, *, timeout: float | None = None) -> None:
    """Ask a streaming answer in another process to stop, then wait for it to store itself."""
    claim = session.turn_started_at
    if claim is None:
        return
    cache.set(_stop_key(session.pk, claim), True, timeout=int(turn_stale_after().total_seconds()) + 60)
    deadline = time.monotonic() + (timeout if timeout is not None else REMOTE_STOP_WAIT_SECONDS)
    while time.monotonic() < deadline:
        current = ChatSession.objects.filter(pk=session.pk).values_list("turn_started_at", flat=True).first()
        if current != claim:
            return
        time.sleep(0.1)


def _end(session: ChatSession, *, reason: str, at: datetime | None = None, wait_remote: bool = True) -> dict:
    if session.status == SessionStatus.ENDED:
        return session_summary(session=session)
    if session.is_locked:
        raise SessionLocked(SESSION_LOCKED)

    with _TURNS_LOCK:
        turn = _TURNS.get(str(session.pk))
    taken = False
    if turn is not None:
        taken = turn.take_over()
        if taken:
            turn.request_stop()
        else:
            # The answer is being stored right now in another thread: let it finish.
            turn.finished.wait(timeout=30)
    elif wait_remote and turn_is_live(session):
        _wait_for_remote_turn(session)

    now = timezone.now()
    with transaction.atomic():
        locked = ChatSession.objects.select_for_update().get(pk=session.pk)
        if locked.status == SessionStatus.ENDED:
            ended = True
        else:
            ended = False
            if taken:
                _store_answer(turn, now=now)
                locked = ChatSession.objects.select_for_update().get(pk=session.pk)
            ended_at = at or now
            last_start = (
                locked.segments.order_by("-started_at").values_list("started_at", flat=True).first()
                or locked.started_at
            )
            ended_at = max(ended_at, locked.started_at, last_start)
            SessionSegment.objects.filter(session=locked, ended_at__isnull=True).update(ended_at=ended_at)
            locked.status = SessionStatus.ENDED
            locked.ended_at = ended_at
            locked.duration_seconds = int((ended_at - locked.started_at).total_seconds() // 1)
            locked.end_reason = reason
            locked.turn_started_at = None
            locked.save(update_fields=["status", "ended_at", "duration_seconds", "end_reason", "turn_started_at"])
            locked.soulfra_hash = integrity.build_seal(locked)
            locked.save(update_fields=["soulfra_hash"])
    if taken:
        turn.finished.set()  # state stays "taken": the chat generator must not store it again
    if ended:
        logger.info("session %s was already ended", session.pk)
    return session_summary(session=_load(session.pk))


def session_end(*, session_id, user, reason: str = EndReason.USER) -> dict:
    """Stop the timer, close the last segment, seal, and return the summary (idempotent)."""
    session = session_get_for_user(session_id=session_id, user=user)
    if reason not in EndReason.values:
        raise BadInput(UNKNOWN_END_REASON.format(reason=reason, choices=", ".join(EndReason.values)))
    return _end(session, reason=reason)


async def asession_end(*, session_id, user, reason: str = EndReason.USER) -> dict:
    """`session_end` for async callers: waits for an answer in another process without a thread."""
    if reason not in EndReason.values:
        raise BadInput(UNKNOWN_END_REASON.format(reason=reason, choices=", ".join(EndReason.values)))
    session = await db_sync_to_async(session_get_for_user)(session_id=session_id, user=user)
    with _TURNS_LOCK:
        local = str(session.pk) in _TURNS
    if not local and session.status == SessionStatus.ACTIVE and turn_is_live(session):
        await sync_to_async(
            lambda: cache.set(
                _stop_key(session.pk, session.turn_started_at), True, int(turn_stale_after().total_seconds()) + 60
            ),
            thread_sensitive=False,
        )()
        await wait_for_turn(session.pk, limit=REMOTE_STOP_WAIT_SECONDS)

    def end() -> dict:
        fresh = session_get_for_user(session_id=session.pk, user=user)
        return _end(fresh, reason=reason, wait_remote=False)

    return await db_sync_to_async(end)()


def sessions_end_idle(*, now: datetime | None = None) -> list[ChatSession]:
    """The guardian: end sessions idle past SESSION_IDLE_TIMEOUT at their last activity."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.SESSION_IDLE_TIMEOUT)
    ended = []
    for session in ChatSession.objects.idle_since(cutoff).filter(_no_live_turn(now)).select_related("domain"):
        _end(session, reason=EndReason.IDLE_TIMEOUT, at=session.last_activity_at)
        ended.append(_load(session.pk))
    return ended


def sessions_stuck(*, now: datetime | None = None):
    """Active sessions whose answer claim is older than the provider timeouts allow."""
    now = now or timezone.now()
    first = settings.PROVIDER_CONNECT_TIMEOUT + settings.PROVIDER_FIRST_TOKEN_TIMEOUT
    cutoff = now - timedelta(seconds=first + settings.PROVIDER_IDLE_TIMEOUT)
    return ChatSession.objects.active().filter(turn_started_at__lt=cutoff).select_related("domain", "user")


def session_end_as_staff(*, session: ChatSession) -> dict:
    """End any session for staff (the admin action)."""
    return _end(session, reason=EndReason.STAFF)


# --- branch and history --------------------------------------------------------------------


def session_branch(*, session_id, user, at_seq=None, name: str = "") -> ChatSession:
    """A new session with copies of messages 1..at_seq; copies are not billed again."""
    parent = session_get_for_user(session_id=session_id, user=user)
    name = _require_text(name, "name").strip()
    if len(name) > NAME_LIMIT:
        raise BadInput(NAME_TOO_LONG.format(size=len(name), limit=NAME_LIMIT))
    last = parent.messages.order_by("-seq").values_list("seq", flat=True).first()
    if not last:
        raise BadInput(BRANCH_EMPTY)
    if at_seq is None:
        at_seq = last
    if isinstance(at_seq, bool) or not isinstance(at_seq, int) or not 1 <= at_seq <= last:
        raise BadInput(BRANCH_RANGE.format(last=last))
    domain = parent.domain
    if not ClientDomain.objects.open_to(user).filter(pk=domain.pk).exists():
        raise BadInput(CLIENT_NOT_ALLOWED.format(slug=domain.slug))
    name = name or f"{parent} (branch at #{at_seq})"[:NAME_LIMIT]
    now = timezone.now()
    with transaction.atomic():
        branch = ChatSession.objects.create(
            user=user,
            domain=domain,
            brand=parent.brand,
            name=name,
            system_prompt=parent.system_prompt,
            started_at=now,
            last_activity_at=now,
            primary_model=parent.current_model,
            current_model=parent.current_model,
            source=SessionSource.BRANCH,
            parent=parent,
            branched_at_seq=at_seq,
        )
        SessionSegment.objects.create(
            session=branch, domain=domain, brand=parent.brand, model=parent.current_model, started_at=now
        )
        previous = integrity.GENESIS
        count = 0
        for original in parent.messages.filter(seq__lte=at_seq).order_by("seq"):
            count += 1
            copy = SessionMessage(
                session=branch,
                seq=count,
                role=original.role,
                content=original.content,
                timestamp=original.timestamp,
                model=original.model,
                provider=original.provider,
                domain_id=original.domain_id,
                prompt_tokens=original.prompt_tokens,
                completion_tokens=original.completion_tokens,
                tokens=original.tokens,
                token_source=original.token_source,
                cost_usd=original.cost_usd,
                status=original.status,
                error_text=original.error_text,
                copied_from=original,
            )
            previous = _store_linked(copy, previous)
        branch.total_messages = count
        branch.save(update_fields=["total_messages"])
    return _load(branch.pk)


def session_append_history(*, session_id, user, messages: list[ChatMessage], allow_during_turn: bool = False) -> None:
    """Store already-answered messages as they are, without a provider call (gateway, import).

    They are marked imported: no tokens or cost are billed for them. `allow_during_turn` is for
    an overflow handler that stores a summary while the turn that needs it holds the session.
    """
    if not isinstance(messages, list | tuple):
        raise BadInput(HISTORY_SHAPE.format(index=0))
    if not messages:
        raise BadInput(HISTORY_EMPTY)
    limit = settings.CHAT_MAX_MESSAGE_CHARS * HISTORY_LIMIT_FACTOR
    cleaned: list[tuple[str, str]] = []
    for index, item in enumerate(messages):
        if (
            not isinstance(item, dict)
            or item.get("role") not in MessageRole.values
            or not isinstance(item.get("content"), str)
        ):
            raise BadInput(HISTORY_SHAPE.format(index=index))
        content = item["content"].replace("\x00", "")
        if len(content) > limit:
            raise MessageTooLarge(MESSAGE_TOO_LARGE.format(size=len(content), limit=limit))
        cleaned.append((item["role"], content))
    session = session_get_for_user(session_id=session_id, user=user)
    _check_writable(session)
    ref = parse_model(session.current_model)
    now = timezone.now()
    with transaction.atomic():
        if allow_during_turn:
            ChatSession.objects.select_for_update().filter(pk=session.pk).first()
        else:
            _claim_or_explain(session.pk, now, last_activity_at=now)
        session = _load(session.pk)
        seq, previous = _chain_tail(session.pk)
        for offset, (role, content) in enumerate(cleaned):
            message = SessionMessage(
                session=session,
                seq=seq + offset,
                role=role,
                content=content,
                timestamp=now,
                model=session.current_model,
                provider=ref.provider,
                domain=session.domain,
                cost_usd=Decimal("0"),
                is_imported=True,
            )
            previous = _store_linked(message, previous)
        ChatSession.objects.filter(pk=session.pk).update(
            total_messages=session.total_messages + len(cleaned), last_activity_at=now
        )
