"""The JSON shapes the REST API answers with (docs/DESIGN.md "Shapes"), as TypedDicts.

`selectors` builds them; `sessions_app/openapi.json` describes the same shapes to outside
callers, and a test holds every real answer to it. Money is a string with six decimals, times
are ISO 8601 with an offset, clients are slugs.
"""

from __future__ import annotations

from typing import TypedDict


class SessionShape(TypedDict):
    session_id: str
    status: str
    client: str
    brand: str | None
    model: str
    name: str
    started_at: str
    ended_at: str | None
    duration_seconds: int | None
    total_messages: int
    total_tokens: int
    total_cost_usd: str
    hidden: bool
    parent: str | None
    branched_at_seq: int | None
    continued_from: str | None


class MessageShape(TypedDict):
    message_id: str
    seq: int
    role: str
    content: str
    status: str
    model: str
    provider: str
    client: str
    timestamp: str
    prompt_tokens: int
    completion_tokens: int
    tokens: int
    token_source: str
    cost_usd: str | None
    context_omitted: int
    error: str
    author: str | None


class ChatAnswerShape(MessageShape):
    """The chat answer: the assistant message plus the session with its new totals."""

    session: SessionShape


class StreamShape(TypedDict):
    """A switch's answer: the context stream it recorded."""

    stream_id: str
    source_model: str
    target_model: str
    source_client: str
    target_client: str
    reason: str
    message_count: int
    omitted_count: int
    total_tokens: int
    cost_usd: str | None
    settled: bool
    streamed_at: str


class ClientPartShape(TypedDict):
    client: str
    seconds: int
    messages: int
    tokens: int
    cost_usd: str
    unpriced_calls: int
    invoice: str | None


class ModelPartShape(TypedDict):
    model: str
    messages: int
    tokens: int
    cost_usd: str
    unpriced_calls: int


class IntegrityShape(TypedDict):
    valid: bool
    detail: str


class ParticipantShape(TypedDict):
    user: str
    name: str
    role: str
    invited_at: str | None
    revoked_at: str | None
    messages: int


class SummaryShape(SessionShape):
    by_client: list[ClientPartShape]
    by_model: list[ModelPartShape]
    unpriced_calls: int
    context_streams: list[StreamShape]
    integrity: IntegrityShape
    participants: list[ParticipantShape]


class InvitationShape(TypedDict):
    user: str
    invited_by: str | None
    invited_at: str | None
    revoked_at: str | None
    live: bool


class LineageShape(TypedDict):
    session_id: str
    name: str
    status: str
    source: str
    client: str
    started_at: str | None
    branched_at_seq: int | None
    total_messages: int
