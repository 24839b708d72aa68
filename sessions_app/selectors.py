"""Reads: load sessions for a user, list them, and the JSON shapes of docs/DESIGN.md ("Shapes")."""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, overload

from django.contrib.auth import get_user_model
from django.db.models import Q, QuerySet
from django.utils import timezone

from billing.models import ClientDomain, InvoiceLine
from billing.money import api_amount
from billing.reports import allocate_seconds  # one rule: the reports cut seconds the same way
from sessions_app import integrity
from sessions_app.archive import stored_messages
from sessions_app.errors import NOT_OWNER, SESSION_NOT_FOUND, BadInput, NotFound, NotOwner
from sessions_app.models import (
    ChatSession,
    ContextStream,
    SessionInvitation,
    SessionMessage,
    SessionSegment,
    SessionStatus,
)
from sessions_app.shapes import (
    ChatAnswerShape,
    InvitationShape,
    LineageShape,
    MessageShape,
    ParticipantShape,
    SessionShape,
    StreamShape,
    SummaryShape,
)

HIDDEN_CHOICES = ("exclude", "include", "only")
BAD_HIDDEN = "'hidden' must be one of exclude, include, only."

ZERO = Decimal("0")


# Money leaves the API as a string with six decimals (no rounding beyond storage).
money = api_amount


@overload
def iso(value: datetime) -> str: ...
@overload
def iso(value: datetime | None) -> str | None: ...
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
    sessions = ChatSession.objects.select_related("domain", "brand")
    # The owner's (or staff's) own query first: it is the common case and builds no subquery
    # (bench/access.py); a session shared with the user is found by the full rule.
    try:
        return sessions.owned_by(user).get(pk=pk)
    except ChatSession.DoesNotExist:
        if user.is_staff:
            raise NotFound(SESSION_NOT_FOUND) from None
    try:
        return sessions.participating(user).get(pk=pk)
    except ChatSession.DoesNotExist:
        raise NotFound(SESSION_NOT_FOUND) from None


def session_get_for_owner(*, session_id, user) -> ChatSession:
    """The session if the user owns it (or is staff); NotOwner for an invited consultant.

    What only the owner may do (end, rename, hide, share) loads the session through here; the
    uninvited still get NotFound, so ids cannot be probed.
    """
    session = session_get_for_user(session_id=session_id, user=user)
    if session.user_id != user.pk and not user.is_staff:
        raise NotOwner(NOT_OWNER)
    return session


def session_is_shared_with(*, session: ChatSession, user) -> bool:
    """Whether `user` holds a live invitation to the session."""
    return SessionInvitation.objects.live().filter(session=session, user=user).exists()


def session_get_for_participant(*, session_id, user) -> ChatSession:
    """The session if the user takes part in it (owner or invited); staff who are neither get NotFound.

    For the live chat socket: staff review others' sessions in the admin, they do not join them.
    """
    pk = parse_session_id(session_id)
    if user is None or not getattr(user, "is_authenticated", False):
        raise NotFound(SESSION_NOT_FOUND)
    sessions = ChatSession.objects.select_related("domain", "brand")
    # The owner's own query first, as in `session_get_for_user`: no subquery to build.
    own = sessions.filter(user=user, pk=pk).first()
    if own is not None:
        return own
    try:
        return sessions.participating(user).get(pk=pk)
    except ChatSession.DoesNotExist:
        raise NotFound(SESSION_NOT_FOUND) from None


def session_list(
    *, user, client=None, status=None, start=None, end=None, hidden: str = "exclude"
) -> QuerySet[ChatSession]:
    """The user's sessions (staff: everyone's), newest first; `client` matches any client billed.

    Hidden sessions are left out unless `hidden` is "include" (all) or "only" (just those).
    """
    if hidden not in HIDDEN_CHOICES:
        raise BadInput(BAD_HIDDEN)
    qs = ChatSession.objects.for_user(user).select_related("domain", "brand")
    if hidden == "exclude":
        qs = qs.listed()
    elif hidden == "only":
        qs = qs.filter(hidden_at__isnull=False)
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


def session_as_dict(session: ChatSession) -> SessionShape:
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
        "hidden": session.hidden_at is not None,
        "parent": str(session.parent_id) if session.parent_id else None,
        "branched_at_seq": session.branched_at_seq,
        "continued_from": str(session.continued_from_id) if session.continued_from_id else None,
    }


def author_name(message: SessionMessage) -> str | None:
    """Who typed the message (a username), or None for answers and for messages from before authors."""
    return message.author.get_username() if message.author_id else None


def message_as_dict(message: SessionMessage) -> MessageShape:
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
        "author": author_name(message),
    }


def chat_answer_as_dict(message: SessionMessage, session: ChatSession) -> ChatAnswerShape:
    """The chat answer: the assistant message plus the session with its new totals."""
    return {**message_as_dict(message), "session": session_as_dict(session)}


def stream_as_dict(stream: ContextStream) -> StreamShape:
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


@dataclass
class SessionRows:
    """A session's own rows, each read once by an index on the session: what a summary and a
    verification need. Nothing here joins through a client, so the cost is linear in the
    session's rows whatever the size of its clients' history."""

    messages: list[SessionMessage]  # in seq order; from the archive when retention moved them
    segments: list[SessionSegment]  # in time order
    streams: list[ContextStream]  # in time order, with their clients


def session_rows(session: ChatSession) -> SessionRows:
    messages = stored_messages(session)
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


def session_summary(*, session: ChatSession, rows: SessionRows | None = None) -> SummaryShape:
    """Duration, totals, by client (seconds, messages, tokens, cost), by model, streams, integrity.

    Reads the session's messages, segments and context streams once each, and the clients
    they name by primary key (`rows`, when the caller has them, saves those reads).
    """
    rows = rows or session_rows(session)
    client_ids = {session.domain_id, *(m.domain_id for m in rows.messages), *(s.domain_id for s in rows.segments)}
    clients = ClientDomain.objects.in_bulk(client_ids)
    seconds = _client_seconds(session, rows.segments)

    by_client: OrderedDict = OrderedDict(
        (pk, {"seconds": s, "messages": 0, "tokens": 0, "cost": ZERO, "unpriced": 0}) for pk, s in seconds.items()
    )
    by_model: OrderedDict = OrderedDict()
    for message in rows.messages:
        billable = message.copied_from_id is None and not message.is_imported
        row = by_client.setdefault(
            message.domain_id, {"seconds": 0, "messages": 0, "tokens": 0, "cost": ZERO, "unpriced": 0}
        )
        model_row = by_model.setdefault(
            message.model or session.current_model, {"messages": 0, "tokens": 0, "cost": ZERO, "unpriced": 0}
        )
        for bucket in (row, model_row):
            bucket["messages"] += 1
            if billable:
                bucket["tokens"] += message.tokens
                bucket["cost"] += message.cost_usd or ZERO
                # A call with no known price is never shown as free: counted and flagged.
                bucket["unpriced"] += int(message.cost_usd is None and message.role != "user")
    # Each client's part names the invoice that billed it (issued, not voided), if any.
    invoices = dict(InvoiceLine.objects.billed().filter(session=session).values_list("client_id", "invoice__number"))

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
        "context_streams": [stream_as_dict(stream) for stream in rows.streams],
        "integrity": {"valid": valid, "detail": detail},
        "participants": session_participants(session=session, messages=rows.messages),
    }


def session_messages(*, session: ChatSession) -> QuerySet[SessionMessage]:
    return session.messages.select_related("domain", "author").order_by("seq")


# --- Conversation tools: lineage, versions, participants ------------------------------------

PREVIEW_CHARS = 120


def _lineage_row(session: ChatSession) -> LineageShape:
    return {
        "session_id": str(session.session_id),
        "name": str(session),
        "status": session.status,
        "source": session.source,
        "client": session.domain.slug,
        "started_at": iso(session.started_at),
        "branched_at_seq": session.branched_at_seq,
        "total_messages": session.total_messages,
    }


def _family(session: ChatSession) -> dict:
    """Every session linked to this one by branching (ancestors and all their descendants), by pk."""
    fields = ("pk", "parent_id", "branched_at_seq", "total_messages", "started_at")
    root = session.pk
    parent = session.parent_id
    seen = {root}
    while parent is not None and parent not in seen:  # walk up (a cycle cannot be made, but never loop)
        seen.add(parent)
        root = parent
        parent = ChatSession.objects.filter(pk=parent).values_list("parent_id", flat=True).first()
    nodes = {row[0]: row for row in ChatSession.objects.filter(pk=root).values_list(*fields)}
    frontier = [root]
    while frontier:
        children = list(ChatSession.objects.filter(parent_id__in=frontier).values_list(*fields))
        frontier = [row[0] for row in children if row[0] not in nodes]
        nodes.update((row[0], row) for row in children)
    return nodes


def _origin(nodes: dict, pk, seq: int):
    """The session that wrote message `seq` of session `pk` (a copy's original, up the branches)."""
    node = nodes[pk]
    while node[1] is not None and node[1] in nodes and node[2] is not None and seq <= node[2]:
        node = nodes[node[1]]
    return node[0]


def session_versions(*, session: ChatSession, user) -> dict[str, Any]:
    """Where this conversation forks: its parent, branches, continuations, and per message the versions.

    A version of message N is another session the user may see that shares messages 1..N-1
    with this one and differs at N (an edit, a regeneration, or a branch that went on
    differently). Each version is named by the session that first wrote it.
    """
    nodes = _family(session)
    visible_qs = ChatSession.objects.for_user(user).filter(pk__in=list(nodes)).select_related("domain")
    visible = {s.pk: s for s in visible_qs}
    points = sorted({row[2] + 1 for row in nodes.values() if row[2] is not None})
    last = session.total_messages
    positions = []
    wanted: dict[tuple, int] = {}
    for seq in (p for p in points if 1 <= p <= last):
        prefix = _origin(nodes, session.pk, seq - 1) if seq > 1 else None
        groups: dict = {}
        for pk, row in nodes.items():
            if row[3] < seq or (seq > 1 and _origin(nodes, pk, seq - 1) != prefix):
                continue
            groups.setdefault(_origin(nodes, pk, seq), []).append(pk)
        shown = []
        current = _origin(nodes, session.pk, seq)
        for origin, members in groups.items():
            seen = [pk for pk in members if pk in visible]
            if not seen:
                continue
            # The session that wrote this version, else the earliest one the user may see.
            holder = origin if origin in visible else min(seen, key=lambda pk: nodes[pk][4])
            if origin == current:
                holder = session.pk
            shown.append((nodes[origin][4], origin == current, holder))
        if len(shown) > 1:
            shown.sort(key=lambda item: (item[0], str(item[2])))
            positions.append((seq, shown))
            for _, _, holder in shown:
                wanted[(holder, seq)] = 0
    texts: dict[tuple, tuple[str, str]] = {}
    if wanted:
        condition = Q()
        for holder, seq in wanted:
            condition |= Q(session_id=holder, seq__in=(seq, seq + 1))
        for sid, seq, role, content in SessionMessage.objects.filter(condition).values_list(
            "session_id", "seq", "role", "content"
        ):
            texts[(sid, seq)] = (role, content)
    versions = []
    for seq, shown in positions:
        at = seq
        asked = {texts.get((holder, seq)) for _, _, holder in shown}
        if len(asked) == 1 and next(iter(asked), ("", ""))[0] == "user":
            # The same question asked again (a regeneration): the versions differ in the answer.
            at = seq + 1
        entries = []
        for index, (_, is_current, holder) in enumerate(shown, start=1):
            role, content = texts.get((holder, at), ("", ""))
            entries.append(
                {
                    **_lineage_row(visible[holder]),
                    "index": index,
                    "current": is_current,
                    "role": role,
                    "preview": content[:PREVIEW_CHARS],
                }
            )
        versions.append({"seq": at, "count": len(entries), "versions": entries})
    parent = visible.get(session.parent_id)
    return {
        "session_id": str(session.session_id),
        "parent": _lineage_row(parent) if parent else None,
        "branches": [
            _lineage_row(s) for s in sorted(visible.values(), key=lambda s: s.started_at) if s.parent_id == session.pk
        ],
        "continued_from": _lineage_row(session.continued_from)
        if session.continued_from_id
        and ChatSession.objects.for_user(user).filter(pk=session.continued_from_id).exists()
        else None,
        "continuations": [
            _lineage_row(s)
            for s in ChatSession.objects.for_user(user)
            .filter(continued_from=session)
            .select_related("domain")
            .order_by("started_at")
        ],
        "versions": versions,
    }


def session_participants(
    *, session: ChatSession, messages: list[SessionMessage] | None = None
) -> list[ParticipantShape]:
    """Who took part: the owner, then each invited consultant (their latest invitation), with messages typed.

    Counts from `messages` when the caller has read them (a summary has), so an archived
    session counts too; then one query for the invitations and at most one for the people.
    """
    if messages is None:
        messages = session_rows(session).messages
    typed: dict[int | None, int] = {}
    for message in messages:
        if message.role == "user" and message.copied_from_id is None:
            typed[message.author_id] = typed.get(message.author_id, 0) + 1
    # Messages from before authors were recorded were the owner's.
    owner_typed = typed.pop(None, 0) + typed.pop(session.user_id, 0)
    latest: dict = {}
    for invitation in SessionInvitation.objects.filter(session=session).select_related("user").order_by("created_at"):
        latest[invitation.user_id] = invitation
    others = [pk for pk in typed if pk not in latest]  # staff, who may write without an invitation
    wanted = {pk for pk in [session.user_id, *others] if pk is not None}
    if "user" in session._state.fields_cache:
        wanted.discard(session.user_id)
    people = get_user_model().objects.in_bulk(wanted) if wanted else {}
    owner = people.get(session.user_id) or session.user
    rows = [_participant(owner, "owner", None, owner_typed)]
    for user_id, invitation in latest.items():
        rows.append(_participant(invitation.user, "invited", invitation, typed.pop(user_id, 0)))
    for pk in others:
        if pk in people:
            rows.append(_participant(people[pk], "staff", None, typed[pk]))
    return rows


def _participant(user, role: str, invitation, messages: int) -> ParticipantShape:
    return {
        "user": user.get_username(),
        "name": user.get_full_name() or user.get_username(),
        "role": role,
        "invited_at": iso(invitation.created_at) if invitation else None,
        "revoked_at": iso(invitation.revoked_at) if invitation else None,
        "messages": messages,
    }


def invitation_as_dict(invitation) -> InvitationShape:
    return {
        "user": invitation.user.get_username(),
        "invited_by": invitation.invited_by.get_username() if invitation.invited_by_id else None,
        "invited_at": iso(invitation.created_at),
        "revoked_at": iso(invitation.revoked_at),
        "live": invitation.revoked_at is None,
    }
