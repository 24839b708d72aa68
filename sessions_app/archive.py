"""Retention: move old ended sessions' messages out of the hot table, and put them back.

An archived session keeps its row, totals, segments, context streams and seal; only its
messages move into `ChatSession.archive_blob` (zlib-compressed JSON, every field kept,
including ids, hashes and the usage rows that pointed at each message) and `archived_at`
is set. `archive_restore` re-creates the very same rows. Nothing is deleted that cannot be
put back, and sessions on an invoice are never archived: their messages stay where billing
can see them. What billing needs of each billable message (client, time, tokens, cost) stays
in the hot database as a `billing.ArchivedMessageCost` row, so archiving never removes anything
from reports or future invoices.
"""

from __future__ import annotations

import json
import re
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Exists, OuterRef, QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from billing.models import ArchivedMessageCost, ClientDomain, LLMUsage
from sessions_app.errors import BadInput
from sessions_app.models import ChatSession, SessionMessage, SessionStatus

ARCHIVE_FORMAT = 1
AGE_MALFORMED = "Give an age like 90d, 12w, 36h or 90 (days), got {raw!r}."
NOT_ARCHIVED = "Session {session_id} is not archived."
ALREADY_ARCHIVED = "Session {session_id} is already archived."
NOT_ELIGIBLE_ACTIVE = "Session {session_id} is still active; only ended sessions are archived."
NOT_ELIGIBLE_INVOICED = "Session {session_id} is on an invoice; invoiced sessions are never archived."
NOT_ELIGIBLE_COPIED = "Session {session_id} has messages copied into a branch; archive the branch first."

_UNITS = {"d": "days", "h": "hours", "w": "weeks", "m": "minutes"}

# Every message field, by attribute name; foreign keys by their id column.
_FIELDS = (
    "message_id",
    "seq",
    "role",
    "content",
    "timestamp",
    "model",
    "provider",
    "domain_id",
    "prompt_tokens",
    "completion_tokens",
    "tokens",
    "token_source",
    "cost_usd",
    "status",
    "error_text",
    "shared_to_domains",
    "shared_to_models",
    "hash",
    "copied_from_id",
    "is_imported",
    "context_omitted",
    "author_id",
)
_UUIDS = {"message_id", "domain_id", "copied_from_id"}
# Fields added after archives were first written: an older archive has none (read as None).
_LATER_FIELDS = {"author_id"}


def parse_age(raw: str) -> timedelta:
    """`90d`, `12w`, `36h`, `30m` or a bare number of days."""
    match = re.fullmatch(r"\s*(\d+)\s*([dhwm]?)\s*", str(raw or "").lower())
    if not match or int(match.group(1)) == 0:
        raise BadInput(AGE_MALFORMED.format(raw=raw))
    return timedelta(**{_UNITS[match.group(2) or "d"]: int(match.group(1))})


def _copied_elsewhere(session_ref) -> Exists:
    return Exists(SessionMessage.objects.filter(copied_from__session=session_ref).exclude(session=session_ref))


def archive_candidates(*, older_than: timedelta, now: datetime | None = None) -> QuerySet:
    """Ended, unarchived, uninvoiced sessions that ended before now - older_than."""
    cutoff = (now or timezone.now()) - older_than
    return (
        ChatSession.objects.filter(status=SessionStatus.ENDED, ended_at__lt=cutoff, archived_at__isnull=True)
        .filter(invoice__isnull=True)
        .exclude(_copied_elsewhere(OuterRef("pk")))
        .order_by("ended_at")
    )


def skipped_candidates(*, older_than: timedelta, now: datetime | None = None) -> QuerySet:
    """Old ended sessions that stay in the hot table, and will be reported as such."""
    cutoff = (now or timezone.now()) - older_than
    old = ChatSession.objects.filter(status=SessionStatus.ENDED, ended_at__lt=cutoff, archived_at__isnull=True)
    return old.exclude(pk__in=archive_candidates(older_than=older_than, now=now).values("pk"))


def _encode(value):
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


def _message_record(message: SessionMessage, usage_ids: list[str]) -> dict:
    record = {name: _encode(getattr(message, name)) for name in _FIELDS}
    record["usage_ids"] = usage_ids
    return record


def _pack(records: list[dict]) -> bytes:
    payload = {"format": ARCHIVE_FORMAT, "messages": records}
    return zlib.compress(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode(), level=9)


def unpack_archive(blob: bytes | memoryview) -> list[dict]:
    """The archived message records, in seq order."""
    payload = json.loads(zlib.decompress(bytes(blob)))
    if payload.get("format") != ARCHIVE_FORMAT:
        raise BadInput(f"Unknown archive format {payload.get('format')!r}.")
    return sorted(payload["messages"], key=lambda record: record["seq"])


def stored_messages(session: ChatSession, *, related: tuple[str, ...] = ()) -> list[SessionMessage]:
    """A session's messages in seq order, live or (after retention moved them) from its archive.

    The one way to read a whole session's messages whatever its retention state. `related`
    names the relations the caller reads (`"domain"`, `"author"`): loaded in one query either way.
    """
    if session.archived_at is None or session.archive_blob is None:
        return list(SessionMessage.objects.filter(session_id=session.pk).select_related(*related).order_by("seq"))
    messages = archived_messages(session)
    if "domain" in related:
        clients = ClientDomain.objects.in_bulk({m.domain_id for m in messages})
        for message in messages:
            message.domain = clients[message.domain_id]
    if "author" in related:
        people = get_user_model().objects.in_bulk({m.author_id for m in messages if m.author_id})
        for message in messages:
            message.author = people.get(message.author_id) if message.author_id else None
    return messages


def archived_messages(session: ChatSession) -> list[SessionMessage]:
    """Unsaved SessionMessage objects for an archived session (for history and export)."""
    return [_message_from_record(session, record) for record in unpack_archive(session.archive_blob)]


def archived_state(session: ChatSession) -> tuple[list[SessionMessage], list[LLMUsage]]:
    """An archived session's messages and usage rows, linked again in memory (for checks)."""
    records = unpack_archive(session.archive_blob)
    messages = [_message_from_record(session, record) for record in records]
    clients = ClientDomain.objects.in_bulk({m.domain_id for m in messages})
    for message in messages:
        message.domain = clients[message.domain_id]
    owner = {usage_id: record["message_id"] for record in records for usage_id in record["usage_ids"]}
    usage = list(session.usage.all())
    for row in usage:
        if row.message_id is None and str(row.pk) in owner:
            row.message_id = uuid.UUID(owner[str(row.pk)])
    return messages, usage


def _message_from_record(session: ChatSession, record: dict) -> SessionMessage:
    values = {}
    for name in _FIELDS:
        value = record.get(name) if name in _LATER_FIELDS else record[name]
        if name == "timestamp":
            value = parse_datetime(value)
        elif name == "cost_usd" and value is not None:
            value = Decimal(value)
        elif name in _UUIDS and value is not None:
            value = uuid.UUID(value)
        values[name] = value
    return SessionMessage(session=session, **values)


@dataclass
class ArchiveResult:
    archived: list[ChatSession] = field(default_factory=list)
    messages: int = 0
    bytes_before: int = 0
    bytes_after: int = 0


def session_archive(*, session_id) -> tuple[int, int, int]:
    """Archive one session; return (messages moved, raw bytes, compressed bytes)."""
    with transaction.atomic():
        session = ChatSession.objects.select_for_update().get(pk=session_id)
        if session.archived_at is not None:
            raise BadInput(ALREADY_ARCHIVED.format(session_id=session.pk))
        if session.status != SessionStatus.ENDED:
            raise BadInput(NOT_ELIGIBLE_ACTIVE.format(session_id=session.pk))
        if session.invoice_id is not None:
            raise BadInput(NOT_ELIGIBLE_INVOICED.format(session_id=session.pk))
        if SessionMessage.objects.filter(copied_from__session=session).exclude(session=session).exists():
            raise BadInput(NOT_ELIGIBLE_COPIED.format(session_id=session.pk))
        messages = list(session.messages.order_by("seq"))
        usage_by_message: dict = {}
        for usage_id, message_id in LLMUsage.objects.filter(message__session=session).values_list("id", "message_id"):
            usage_by_message.setdefault(message_id, []).append(str(usage_id))
        records = [_message_record(m, usage_by_message.get(m.message_id, [])) for m in messages]
        raw_size = len(json.dumps(records, ensure_ascii=False).encode())
        blob = _pack(records)
        ArchivedMessageCost.objects.bulk_create(
            ArchivedMessageCost(
                session=session,
                domain_id=m.domain_id,
                seq=m.seq,
                role=m.role,
                timestamp=m.timestamp,
                model=m.model,
                tokens=m.tokens,
                cost_usd=m.cost_usd,
            )
            for m in messages
            if m.copied_from_id is None and not m.is_imported
        )
        # Deleting the rows sets the usage rows' message link to NULL; the blob keeps it.
        session.messages.all().delete()
        session.archive_blob = blob
        session.archived_at = timezone.now()
        session.save(update_fields=["archive_blob", "archived_at"])
    return len(records), raw_size, len(blob)


def sessions_archive(*, older_than: timedelta, dry_run: bool = False, now: datetime | None = None) -> ArchiveResult:
    """Archive every eligible session; each in its own transaction."""
    result = ArchiveResult()
    for session in archive_candidates(older_than=older_than, now=now).select_related("domain"):
        if dry_run:
            result.archived.append(session)
            result.messages += session.total_messages
            continue
        moved, raw_size, packed = session_archive(session_id=session.pk)
        result.archived.append(session)
        result.messages += moved
        result.bytes_before += raw_size
        result.bytes_after += packed
    return result


def session_restore(*, session_id) -> int:
    """Put an archived session's messages back exactly; return how many."""
    with transaction.atomic():
        session = ChatSession.objects.select_for_update().get(pk=session_id)
        if session.archived_at is None or session.archive_blob is None:
            raise BadInput(NOT_ARCHIVED.format(session_id=session.pk))
        records = unpack_archive(session.archive_blob)
        messages = [_message_from_record(session, record) for record in records]
        SessionMessage.objects.bulk_create(messages)
        ArchivedMessageCost.objects.filter(session=session).delete()  # the messages bill again
        for record in records:
            if record["usage_ids"]:
                LLMUsage.objects.filter(id__in=record["usage_ids"], message__isnull=True).update(
                    message_id=record["message_id"]
                )
        session.archive_blob = None
        session.archived_at = None
        session.save(update_fields=["archive_blob", "archived_at"])
    return len(messages)
