"""docs/DESIGN.md's five invariants, checked for one session (`verify_sessions` and the tests use this).

`check_session(session)` returns a list of human-readable violations; empty means sound.
"""

from __future__ import annotations

import itertools
from decimal import Decimal

from billing.models import ClientDomain, LLMUsage, UsageStatus
from sessions_app import integrity
from sessions_app.archive import archived_state
from sessions_app.models import ChatSession, MessageRole, MessageStatus, SessionStatus
from sessions_app.selectors import SessionRows, session_rows, session_summary

ZERO = Decimal("0")


def _seconds(delta) -> int:
    return int(delta.total_seconds() // 1)


def check_totals(session: ChatSession, messages: list) -> list[str]:
    """1. A session's totals equal the sums over its messages, exactly."""
    out = []
    billable = [m for m in messages if m.copied_from_id is None and not m.is_imported]
    tokens = sum(m.tokens for m in billable)
    cost = sum((m.cost_usd or ZERO for m in billable), ZERO)
    if session.total_messages != len(messages):
        out.append(f"1: total_messages is {session.total_messages} but {len(messages)} messages are stored")
    if session.total_tokens != tokens:
        out.append(f"1: total_tokens is {session.total_tokens} but billable messages sum to {tokens}")
    if Decimal(session.estimated_cost_usd) != cost:
        out.append(f"1: estimated_cost_usd is {session.estimated_cost_usd} but billable messages sum to {cost}")
    for m in messages:
        if m.tokens != m.prompt_tokens + m.completion_tokens:
            out.append(f"1: message #{m.seq} has tokens {m.tokens} != {m.prompt_tokens} + {m.completion_tokens}")
    seqs = [m.seq for m in messages]
    if seqs != list(range(1, len(seqs) + 1)):
        out.append(f"1: message sequence numbers are not 1..{len(seqs)}: {seqs[:20]}")
    return out


def check_segments(session: ChatSession, segments: list) -> list[str]:
    """2. A session's duration equals the sum of its segments' durations, to the second."""
    out = []
    if not segments:
        return ["2: the session has no segments"]
    if segments[0].started_at != session.started_at:
        out.append("2: the first segment does not start when the session started")
    for before, after in itertools.pairwise(segments):
        if before.ended_at != after.started_at:
            out.append(f"2: segments are not contiguous at {after.started_at.isoformat()}")
    open_segments = [s for s in segments if s.ended_at is None]
    if session.status == SessionStatus.ACTIVE:
        if len(open_segments) != 1 or segments[-1].ended_at is not None:
            out.append(f"2: an active session must have exactly one open (last) segment, has {len(open_segments)}")
        return out
    if open_segments:
        out.append("2: an ended session still has an open segment")
        return out
    if segments[-1].ended_at != session.ended_at:
        out.append("2: the last segment does not end when the session ended")
    total = sum((s.ended_at - s.started_at for s in segments), segments[0].started_at - segments[0].started_at)
    if session.duration_seconds != _seconds(total):
        out.append(f"2: duration_seconds is {session.duration_seconds} but segments sum to {_seconds(total)}")
    if session.ended_at and session.duration_seconds != _seconds(session.ended_at - session.started_at):
        out.append("2: duration_seconds does not match ended_at - started_at")
    return out


def check_streams(session: ChatSession, messages: list, usage: list, streams: list) -> list[str]:
    """3. No cost is counted twice: a stream's cost is a breakdown of the settling call's cost."""
    out = []
    # The call that settled a stream is stored in the same transaction, with the same instant.
    answers_at: dict = {}
    for m in messages:
        if m.role == MessageRole.ASSISTANT and m.copied_from_id is None and m.prompt_tokens:
            answers_at.setdefault((m.timestamp, m.model), m)
    for stream in streams:
        if stream.settled_at is None:
            if stream.cost_usd is not None:
                out.append(f"3: stream {stream.stream_id} has a cost before it was settled")
            continue
        if not stream.total_tokens and not stream.cost_usd:
            continue
        settling = answers_at.get((stream.settled_at, stream.target_model))
        if settling is None:
            out.append(f"3: stream {stream.stream_id} is settled but no call to {stream.target_model} carried it")
            continue
        if stream.total_tokens > settling.prompt_tokens:
            out.append(
                f"3: stream {stream.stream_id} carried {stream.total_tokens} tokens, more than the call's "
                f"{settling.prompt_tokens} prompt tokens"
            )
        if stream.cost_usd is not None and settling.cost_usd is not None and stream.cost_usd > settling.cost_usd:
            out.append(
                f"3: stream {stream.stream_id} costs {stream.cost_usd}, more than its call's {settling.cost_usd}"
            )
    # The per-call ledger reconciles with the messages: nothing billed twice, nothing missing.
    own_usage = [u for u in usage if u.message_id is not None]
    ledger = sum((u.cost or ZERO for u in own_usage), ZERO)
    answers = sum(
        (
            m.cost_usd or ZERO
            for m in messages
            # A context summary (a system message) is a billed call of its own.
            if m.role in (MessageRole.ASSISTANT, MessageRole.SYSTEM) and m.copied_from_id is None and not m.is_imported
        ),
        ZERO,
    )
    if ledger != answers:
        out.append(f"3: LLM usage rows cost {ledger} but the answers cost {answers}")
    return out


def check_clients(session: ChatSession, messages: list, loaded: SessionRows) -> list[str]:
    """4. Per-client totals equal the sums of the underlying messages and segments."""
    out = []
    summary = session_summary(session=session, rows=loaded)
    rows = summary["by_client"]
    if sum(r["messages"] for r in rows) != len(messages):
        out.append("4: by_client messages do not add up to the stored messages")
    if sum(r["tokens"] for r in rows) != session.total_tokens:
        out.append("4: by_client tokens do not add up to total_tokens")
    if sum((Decimal(r["cost_usd"]) for r in rows), ZERO) != Decimal(session.estimated_cost_usd):
        out.append("4: by_client cost does not add up to the session's cost")
    if session.status == SessionStatus.ENDED and sum(r["seconds"] for r in rows) != session.duration_seconds:
        out.append("4: by_client seconds do not add up to duration_seconds")
    slug_of = {pk: client.slug for pk, client in ClientDomain.objects.in_bulk({m.domain_id for m in messages}).items()}
    tokens: dict[str, int] = {}
    costs: dict[str, Decimal] = {}
    for m in messages:
        if m.copied_from_id is None and not m.is_imported:
            slug = slug_of.get(m.domain_id)
            tokens[slug] = tokens.get(slug, 0) + m.tokens
            costs[slug] = costs.get(slug, ZERO) + (m.cost_usd or ZERO)
    for row in rows:
        if row["tokens"] != tokens.get(row["client"], 0):
            out.append(f"4: client {row['client']} tokens differ from its messages")
        if Decimal(row["cost_usd"]) != costs.get(row["client"], ZERO):
            out.append(f"4: client {row['client']} cost differs from its messages")
    model_rows = summary["by_model"]
    if sum(r["tokens"] for r in model_rows) != session.total_tokens:
        out.append("4: by_model tokens do not add up to total_tokens")
    return out


def check_nothing_lost(session: ChatSession, messages: list, usage: list) -> list[str]:
    """5. Every user message is stored and answered (or the failure is stored with its text)."""
    out = []
    usage_by_message = {u.message_id: u for u in usage if u.message_id is not None}
    for u in usage:
        if u.message_id is None:
            out.append(f"5: LLM usage {u.pk} ({u.status}) has no stored answer")
    for index, m in enumerate(messages):
        if m.copied_from_id is not None or m.is_imported:
            continue
        if m.role == MessageRole.USER:
            # A context summary may sit between a question and its answer.
            following = next((n for n in messages[index + 1 :] if n.role != MessageRole.SYSTEM), None)
            live = session.turn_started_at is not None and following is None
            if (following is None or following.role != MessageRole.ASSISTANT) and not live:
                out.append(f"5: user message #{m.seq} has no stored answer (not even a partial or error)")
        elif m.role == MessageRole.ASSISTANT:
            row = usage_by_message.get(m.message_id)
            if row is None:
                out.append(f"5: answer #{m.seq} has no LLM usage row")
                continue
            if m.status == MessageStatus.COMPLETE and row.status != UsageStatus.OK:
                out.append(f"5: complete answer #{m.seq} has usage status {row.status}")
            if m.status != MessageStatus.COMPLETE and row.status == UsageStatus.OK:
                out.append(f"5: {m.status} answer #{m.seq} has usage status ok")
            if row.prompt_tokens != m.prompt_tokens or row.completion_tokens != m.completion_tokens:
                out.append(f"5: answer #{m.seq} tokens differ from its usage row")
    if session.status == SessionStatus.ENDED and session.turn_started_at is not None:
        out.append("5: an ended session still holds an answer claim")
    return out


def session_verdict(session: ChatSession) -> tuple[str, list[str]]:
    """The integrity detail and every violation (integrity first); no violations means sound.

    Each of the session's tables is read once, by an index on the session, so verifying
    many sessions costs time linear in their own rows.
    """
    session = ChatSession.objects.select_related("domain").get(pk=session.pk)
    rows = session_rows(session)
    if session.archived_at is not None:
        messages, usage = archived_state(session)
    else:
        messages, usage = rows.messages, list(LLMUsage.objects.filter(session_id=session.pk))
    valid, detail = integrity.verify_session(
        session, messages=rows.messages, segments=rows.segments, streams=rows.streams
    )
    problems = [] if valid else [f"integrity: {detail}"]
    problems += [
        *check_totals(session, messages),
        *check_segments(session, rows.segments),
        *check_streams(session, messages, usage, rows.streams),
        *check_clients(session, messages, rows),
        *check_nothing_lost(session, messages, usage),
    ]
    return detail, problems


def check_session(session: ChatSession) -> list[str]:
    """All five invariants plus the integrity chain; an empty list means the session is sound."""
    return session_verdict(session)[1]
