"""Reads: load sessions for a user, list them, and the JSON shapes of DESIGN.md ("Shapes")."""

from __future__ import annotations

import uuid
from collections import OrderedDict
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db.models import Q, QuerySet
from django.utils import timezone

from billing.models import ClientDomain, InvoiceLine
from billing.money import api_amount
from billing.reports import allocate_seconds  # one rule: the reports cut seconds the same way
from sessions_app import integrity
from sessions_app.errors import SESSION_NOT_FOUND, BadInput, NotFound
from sessions_app.models import ChatSession, ContextStream, SessionMessage, SessionStatus

ZERO = Decimal("0")


# Money leaves the API as a string with six decimals (no rounding beyond storage).
money = api_amount


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


def _client_seconds(session: ChatSession, clients: dict) -> OrderedDict:
    segments = list(session.segments.order_by("started_at", "id"))
    until = session.ended_at or timezone.now()
    spans = [(seg.started_at, seg.ended_at or until) for seg in segments]
    seconds: OrderedDict = OrderedDict()
    for seg, amount in zip(segments, allocate_seconds(spans, session.started_at), strict=True):
        seconds[seg.domain_id] = seconds.get(seg.domain_id, 0) + amount
    return seconds


def session_summary(*, session: ChatSession) -> dict[str, Any]:
    """Duration, totals, by client (seconds, messages, tokens, cost), by model, streams, integrity."""
    if session.archived_at is not None:
        # Archived (retention): the messages live compressed on the session row.
        from sessions_app.archive import archived_messages

        messages = [
            (m.domain_id, m.model, m.tokens, m.cost_usd, m.copied_from_id, m.is_imported, m.role)
            for m in archived_messages(session)
        ]
    else:
        messages = list(
            session.messages.order_by("seq").values_list(
                "domain_id", "model", "tokens", "cost_usd", "copied_from_id", "is_imported", "role"
            )
        )
    clients = {
        c.pk: c
        for c in ClientDomain.objects.filter(
            Q(pk=session.domain_id)
            | Q(segments__session=session)
            | Q(messages__session=session)
            | Q(pk__in={row[0] for row in messages})
        ).distinct()
    }
    seconds = _client_seconds(session, clients)

    by_client: OrderedDict = OrderedDict(
        (pk, {"seconds": s, "messages": 0, "tokens": 0, "cost": ZERO, "unpriced": 0}) for pk, s in seconds.items()
    )
    by_model: OrderedDict = OrderedDict()
    for domain_id, model, tokens, cost, copied_from, imported, role in messages:
        billable = copied_from is None and not imported
        row = by_client.setdefault(domain_id, {"seconds": 0, "messages": 0, "tokens": 0, "cost": ZERO, "unpriced": 0})
        model_row = by_model.setdefault(
            model or session.current_model, {"messages": 0, "tokens": 0, "cost": ZERO, "unpriced": 0}
        )
        for bucket in (row, model_row):
            bucket["messages"] += 1
            if billable:
                bucket["tokens"] += tokens
                bucket["cost"] += cost or ZERO
                # A call with no known price is never shown as free: counted and flagged.
                bucket["unpriced"] += int(cost is None and role != "user")
    # Each client's part names the invoice that billed it (issued, not voided), if any.
    invoices = dict(InvoiceLine.objects.billed().filter(session=session).values_list("client_id", "invoice__number"))

    streams = list(session.context_streams.select_related("source_domain", "target_domain").order_by("streamed_at"))
    valid, detail = integrity.verify_session(session)
    return {
        **session_as_dict(session),
        "by_client": [
            {
                "client": clients[pk].slug,
                "seconds": row["seconds"],
                "messages": row["messages"],
                "tokens": row["tokens"],
                "cost_usd": money(row["cost"]),
                "unpriced_calls": row["unpriced"],
                "invoice": invoices.get(pk),
            }
            for pk, row in by_client.items()
        ],
        "by_model": [
            {
                "model": model,
                "messages": row["messages"],
                "tokens": row["tokens"],
                "cost_usd": money(row["cost"]),
                "unpriced_calls": row["unpriced"],
            }
            for model, row in by_model.items()
        ],
        "unpriced_calls": sum(row["unpriced"] for row in by_client.values()),
        "context_streams": [stream_as_dict(stream) for stream in streams],
        "integrity": {"valid": valid, "detail": detail},
    }


def session_messages(*, session: ChatSession) -> QuerySet[SessionMessage]:
    return session.messages.select_related("domain").order_by("seq")
