"""The integrity seal: a SHA-256 hash chain over messages and an Ed25519 signature at the end.

Each message's `hash` is SHA-256 over the previous message's hash and a canonical JSON of
the message's billed fields. Ending a session signs the chain head plus the session's billed
fields (totals, times, segments, context streams) with `SESSION_SIGNING_KEY`; the seal is
stored in `ChatSession.soulfra_hash`. Anyone holding the public key
(`/api/ollama/signing-key`) can verify an exported session offline: any edited content,
cost, token count or timestamp fails, and `verify_session` names exactly what.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from django.conf import settings

from billing.money import api_amount

GENESIS = "0" * 64
SEAL_VERSION = 1
ALGORITHM = "Ed25519"


# --- canonical forms -------------------------------------------------------------------


def canonical_time(value: datetime | None) -> str | None:
    """ISO 8601 in UTC with microseconds: the same instant always reads the same."""
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_money(value: Decimal | None) -> str | None:
    return api_amount(value)


def canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def message_fields(message) -> dict[str, Any]:
    """The billed fields of a message, the content of its link in the chain."""
    return {
        "message_id": str(message.message_id),
        "seq": message.seq,
        "role": message.role,
        "content": message.content,
        "timestamp": canonical_time(message.timestamp),
        "model": message.model,
        "provider": message.provider,
        "client": str(message.domain_id),
        "prompt_tokens": message.prompt_tokens,
        "completion_tokens": message.completion_tokens,
        "tokens": message.tokens,
        "token_source": message.token_source,
        "cost_usd": canonical_money(message.cost_usd),
        "status": message.status,
        "copied_from": str(message.copied_from_id) if message.copied_from_id else None,
        "is_imported": message.is_imported,
    }


def link_hash(previous: str, message) -> str:
    return hashlib.sha256(previous.encode() + b"\n" + canonical_json(message_fields(message))).hexdigest()


def session_fields(session, chain_head: str, *, segments=None, streams=None) -> dict[str, Any]:
    """The billed fields of a session that the seal signs, with its segments and streams.

    `segments` and `streams` are the session's rows in order when the caller has read them
    already (a summary, a verification); otherwise they are read here.
    """
    if segments is None:
        segments = session.segments.order_by("started_at", "id")
    if streams is None:
        streams = session.context_streams.order_by("streamed_at", "stream_id")
    segments = [
        {
            "client": str(seg.domain_id),
            "model": seg.model,
            "started_at": canonical_time(seg.started_at),
            "ended_at": canonical_time(seg.ended_at),
        }
        for seg in segments
    ]
    streams = [
        {
            "stream_id": str(stream.stream_id),
            "source_model": stream.source_model,
            "target_model": stream.target_model,
            "source_client": str(stream.source_domain_id),
            "target_client": str(stream.target_domain_id),
            "message_count": stream.message_count,
            "total_tokens": stream.total_tokens,
            "cost_usd": canonical_money(stream.cost_usd),
            "streamed_at": canonical_time(stream.streamed_at),
        }
        for stream in sorted(streams, key=lambda t: (t.streamed_at, str(t.stream_id)))
    ]
    fields = {
        "session_id": str(session.session_id),
        "user": str(session.user_id),
        "client": str(session.domain_id),
        "primary_model": session.primary_model,
        "current_model": session.current_model,
        "started_at": canonical_time(session.started_at),
        "ended_at": canonical_time(session.ended_at),
        "duration_seconds": session.duration_seconds,
        "end_reason": session.end_reason,
        "total_messages": session.total_messages,
        "total_tokens": session.total_tokens,
        "estimated_cost_usd": canonical_money(session.estimated_cost_usd),
        "segments": segments,
        "context_streams": streams,
        "chain_head": chain_head,
    }
    if import_untrusted(getattr(session, "source", ""), getattr(session, "imported_seal", None)):
        # Sealed in, so an export of an untrusted import cannot come back as trusted.
        fields["import_untrusted"] = True
    return fields


def import_untrusted(source: str, imported) -> bool:
    """Whether a session is an import of a file no trusted key sealed (`imported` is its `imported_seal`)."""
    if source != "import":
        return False
    report = imported.get("integrity") if isinstance(imported, dict) else None
    return not (isinstance(report, dict) and report.get("valid") is True and report.get("trusted") is True)


# --- keys --------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _private_key(seed_b64: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(base64.b64decode(seed_b64))


def private_key() -> Ed25519PrivateKey:
    return _private_key(settings.SESSION_SIGNING_KEY)


def public_key_bytes() -> bytes:
    return private_key().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(raw_public: bytes | None = None) -> str:
    return hashlib.sha256(raw_public or public_key_bytes()).hexdigest()[:16]


def public_key_info() -> dict[str, str]:
    """What `/api/ollama/signing-key` serves: the raw key (base64) and its PEM form."""
    public = private_key().public_key()
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {
        "algorithm": ALGORITHM,
        "key_id": key_id(raw),
        "public_key": base64.b64encode(raw).decode(),
        "public_key_pem": public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode(),
        "format": "raw Ed25519 public key, base64; the signature covers the canonical JSON of `signed`",
    }


# --- chain and seal -----------------------------------------------------------------------


def chain_head(session) -> str:
    last = session.messages.order_by("-seq").values_list("hash", flat=True).first()
    return last or GENESIS


def build_seal(session) -> dict[str, Any]:
    """Sign the chain head and the session's billed fields; the dict goes in `soulfra_hash`."""
    signed = session_fields(session, chain_head(session))
    signature = private_key().sign(canonical_json(signed))
    return {
        "version": SEAL_VERSION,
        "algorithm": ALGORITHM,
        "key_id": key_id(),
        "signed": signed,
        "signature": base64.b64encode(signature).decode(),
    }


def verify_seal_signature(seal: dict[str, Any], public: Ed25519PublicKey | None = None) -> bool:
    """Check the signature over `seal["signed"]` only (what an offline verifier does first)."""
    public = public or private_key().public_key()
    try:
        signature = base64.b64decode(seal["signature"], validate=True)
        public.verify(signature, canonical_json(seal["signed"]))
    except (InvalidSignature, KeyError, TypeError, ValueError):
        return False
    return True


def _describe(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _diff(sealed: Any, stored: Any, path: str) -> list[str]:
    """Name every field where the stored value no longer matches the sealed one."""
    if isinstance(sealed, dict) and isinstance(stored, dict):
        out: list[str] = []
        for key in sorted(set(sealed) | set(stored)):
            out += _diff(sealed.get(key), stored.get(key), f"{path}.{key}" if path else key)
        return out
    if isinstance(sealed, list) and isinstance(stored, list):
        if len(sealed) != len(stored):
            return [f"{path}: sealed {len(sealed)} entries, stored {len(stored)}"]
        out = []
        for index, (a, b) in enumerate(zip(sealed, stored, strict=True)):
            out += _diff(a, b, f"{path}[{index}]")
        return out
    if sealed != stored:
        return [f"{path}: sealed {_describe(sealed)}, stored {_describe(stored)}"]
    return []


def _chain_messages(session):
    """The session's messages in order; from the archive when retention moved them out."""
    # Imported here: integrity reads no models itself, so exported files verify without a database.
    from sessions_app.archive import stored_messages

    return stored_messages(session)


def segment_problems(session, segments) -> list[str]:
    """What is wrong with an ended session's segments: each closed, none past the session's end.

    The seal covers the segments too, but a session edited in SQL (a segment reopened, or
    stretched past the end) is named here in plain words rather than as a field difference.
    """
    if session.status != "ended" or session.ended_at is None:
        return []
    problems = []
    for index, seg in enumerate(segments):
        if seg.ended_at is None:
            problems.append(f"segment {index + 1} of {len(segments)} is still open on an ended session")
        elif seg.ended_at > session.ended_at:
            problems.append(f"segment {index + 1} of {len(segments)} ends after the session ended")
    if segments and segments[-1].ended_at is not None and segments[-1].ended_at != session.ended_at:
        problems.append("the last segment does not end when the session ended")
    return problems


def verify_session(session, *, messages=None, segments=None, streams=None) -> tuple[bool, str]:
    """Recompute the chain and check the seal; return (valid, detail naming what fails).

    `messages`, `segments` and `streams` are the session's rows in order when the caller has
    read them already; otherwise they are read here (one query each).
    """
    problems: list[str] = []
    previous = GENESIS
    count = 0
    head = GENESIS  # the stored head, so one edited message is reported once, not again as the head
    for message in _chain_messages(session) if messages is None else messages:
        count += 1
        head = message.hash or GENESIS
        if problems:
            continue
        expected = link_hash(previous, message)
        if message.hash != expected:
            problems.append(
                f"message #{message.seq} ({message.message_id}): hash does not match its stored fields "
                "(content, tokens, cost, timestamp or an earlier link was changed)"
            )
        previous = expected

    seal = session.soulfra_hash
    if session.status != "ended":
        if seal:
            problems.append("session is active but carries a seal")
        if session.ended_at is not None or session.end_reason:
            problems.append("session is active but records an end (it was reopened outside the app)")
        if problems:
            return False, "; ".join(problems)
        return True, f"hash chain of {count} messages intact; not sealed yet (the session is active)"

    if segments is None:
        segments = list(session.segments.order_by("started_at", "id"))
    problems += segment_problems(session, segments)
    if not seal:
        problems.append("session has ended but has no seal")
        return False, "; ".join(problems)
    if not isinstance(seal, dict) or "signed" not in seal or "signature" not in seal:
        problems.append("seal is malformed (missing 'signed' or 'signature')")
        return False, "; ".join(problems)
    if seal.get("key_id") and seal["key_id"] != key_id():
        problems.append(f"seal was made with key {seal['key_id']}, not the current key {key_id()}")
    elif not verify_seal_signature(seal):
        problems.append("seal signature is invalid (the sealed record was altered)")
    stored = session_fields(session, head, segments=segments, streams=streams)
    for difference in _diff(seal.get("signed"), stored, ""):
        problems.append(f"session field {difference}")
    if problems:
        return False, "; ".join(problems)
    return True, f"hash chain of {count} messages intact; seal signature valid (key {key_id()})"


# --- imports: whose seal is trusted -----------------------------------------------------------

UNTRUSTED_IMPORT = "unverified: not sealed by a trusted key"


def trusted_public_keys() -> dict[str, Ed25519PublicKey]:
    """The keys whose seals this server trusts, by key id: its own and `SESSION_TRUSTED_KEYS`.

    Listed keys are base64 raw Ed25519 public keys, as another server's `/api/ollama/signing-key`
    serves its own (settings checks their form).
    """
    return _trusted_keys(settings.SESSION_SIGNING_KEY, tuple(getattr(settings, "SESSION_TRUSTED_KEYS", ())))


@lru_cache(maxsize=4)
def _trusted_keys(own_seed: str, listed: tuple[str, ...]) -> dict[str, Ed25519PublicKey]:
    keys = {key_id(): private_key().public_key()}
    for raw in listed:
        public = base64.b64decode(raw)
        keys[key_id(public)] = Ed25519PublicKey.from_public_bytes(public)
    return keys


def session_integrity(session, **rows) -> tuple[bool, str]:
    """What a summary shows: this server's record verified and, for an import, who sealed it.

    An imported session carries this server's own seal over the copy as imported, so its own
    record verifies; it is valid only if the file was sealed by a trusted key as well.
    Otherwise it is shown as unverified, never valid: anyone can recompute a hash chain.
    """
    valid, detail = verify_session(session, **rows)
    imported = getattr(session, "imported_seal", None)
    if not valid or session.source != "import":
        return valid, detail
    if not import_untrusted(session.source, imported):
        return True, f"imported; {imported['integrity'].get('detail', '')}".rstrip("; ")
    report = imported.get("integrity") if isinstance(imported, dict) else None
    origin = (report or {}).get("detail") or "the file's integrity was not recorded"
    if origin.startswith(UNTRUSTED_IMPORT):
        return False, origin
    return False, f"{UNTRUSTED_IMPORT} ({origin})"
