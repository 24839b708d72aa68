"""Export a session to a versioned JSON document, and import one back as a new session.

The document (format `billable-sessions/session`, version 1) holds the session's fields,
every message with every field (its hash included), the segments, the context streams and
the seal, with times in canonical UTC and money as six-decimal strings, so anyone holding
the public signing key can verify it offline.

Import checks the document's shape first, then recomputes the hash chain and checks the
seal against the data in the file. A malformed or tampered file is refused with an error
naming the field at fault, and nothing is written. Anyone can recompute a hash chain, and
anyone can seal with a key of their own: a file is valid only when a key this server trusts
sealed it (its own, or one in `SESSION_TRUSTED_KEYS`); any other is stored as "unverified:
not sealed by a trusted key", never as valid. A sound file becomes a new ended session
(`source=import`) whose messages are `is_imported` and therefore never billed again; the
file's seal, original message hashes and source fields are kept in `imported_seal`, and the
new session gets its own chain and seal from this server.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from types import SimpleNamespace
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.db import transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from billing.models import ClientDomain
from sessions_app import boundary, integrity
from sessions_app.archive import stored_messages
from sessions_app.errors import BadInput
from sessions_app.models import (
    ChatSession,
    EndReason,
    MessageRole,
    MessageStatus,
    SessionMessage,
    SessionSegment,
    SessionSource,
    SessionStatus,
)
from sessions_app.services.store import chain_link

FORMAT_NAME = "billable-sessions/session"
FORMAT_VERSION = 1
MAX_IMPORT_BYTES = 50 * 1024 * 1024

NOT_JSON = "The file is not JSON: {error}."
NOT_AN_EXPORT = "The file is not a session export (its 'format' is {found!r}, expected {expected!r})."
UNSUPPORTED_VERSION = "The file is format version {found!r}; this server reads version {expected}."
FILE_TOO_LARGE = "The file is {size:,} bytes; the limit is {limit:,}."
UNKNOWN_IMPORT_CLIENT = "The file's client {slug!r} does not exist here; name one with --client SLUG."
IMPORT_CLIENT_NOT_ALLOWED = "You may not bill client {slug!r}."
TAMPERED = "The file was altered after export: {detail}."


class ImportInvalid(BadInput):
    """A malformed or tampered import file; nothing was written."""

    code = "invalid_import"


@dataclass(frozen=True)
class ImportResult:
    session: ChatSession
    valid: bool  # sealed by a trusted key, and the chain and seal check out (then also `trusted`)
    trusted: bool  # sealed by this server's own key or one listed in SESSION_TRUSTED_KEYS
    detail: str

    def as_dict(self) -> dict:
        return {
            "session_id": str(self.session.session_id),
            "messages": self.session.total_messages,
            "integrity": {"valid": self.valid, "trusted": self.trusted, "detail": self.detail},
        }


# --- export ---------------------------------------------------------------------------------

_time = integrity.canonical_time
_money = integrity.canonical_money


def _message_record(message: SessionMessage) -> dict:
    return {
        "message_id": str(message.message_id),
        "seq": message.seq,
        "role": message.role,
        "content": message.content,
        "timestamp": _time(message.timestamp),
        "model": message.model,
        "provider": message.provider,
        "client": message.domain.slug,
        "client_id": str(message.domain_id),
        "prompt_tokens": message.prompt_tokens,
        "completion_tokens": message.completion_tokens,
        "tokens": message.tokens,
        "token_source": message.token_source,
        "cost_usd": _money(message.cost_usd),
        "status": message.status,
        "error_text": message.error_text,
        "shared_to_domains": message.shared_to_domains,
        "shared_to_models": message.shared_to_models,
        "hash": message.hash,
        "copied_from": str(message.copied_from_id) if message.copied_from_id else None,
        "is_imported": message.is_imported,
        "context_omitted": message.context_omitted,
    }


def _messages_of(session: ChatSession) -> list[SessionMessage]:
    return stored_messages(session, related=("domain",))


def session_export(*, session: ChatSession) -> dict:
    """The session as a version-1 export document (a dict ready for json.dumps)."""
    segments = [
        {
            "client": seg.domain.slug,
            "client_id": str(seg.domain_id),
            "brand": seg.brand.name if seg.brand_id else None,
            "model": seg.model,
            "started_at": _time(seg.started_at),
            "ended_at": _time(seg.ended_at),
        }
        for seg in session.segments.select_related("domain", "brand").order_by("started_at", "id")
    ]
    streams = [
        {
            "stream_id": str(stream.stream_id),
            "source_model": stream.source_model,
            "target_model": stream.target_model,
            "source_client": stream.source_domain.slug,
            "source_client_id": str(stream.source_domain_id),
            "target_client": stream.target_domain.slug,
            "target_client_id": str(stream.target_domain_id),
            "context_snapshot": stream.context_snapshot,
            "message_count": stream.message_count,
            "omitted_count": stream.omitted_count,
            "total_tokens": stream.total_tokens,
            "reason": stream.reason,
            "note": stream.note,
            "streamed_at": _time(stream.streamed_at),
            "cost_usd": _money(stream.cost_usd),
            "settled_at": _time(stream.settled_at),
        }
        for stream in session.context_streams.select_related("source_domain", "target_domain").order_by(
            "streamed_at", "stream_id"
        )
    ]
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "exported_at": _time(timezone.now()),
        "signing_key": {"algorithm": integrity.ALGORITHM, **_public_key()},
        "session": {
            "session_id": str(session.session_id),
            "name": session.name,
            "system_prompt": session.system_prompt,
            "user": session.user.get_username(),
            "user_id": str(session.user_id),
            "client": session.domain.slug,
            "client_id": str(session.domain_id),
            "brand": session.brand.name if session.brand_id else None,
            "status": session.status,
            "end_reason": session.end_reason,
            "source": session.source,
            "started_at": _time(session.started_at),
            "ended_at": _time(session.ended_at),
            "duration_seconds": session.duration_seconds,
            "last_activity_at": _time(session.last_activity_at),
            "primary_model": session.primary_model,
            "current_model": session.current_model,
            "total_messages": session.total_messages,
            "total_tokens": session.total_tokens,
            "estimated_cost_usd": _money(session.estimated_cost_usd),
            "parent": str(session.parent_id) if session.parent_id else None,
            "branched_at_seq": session.branched_at_seq,
            "invoice": session.invoice.number if session.invoice_id else None,
            "archived_at": _time(session.archived_at),
        },
        "messages": [_message_record(m) for m in _messages_of(session)],
        "segments": segments,
        "context_streams": streams,
        "seal": session.soulfra_hash,
        "imported": session.imported_seal,
    }


def _public_key() -> dict:
    raw = integrity.public_key_bytes()
    return {"key_id": integrity.key_id(raw), "public_key": base64.b64encode(raw).decode()}


def session_export_json(*, session: ChatSession) -> str:
    return json.dumps(session_export(session=session), ensure_ascii=False, indent=2) + "\n"


# --- validation -----------------------------------------------------------------------------


def _optional(kind: str) -> tuple[str, dict]:
    return kind, {"nullable": True}


def _one_of(choices) -> tuple[str, dict]:
    return "str", {"choices": list(choices)}


# What each record of an export holds: field name -> kind (see `_Checker.field`), or
# (kind, options) for a nullable field or a string with fixed choices.
SESSION_FIELDS = {
    "session_id": "uuid",
    "name": "str",
    "system_prompt": "str",
    "user_id": "str",
    "client": "str",
    "client_id": "uuid",
    "status": _one_of(SessionStatus.values),
    "end_reason": "str",
    "started_at": "time",
    "ended_at": _optional("time"),
    "duration_seconds": _optional("count"),
    "primary_model": "str",
    "current_model": "str",
    "total_messages": "count",
    "total_tokens": "count",
    "estimated_cost_usd": "money",
}
MESSAGE_FIELDS = {
    "message_id": "uuid",
    "role": _one_of(MessageRole.values),
    "content": "str",
    "timestamp": "time",
    "model": "str",
    "provider": "str",
    "client": "str",
    "client_id": "uuid",
    "prompt_tokens": "count",
    "completion_tokens": "count",
    "tokens": "count",
    "token_source": _one_of(["", "provider", "estimated"]),
    "cost_usd": _optional("money"),
    "status": _one_of(MessageStatus.values),
    "error_text": "str",
    "shared_to_domains": "list",
    "shared_to_models": "list",
    "copied_from": _optional("uuid"),
    "is_imported": "bool",
}
SEGMENT_FIELDS = {
    "client": "str",
    "client_id": "uuid",
    "model": "str",
    "started_at": "time",
    "ended_at": _optional("time"),
}
STREAM_FIELDS = {
    "stream_id": "uuid",
    "source_model": "str",
    "target_model": "str",
    "source_client_id": "uuid",
    "target_client_id": "uuid",
    "message_count": "count",
    "total_tokens": "count",
    "cost_usd": _optional("money"),
    "streamed_at": "time",
}


class _Checker:
    """Reads typed values out of the document, naming the path of the first bad one."""

    def fail(self, path: str, problem: str):
        raise ImportInvalid(f"{path}: {problem}.")

    def record(self, value, path: str, fields: dict) -> dict:
        """An object's fields, each read as its spec in `fields` says."""
        self.obj(value, path)
        out = {}
        for key, spec in fields.items():
            kind, options = (spec, {}) if isinstance(spec, str) else spec
            out[key] = self.field(value, key, path, kind, **options)
        return out

    def records(self, data: dict, key: str, fields: dict) -> list[dict]:
        return [
            self.record(item, f"{key}[{index}]", fields) for index, item in enumerate(self.field(data, key, "", "list"))
        ]

    def obj(self, value, path: str) -> dict:
        if not isinstance(value, dict):
            self.fail(path, "expected an object")
        return value

    def field(self, data: dict, key: str, path: str, kind: str, *, nullable: bool = False, choices=None):
        where = f"{path}.{key}" if path else key
        if key not in data:
            self.fail(where, "missing")
        value = data[key]
        if value is None:
            if nullable:
                return None
            self.fail(where, "must not be null")
        if kind == "str":
            if not isinstance(value, str):
                self.fail(where, "expected a string")
            if choices is not None and value not in choices:
                self.fail(where, f"{value!r} is not one of {', '.join(repr(c) for c in choices)}")
        elif kind == "count":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                self.fail(where, "expected a whole number, 0 or more")
        elif kind == "bool":
            if not isinstance(value, bool):
                self.fail(where, "expected true or false")
        elif kind == "time":
            parsed = parse_datetime(value) if isinstance(value, str) else None
            if parsed is None or parsed.tzinfo is None:
                self.fail(where, "expected an ISO 8601 time with a UTC offset")
            return parsed
        elif kind == "money":
            try:
                amount = Decimal(value) if isinstance(value, str) else None
            except InvalidOperation:
                amount = None
            if amount is None or not amount.is_finite() or amount < 0:
                self.fail(where, "expected an amount as a string, 0 or more")
            return amount
        elif kind == "uuid":
            try:
                return uuid.UUID(str(value))
            except ValueError:
                self.fail(where, "expected a UUID")
        elif kind == "list":
            if not isinstance(value, list):
                self.fail(where, "expected a list")
        return value


def _read(raw: str | bytes | dict) -> dict:
    if isinstance(raw, dict):
        return raw
    if len(raw) > MAX_IMPORT_BYTES:
        raise ImportInvalid(FILE_TOO_LARGE.format(size=len(raw), limit=MAX_IMPORT_BYTES))
    try:
        return boundary.load_json(raw)  # depth, Unicode and number limits, as every entry
    except boundary.InputRefused as refused:
        if refused.message != boundary.NOT_JSON:
            raise ImportInvalid(refused.message) from None
    try:
        json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ImportInvalid(NOT_JSON.format(error=exc)) from None
    raise ImportInvalid(NOT_JSON.format(error="not valid JSON"))


def _validate(data: Any) -> dict:
    """Check the document's shape and return parsed values; raise ImportInvalid naming the fault."""
    c = _Checker()
    if not isinstance(data, dict):
        raise ImportInvalid("The file is not a session export (expected a JSON object).")
    if data.get("format") != FORMAT_NAME:
        raise ImportInvalid(NOT_AN_EXPORT.format(found=data.get("format"), expected=FORMAT_NAME))
    if data.get("version") != FORMAT_VERSION:
        raise ImportInvalid(UNSUPPORTED_VERSION.format(found=data.get("version"), expected=FORMAT_VERSION))

    session = c.record(data.get("session"), "session", SESSION_FIELDS)

    messages = []
    seen: set[int] = set()
    for index, m in enumerate(c.field(data, "messages", "", "list")):
        path = f"messages[{index}]"
        c.obj(m, path)
        seq = c.field(m, "seq", path, "count")
        if seq == 0 or seq in seen:
            c.fail(f"{path}.seq", f"{seq} is zero or repeated")
        if messages and seq < messages[-1]["seq"]:
            c.fail(f"{path}.seq", "messages are not in seq order")
        seen.add(seq)
        digest = c.field(m, "hash", path, "str")
        if digest and (len(digest) != 64 or any(ch not in "0123456789abcdef" for ch in digest)):
            c.fail(f"{path}.hash", "expected 64 hex digits")
        messages.append(
            {
                "path": path,
                "seq": seq,
                "hash": digest,
                **c.record(m, path, MESSAGE_FIELDS),
                # Exports from before it was recorded have no `context_omitted`: none were omitted.
                "context_omitted": c.field({"context_omitted": 0, **m}, "context_omitted", path, "count"),
            }
        )

    segments = c.records(data, "segments", SEGMENT_FIELDS)
    streams = c.records(data, "context_streams", STREAM_FIELDS)

    seal = data.get("seal")
    if seal is not None:
        c.obj(seal, "seal")
        c.field(seal, "signature", "seal", "str")
        c.obj(seal.get("signed"), "seal.signed")
    if "signing_key" in data and data["signing_key"] is not None:
        c.obj(data["signing_key"], "signing_key")
    return {"session": session, "messages": messages, "segments": segments, "streams": streams, "seal": seal}


# --- verification ---------------------------------------------------------------------------


def _verify(doc: dict, raw: dict) -> tuple[bool, bool, str]:
    """Recompute the chain over the file's messages and check its seal.

    Returns (valid, trusted, detail). Raises ImportInvalid when the file was altered: a
    message whose hash no longer matches its fields, or a seal that does not match the data.
    """
    messages = doc["messages"]
    hashed = [m for m in messages if m["hash"]]
    if hashed and len(hashed) != len(messages):
        first = next(m for m in messages if not m["hash"])
        raise ImportInvalid(TAMPERED.format(detail=f"{first['path']} (seq {first['seq']}) has no hash"))
    previous = integrity.GENESIS
    for m in messages if hashed else []:
        link = SimpleNamespace(
            message_id=m["message_id"],
            seq=m["seq"],
            role=m["role"],
            content=m["content"],
            timestamp=m["timestamp"],
            model=m["model"],
            provider=m["provider"],
            domain_id=m["client_id"],
            prompt_tokens=m["prompt_tokens"],
            completion_tokens=m["completion_tokens"],
            tokens=m["tokens"],
            token_source=m["token_source"],
            cost_usd=m["cost_usd"],
            status=m["status"],
            copied_from_id=m["copied_from"],
            is_imported=m["is_imported"],
        )
        expected = integrity.link_hash(previous, link)
        if expected != m["hash"]:
            raise ImportInvalid(
                TAMPERED.format(
                    detail=f"{m['path']} (seq {m['seq']}): its hash does not match its fields "
                    "(content, tokens, cost, timestamp or an earlier message was changed)"
                )
            )
        previous = expected
    count = len(messages)
    untrusted = integrity.UNTRUSTED_IMPORT

    seal = doc["seal"]
    if seal is None:
        # Anyone can compute a hash chain: without a trusted seal nothing vouches for the content.
        if not hashed and messages:
            return False, False, f"{untrusted} (no seal and no hash chain: nothing in the file could be checked)"
        return False, False, f"{untrusted} (the file carries no seal; its hash chain of {count} messages is intact)"

    if not hashed and messages:
        raise ImportInvalid(TAMPERED.format(detail="the file carries a seal but its messages have no hashes"))
    stored = _signed_fields(doc, raw, previous)
    for key in sorted(set(stored) | set(seal["signed"])):
        if seal["signed"].get(key) != stored.get(key):
            label = "the last message's hash" if key == "chain_head" else f"session.{key}"
            raise ImportInvalid(TAMPERED.format(detail=f"{label} does not match the seal"))

    own_id = integrity.key_id()
    seal_key = seal.get("key_id") or own_id
    trusted = integrity.trusted_public_keys()
    if seal_key in trusted:
        if not integrity.verify_seal_signature(seal, trusted[seal_key]):
            raise ImportInvalid(TAMPERED.format(detail="the seal's signature is invalid"))
        if stored.get("import_untrusted"):
            return False, False, f"{untrusted} (the file is an export of an import that no trusted key sealed)"
        whose = f"this server's key {own_id}" if seal_key == own_id else f"trusted key {seal_key}"
        return True, True, f"hash chain of {count} messages intact; seal signature valid ({whose})"

    # Sealed with a key this server does not trust: check it against the key the file names, to
    # tell a forged signature from an honest one, but an honest signature by an unknown key
    # vouches for nothing (a forger signs with their own key).
    key = raw.get("signing_key") or {}
    try:
        public_raw = base64.b64decode(key.get("public_key", ""), validate=True)
        public = Ed25519PublicKey.from_public_bytes(public_raw)
    except (ValueError, TypeError):
        return False, False, f"{untrusted} (sealed with key {seal_key}, which the file does not include)"
    if integrity.key_id(public_raw) != seal_key:
        raise ImportInvalid(TAMPERED.format(detail="signing_key does not match the seal's key_id"))
    if not integrity.verify_seal_signature(seal, public):
        raise ImportInvalid(TAMPERED.format(detail="the seal's signature is invalid"))
    return (
        False,
        False,
        f"{untrusted} (sealed with key {seal_key}, which this server does not trust; "
        "staff can list it in SESSION_TRUSTED_KEYS)",
    )


def _signed_fields(doc: dict, raw: dict, head: str) -> dict:
    """What integrity.session_fields would produce for the session in the file."""
    s = doc["session"]
    fields = {
        "session_id": str(s["session_id"]),
        "user": s["user_id"],
        "client": str(s["client_id"]),
        "primary_model": s["primary_model"],
        "current_model": s["current_model"],
        "started_at": _time(s["started_at"]),
        "ended_at": _time(s["ended_at"]),
        "duration_seconds": s["duration_seconds"],
        "end_reason": s["end_reason"],
        "total_messages": s["total_messages"],
        "total_tokens": s["total_tokens"],
        "estimated_cost_usd": _money(s["estimated_cost_usd"]),
        "segments": [
            {
                "client": str(g["client_id"]),
                "model": g["model"],
                "started_at": _time(g["started_at"]),
                "ended_at": _time(g["ended_at"]),
            }
            for g in doc["segments"]
        ],
        "context_streams": [
            {
                "stream_id": str(t["stream_id"]),
                "source_model": t["source_model"],
                "target_model": t["target_model"],
                "source_client": str(t["source_client_id"]),
                "target_client": str(t["target_client_id"]),
                "message_count": t["message_count"],
                "total_tokens": t["total_tokens"],
                "cost_usd": _money(t["cost_usd"]),
                "streamed_at": _time(t["streamed_at"]),
            }
            for t in doc["streams"]
        ],
        "chain_head": head,
    }
    source = raw["session"].get("source") if isinstance(raw.get("session"), dict) else None
    if integrity.import_untrusted(source, raw.get("imported")):
        fields["import_untrusted"] = True
    return fields


# --- import ---------------------------------------------------------------------------------


def _import_client(*, user, slug: str) -> ClientDomain:
    client = ClientDomain.objects.filter(slug=slug, is_active=True).first()
    if client is None:
        raise ImportInvalid(UNKNOWN_IMPORT_CLIENT.format(slug=slug))
    if not ClientDomain.objects.open_to(user).filter(pk=client.pk).exists():
        raise ImportInvalid(IMPORT_CLIENT_NOT_ALLOWED.format(slug=slug))
    return client


def session_import(*, user, data: str | bytes | dict, client: str | ClientDomain | None = None) -> ImportResult:
    """Import an export document as a new, ended session of `user`; all or nothing."""
    raw = _read(data)
    doc = _validate(raw)
    valid, trusted, detail = _verify(doc, raw)
    source = doc["session"]
    if isinstance(client, ClientDomain):
        target = _import_client(user=user, slug=client.slug)
    else:
        target = _import_client(user=user, slug=client or source["client"])
    known = {str(c.pk): c for c in ClientDomain.objects.filter(pk__in={str(m["client_id"]) for m in doc["messages"]})}
    by_slug = {c.slug: c for c in ClientDomain.objects.filter(slug__in={m["client"] for m in doc["messages"]})}

    now = timezone.now()
    with transaction.atomic():
        session = ChatSession.objects.create(
            user=user,
            domain=target,
            brand=target.brands.filter(is_default=True).first(),
            name=(source["name"] or f"Session {str(source['session_id'])[:8]}")[:200],
            system_prompt=source["system_prompt"],
            started_at=now,
            ended_at=now,
            duration_seconds=0,
            status=SessionStatus.ENDED,
            end_reason=EndReason.USER,
            primary_model=source["primary_model"],
            current_model=source["current_model"],
            last_activity_at=now,
            source=SessionSource.IMPORT,
        )
        # A zero-length segment: the import bills no time, and the session still has the one
        # segment every ended session has (its duration is the sum of its segments: 0).
        SessionSegment.objects.create(
            session=session,
            domain=target,
            brand=session.brand,
            model=session.current_model,
            started_at=now,
            ended_at=now,
        )
        previous = integrity.GENESIS
        rows = []
        for m in doc["messages"]:
            domain = known.get(str(m["client_id"])) or by_slug.get(m["client"]) or target
            message = SessionMessage(
                session=session,
                seq=m["seq"],
                role=m["role"],
                content=m["content"],
                timestamp=m["timestamp"],
                model=m["model"],
                provider=m["provider"],
                domain=domain,
                prompt_tokens=m["prompt_tokens"],
                completion_tokens=m["completion_tokens"],
                tokens=m["tokens"],
                token_source=m["token_source"],
                cost_usd=m["cost_usd"],
                status=m["status"],
                error_text=m["error_text"],
                shared_to_domains=m["shared_to_domains"],
                shared_to_models=m["shared_to_models"],
                context_omitted=m["context_omitted"],
                is_imported=True,
            )
            # The copy gets this server's own chain; the file's hashes are kept below.
            previous = chain_link([message], after=(message.seq - 1, previous))
            rows.append(message)
        SessionMessage.objects.bulk_create(rows)
        # Imported messages are never billed again: totals count billable messages only.
        session.total_messages = len(rows)
        session.imported_seal = {
            "seal": doc["seal"],
            "integrity": {"valid": valid, "trusted": trusted, "detail": detail},
            "imported_at": _time(now),
            "source": raw["session"],
            "message_hashes": [
                {"seq": m["seq"], "message_id": str(m["message_id"]), "hash": m["hash"]} for m in doc["messages"]
            ],
            "segments": raw["segments"],
            "context_streams": raw["context_streams"],
            "signing_key": raw.get("signing_key"),
        }
        session.save(update_fields=["total_messages", "imported_seal"])
        session.soulfra_hash = integrity.build_seal(session)
        session.save(update_fields=["soulfra_hash"])
    return ImportResult(session=session, valid=valid, trusted=trusted, detail=detail)
