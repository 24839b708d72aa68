"""Context summarization: the `summarize` overflow policy of `sessions_app.context`.

When the history no longer fits the target model's window and `CONTEXT_OVERFLOW=summarize`,
the session's current model condenses the conversation so far into a summary, stored as a
`system` message with its own tokens and cost (and one `LLMUsage` row per provider call, so
it is billed like any other call). `build_context` treats the newest stored `system` message
as standing in for everything before it, so the summary covers every message up to the one
being answered; this call sends it with as many of the newest messages as still fit.

A history too long for the summarizing model's own window is folded in chunks: the summary
of the first chunk is carried into the next. If the provider fails, the plan falls back to
truncation and says so in its notes; the failed call is still in the usage ledger.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from decimal import Decimal

from asgiref.sync import async_to_sync
from django.db import transaction
from django.utils import timezone

from billing.models import LLMUsage, TokenSource, UsageStatus
from billing.pricing import cost_of
from providers import router, tokens
from providers.base import ChatMessage, ProviderError, StreamOptions, Usage
from providers.naming import parse_model
from sessions_app.context import (
    ContextEntry,
    ContextPlan,
    newest_that_fit,
    register_overflow_handler,
    reply_reserve,
)
from sessions_app.models import ChatSession, MessageRole, SessionMessage
from sessions_app.services.store import chain_append

logger = logging.getLogger(__name__)

SUMMARY_HEADER = "Summary of the conversation up to message #{last} (made by {model} to fit the context window):"
INSTRUCTIONS = (
    "You condense conversations so they can be continued without the original text. "
    "Summarize the conversation below: keep every fact, decision, name, number, code identifier, "
    "open question and what the user asked last; drop pleasantries. Write in the conversation's "
    "language, in plain sentences or short bullet points, at most {words} words. "
    "Answer with the summary only."
)
SUMMARY_MAX_TOKENS = 1024
LABELS = {"user": "USER", "assistant": "ASSISTANT", "system": "EARLIER SUMMARY"}


@dataclass
class _Call:
    usage: Usage
    duration_ms: int
    first_token_ms: int | None


@dataclass
class _Outcome:
    text: str
    calls: list[_Call]


def _transcript_line(role: str, content: str) -> str:
    return f"{LABELS.get(role, role.upper())}: {content.strip()}"


def _summary_limit(window: int) -> int:
    return max(64, min(SUMMARY_MAX_TOKENS, window // 8))


async def _ask(model: str, messages: list[ChatMessage], max_tokens: int) -> tuple[str, _Call]:
    started = time.monotonic()
    first: float | None = None
    parts: list[str] = []
    usage: Usage | None = None
    options = StreamOptions(temperature=0.2, max_tokens=max_tokens)
    async for item in router.stream_chat(model, messages, options):
        if isinstance(item, Usage):
            usage = item
        else:
            if first is None:
                first = time.monotonic()
            parts.append(item)
    text = "".join(parts).strip()
    if usage is None:
        usage = Usage(tokens.estimate_messages(messages), tokens.estimate_tokens(text), source="estimated")
    call = _Call(
        usage=usage,
        duration_ms=int((time.monotonic() - started) * 1000),
        first_token_ms=int((first - started) * 1000) if first is not None else None,
    )
    return text, call


async def _fold(model: str, window: int, lines: list[str]) -> _Outcome:
    """Summarize `lines`, in chunks that fit the summarizing model's window."""
    limit = _summary_limit(window)
    words = max(40, limit * 3 // 4)
    instructions = INSTRUCTIONS.format(words=words)
    room = max(256, window - reply_reserve(window) - tokens.estimate_tokens(instructions) - limit - 32)
    calls: list[_Call] = []
    summary = ""
    pending = list(lines)
    while pending:
        chunk: list[str] = [_transcript_line("system", summary)] if summary else []
        used = sum(tokens.estimate_tokens(line) + 2 for line in chunk)
        while pending:
            cost = tokens.estimate_tokens(pending[0]) + 2
            if chunk and used + cost > room:
                break
            line = pending.pop(0)
            if cost > room:  # one message larger than the window: keep its beginning
                line = line[: room * 4]
                cost = room
            chunk.append(line)
            used += cost
        messages: list[ChatMessage] = [
            {"role": "system", "content": instructions},
            {"role": "user", "content": "\n\n".join(chunk)},
        ]
        summary, call = await _ask(model, messages, limit)
        calls.append(call)
    return _Outcome(text=summary, calls=calls)


def _cost(ref, usage: Usage, at) -> Decimal | None:

    return cost_of(
        provider=ref.provider,
        model_id=usage.provider_model or ref.model,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        at=at,
    )


def _store(*, session: ChatSession, model: str, content: str, calls: list[_Call]) -> SessionMessage:
    """Store the summary as the session's next message, with its usage rows, in one transaction."""
    ref = parse_model(model)
    now = timezone.now()
    costs = [_cost(ref, call.usage, now) for call in calls]
    cost = None if any(c is None for c in costs) else sum(costs, Decimal(0))
    prompt = sum(call.usage.prompt_tokens for call in calls)
    completion = sum(call.usage.completion_tokens for call in calls)
    estimated = any(call.usage.source == TokenSource.ESTIMATED for call in calls)
    with transaction.atomic():
        locked = ChatSession.objects.select_for_update().get(pk=session.pk)
        message = SessionMessage(
            session=locked,
            role=MessageRole.SYSTEM,
            content=content,
            timestamp=now,
            model=model,
            provider=ref.provider,
            domain_id=locked.domain_id,
            prompt_tokens=prompt,
            completion_tokens=completion,
            tokens=prompt + completion,
            token_source=TokenSource.ESTIMATED if estimated else TokenSource.PROVIDER,
            cost_usd=cost,
        )
        chain_append(locked, [message], now=now)  # linked, stored and counted in the session's totals
        LLMUsage.objects.bulk_create(
            LLMUsage(
                user_id=locked.user_id,
                session=locked,
                message=message,
                client_id=locked.domain_id,
                provider=ref.provider,
                model=ref.model,
                provider_model=call.usage.provider_model,
                prompt_tokens=call.usage.prompt_tokens,
                completion_tokens=call.usage.completion_tokens,
                token_source=call.usage.source,
                cost=call_cost,
                time_to_first_token_ms=call.first_token_ms,
                duration_ms=call.duration_ms,
                status=UsageStatus.OK,
                created_at=now,
            )
            for call, call_cost in zip(calls, costs, strict=True)
        )
    return message


def _record_failure(*, session: ChatSession, model: str, error: ProviderError) -> None:
    ref = parse_model(model)
    usage = error.usage
    LLMUsage.objects.create(
        user_id=session.user_id,
        session=session,
        client_id=session.domain_id,
        provider=ref.provider,
        model=ref.model,
        provider_model=usage.provider_model if usage else "",
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        token_source=usage.source if usage else TokenSource.ESTIMATED,
        cost=_cost(ref, usage, timezone.now()) if usage else Decimal(0),
        status=UsageStatus.ERROR,
        error_text=f"context summary: {error.message}"[:2000],
    )


def summarize_overflow(*, session: ChatSession, target, plan: ContextPlan) -> ContextPlan:
    """The `summarize` overflow handler: replace the omitted history with a stored summary."""
    covered = sorted(set(plan.omitted) | set(plan.seqs))
    rows = list(session.messages.filter(seq__in=covered).order_by("seq").values_list("seq", "role", "content"))
    lines = [_transcript_line(role, content) for _seq, role, content in rows if content.strip()]
    if not lines:
        return plan
    model = session.current_model
    ref = parse_model(model)
    window = router.context_window(ref)
    try:
        # Runs on this thread's connection: the router's lookups leave a caller's transaction alone.
        outcome = async_to_sync(_fold)(model, window, lines)
    except ProviderError as exc:
        logger.warning("Context summary for session %s failed: %s", session.pk, exc)
        _record_failure(session=session, model=model, error=exc)
        plan.notes.append(f"the summary of older messages failed ({exc.message}); truncated instead")
        return plan
    if not outcome.text:
        plan.notes.append("the summarizing model answered with nothing; truncated instead")
        return plan
    content = SUMMARY_HEADER.format(last=rows[-1][0], model=model) + "\n" + outcome.text
    summary = _store(session=session, model=model, content=content, calls=outcome.calls)

    # This call: the summary, then the newest messages that still fit beside it.
    budget = max(0, plan.budget - tokens.estimate_messages([{"role": "system", "content": content}]))
    kept = newest_that_fit(plan.entries, budget)
    sent = {entry.seq for entry in kept}
    # The summary leads the history, as a stored message: a switch's snapshot carries it too.
    lead = ContextEntry(
        seq=summary.seq,
        role=MessageRole.SYSTEM,
        content=content,
        model=model,
        client_id=str(summary.domain_id),
        tokens=tokens.estimate_messages([{"role": "system", "content": content}]),
    )
    plan.entries = [lead, *kept]
    plan.summarized = sorted(set(plan.summarized) | {seq for seq in covered if seq not in sent})
    plan.omitted = []
    plan.notes.append(
        f"{len(covered)} message(s) summarized by {model} into message #{summary.seq} "
        f"({summary.tokens} tokens) to fit {target.name}'s window of {plan.window} tokens"
    )
    return plan


register_overflow_handler("summarize", summarize_overflow)
