"""Reads: load sessions for a user, list them, and the JSON shapes of docs/DESIGN.md ("Shapes")."""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db.models import Q, QuerySet
from django.utils import timezone

from billing.models import ClientDomain
from sessions_app import integrity
from sessions_app.errors import SESSION_NOT_FOUND, BadInput, NotFound
from sessions_app.models import ChatSession, ContextStream, SessionMessage, SessionSegment, SessionStatus

ZERO = Decimal("0")


def money(value: Decimal | None) -> str | None:
    """Money leaves the system as a string with six decimals (no rounding beyond storage)."""
    if value is None:
        return None
    return f"{Decimal(value):.6f}"


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def parse_session_id(session_id) -> uuid.UUID:
    if isinstance(session_id, uuid.UUID):
        return session_id
    try:
        return uuid.UUID(str(session_id))
    except (TypeError, ValueError, AttributeError):
        raise NotFound(SESSION_NOT_FOUND) from None


def session_get_for_user(*, session_id, user) -> ChatSession:
    """The session if the user may see it; NotFound for unknown, malformed or foreign ids."""
    pk = parse_session_id(session_id)
    if user is None or not getattr(user, "is_authenticated", False):
        raise NotFound(SESSION_NOT_FOUND)
    try:
        return ChatSession.objects.for_user(user).select_related("domain", "brand").get(pk=pk)
    except ChatSession.DoesNotExist:
        raise NotFound(SESSION_NOT_FOUND) from None


def session_list(*, user, client=None, status=None, start=None, end=None) -> QuerySet[ChatSession]:
    """The user's sessions (staff: everyone's), newest first; `client` matches any client billed."""
    qs = ChatSession.objects.for_user(user).select_related("domain", "brand")
    if client is not None:
        if not isinstance(client, ClientDomain):
            client = ClientDomain.objects.filter(slug=str(client)).first()
            if client is None:
                return qs.none()
        billed = ChatSession.objects.filter(Q(domain=client) | Q(segments__domain=client)).values("pk")
        qs = qs.filter(pk__in=billed)
    if status:
        if status not in SessionStatus.values:
            raise BadInput(f"Unknown status {status!r}; use one of {', '.join(SessionStatus.values)}.")
        qs = qs.filter(status=status)
    if start is not None:
        qs = qs.filter(started_at__gte=start)
    if end is not None:
        qs = qs.filter(started_at__lt=end)
    return qs.order_by("-started_at", "-session_id")


def session_as_dict(session: ChatSession) -> dict[str, Any]:
    return {
        "session_id": str(session.session_id),
        "status": session.status,
        "client": session.domain.slug,
        "brand": str(session.brand_id) if session.brand_id else None,
        "model": session.current_model,
        "name": session.name,
        "started_at": iso(session.started_at),
        "ended_at": iso(session.ended_at),
        "duration_seconds": session.duration_seconds,
        "total_messages": session.total_messages,
        "total_tokens": session.total_tokens,
        "total_cost_usd": money(session.estimated_cost_usd),
    }


def message_as_dict(message: SessionMessage) -> dict[str, Any]:
    return {
        "message_id": str(message.message_id),
        "seq": message.seq,
        "role": message.role,
        "content": message.content,
        "status": message.status,
        "model": message.model,
        "provider": message.provider,
        "client": message.domain.slug,
        "timestamp": iso(message.timestamp),
        "prompt_tokens": message.prompt_tokens,
        "completion_tokens": message.completion_tokens,
        "tokens": message.tokens,
        "token_source": message.token_source,
        "cost_usd": money(message.cost_usd),
        "context_omitted": message.context_omitted,
        "error": message.error_text,
    }


def chat_answer_as_dict(message: SessionMessage, session: ChatSession) -> dict[str, Any]:
    """The chat answer: the assistant message plus the session with its new totals."""
    return {**message_as_dict(message), "session": session_as_dict(session)}


def stream_as_dict(stream: ContextStream) -> dict[str, Any]:
    return {
        "stream_id": str(stream.stream_id),
        "source_model": stream.source_model,
        "target_model": stream.target_model,
        "source_client": stream.source_domain.slug,
        "target_client": stream.target_domain.slug,
        "reason": stream.reason,
        "message_count": stream.message_count,
        "omitted_count": stream.omitted_count,
        "total_tokens": stream.total_tokens,
        "cost_usd": money(stream.cost_usd),
        "settled": stream.settled_at is not None,
        "streamed_at": iso(stream.streamed_at),
    }


def allocate_seconds(boundaries: list[tuple[datetime, datetime]], origin: datetime) -> list[int]:
    """Whole seconds per span, cut at cumulative boundaries so they sum to the floor of the total.

    Rounding each span alone can gain or lose a second; flooring the running total at each
    boundary and taking differences cannot.
    """
    out: list[int] = []
    previous = 0
    for _start, stop in boundaries:
        cumulative = int((stop - origin).total_seconds() // 1)
        cumulative = max(cumulative, previous)
        out.append(cumulative - previous)
        previous = cumulative
    return out


@dataclass
class SessionRows:
    """A session's own rows, each read once by an index on the session: what a summary and a
    verification need. Nothing here joins through a client, so the cost is linear in the
    session's rows whatever the size of its clients' history."""

    messages: list[SessionMessage]  # in seq order; from the archive when retention moved them
    segments: list[SessionSegment]  # in time order
    streams: list[ContextStream]  # in time order, with their clients


def session_rows(session: ChatSession) -> SessionRows:
    if session.archived_at is not None:
        # Archived (retention): the messages live compressed on the session row.
        from sessions_app.archive import archived_messages

        messages = archived_messages(session)
    else:
        messages = list(SessionMessage.objects.filter(session_id=session.pk).order_by("seq"))
    segments = list(SessionSegment.objects.filter(session_id=session.pk).order_by("started_at", "id"))
    streams = list(
        ContextStream.objects.filter(session_id=session.pk)
        .select_related("source_domain", "target_domain")
        .order_by("streamed_at", "stream_id")
    )
    return SessionRows(messages=messages, segments=segments, streams=streams)


def _client_seconds(session: ChatSession, segments: list[SessionSegment]) -> OrderedDict:
    until = session.ended_at or timezone.now()
    spans = [(seg.started_at, seg.ended_at or until) for seg in segments]
    seconds: OrderedDict = OrderedDict()
    for seg, amount in zip(segments, allocate_seconds(spans, session.started_at), strict=True):
        seconds[seg.domain_id] = seconds.get(seg.domain_id, 0) + amount
    return seconds


def session_summary(*, session: ChatSession, rows: SessionRows | None = None) -> dict[str, Any]:
    """Duration, totals, by client (seconds, messages, tokens, cost), by model, streams, integrity.

    Reads the session's messages, segments and context streams once each, and the clients
    they name by primary key (`rows`, when the caller has them, saves those reads).
    """
    rows = rows or session_rows(session)
    client_ids = {session.domain_id, *(m.domain_id for m in rows.messages), *(s.domain_id for s in rows.segments)}
    clients = ClientDomain.objects.in_bulk(client_ids)
    seconds = _client_seconds(session, rows.segments)

    by_client: OrderedDict = OrderedDict(
        (pk, {"seconds": s, "messages": 0, "tokens": 0, "cost": ZERO}) for pk, s in seconds.items()
    )
    by_model: OrderedDict = OrderedDict()
    for message in rows.messages:
        billable = message.copied_from_id is None and not message.is_imported
        row = by_client.setdefault(message.domain_id, {"seconds": 0, "messages": 0, "tokens": 0, "cost": ZERO})
        model_row = by_model.setdefault(
            message.model or session.current_model, {"messages": 0, "tokens": 0, "cost": ZERO}
        )
        for bucket in (row, model_row):
            bucket["messages"] += 1
            if billable:
                bucket["tokens"] += message.tokens
                bucket["cost"] += message.cost_usd or ZERO

    valid, detail = integrity.session_integrity(
        session, messages=rows.messages, segments=rows.segments, streams=rows.streams
    )
    return {
        **session_as_dict(session),
        "by_client": [
            {
                "client": clients[pk].slug,
                "seconds": row["seconds"],
                "messages": row["messages"],
                "tokens": row["tokens"],
                "cost_usd": money(row["cost"]),
            }
            for pk, row in by_client.items()
        ],
        "by_model": [
            {"model": model, "messages": row["messages"], "tokens": row["tokens"], "cost_usd": money(row["cost"])}
            for model, row in by_model.items()
        ],
        "context_streams": [stream_as_dict(stream) for stream in rows.streams],
        "integrity": {"valid": valid, "detail": detail},
    }


def session_messages(*, session: ChatSession) -> QuerySet[SessionMessage]:
    return session.messages.select_related("domain").order_by("seq")
