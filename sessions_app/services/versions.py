"""New versions of a conversation: continue an ended session, edit a message, regenerate an answer.

None of them rewrites billed history. Each makes a new session holding copies of the messages
it keeps (copies are never billed again, as for a branch) and bills only what happens in it
from then on:

- `session_continue`: an ended session's whole history carried into a new session (on the
  same or another client and model), linked both ways (`continued_from` / `continuations`).
- `session_edit`: a branch up to just before one of the caller's messages, plus the edited
  text to send as that branch's next turn.
- `session_regenerate`: a branch up to just before the question of an answer, plus the same
  question to send again; the new answer is a new, billed call.

Edit and regenerate return the branch and the text; the caller runs the turn through
`session_chat` (so the answer streams to it as any other). When the caller owns the source
session and it is still running, the source ends now: the conversation has moved to the new
version, and two running timers would bill the same minutes twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings

from billing.models import ClientDomain
from sessions_app.errors import (
    CLIENT_NOT_ALLOWED,
    MESSAGE_EMPTY,
    MESSAGE_TOO_LARGE,
    BadInput,
    MessageTooLarge,
    SessionEnded,
)
from sessions_app.models import (
    ChatSession,
    EndReason,
    MessageRole,
    SessionMessage,
    SessionSource,
    SessionStatus,
)
from sessions_app.selectors import session_get_for_user
from sessions_app.services.history import _copy_session
from sessions_app.services.inputs import (
    NAME_LIMIT,
    NAME_TOO_LONG,
    NOT_TEXT,
    _require_text,
    _resolve_brand,
    _resolve_client,
    _resolve_model,
)
from sessions_app.services.lifecycle import _end

CONTINUE_ACTIVE = "This session is still running: chat in it, or branch it to try something else."


CONTINUE_ARCHIVED = "This session is archived; restore it first (manage.py archive_sessions --restore {prefix})."


EDIT_NOT_A_QUESTION = "Message #{seq} is not a message you wrote; only your own messages can be edited."


EDIT_NOTHING = "There is no message of yours to edit in this session."


REGENERATE_NOT_AN_ANSWER = "Message #{seq} is not an answer; only answers can be regenerated."


REGENERATE_NOTHING = "There is no answer to regenerate in this session."


REGENERATE_NO_QUESTION = "Answer #{seq} does not follow a question, so there is nothing to ask again."


SEQ_NOT_A_NUMBER = "'seq' must be a message number from 1 to {last}."


@dataclass(frozen=True)
class NewVersion:
    """A branch made by an edit or a regeneration, and the text to send as its next turn."""

    session: ChatSession
    message: str
    replaces_seq: int


def session_continue(*, session_id, user, client=None, model=None, name: str = "") -> ChatSession:
    """A new session carrying an ended session's history; its time and answers are billed anew."""
    original = session_get_for_user(session_id=session_id, user=user)
    if original.status != SessionStatus.ENDED:
        raise SessionEnded(CONTINUE_ACTIVE, code="session_active")
    if original.archived_at is not None:
        raise BadInput(CONTINUE_ARCHIVED.format(prefix=str(original.session_id)[:8]))
    name = _clean_name(name)
    domain = _resolve_client(client, user) if client not in (None, "") else _open_client(original.domain, user)
    model_name = _resolve_model(model) if model not in (None, "") else _resolve_model(original.current_model)
    brand = original.brand if domain.pk == original.domain_id else _resolve_brand(None, domain)
    last = original.messages.order_by("-seq").values_list("seq", flat=True).first() or 0
    return _copy_session(
        original,
        user=user,
        upto=last,
        name=name or f"{original} (continued)"[:NAME_LIMIT],
        source=SessionSource.CONTINUE,
        domain=domain,
        brand=brand,
        model=model_name,
        branched=False,
    )


def session_edit(*, session_id, user, message, seq=None) -> NewVersion:
    """Branch before one of the caller's messages (their last by default) to send `message` instead."""
    text = _message_text(message)
    source = session_get_for_user(session_id=session_id, user=user)
    target = _pick(source, seq, role=MessageRole.USER, user=user, missing=EDIT_NOTHING)
    if target.role != MessageRole.USER or not _typed_by(target, source, user):
        raise BadInput(EDIT_NOT_A_QUESTION.format(seq=target.seq))
    branch = _version(source, user=user, upto=target.seq - 1, kind=SessionSource.EDIT, label=f"edited #{target.seq}")
    return NewVersion(session=branch, message=text, replaces_seq=target.seq)


def session_regenerate(*, session_id, user, seq=None) -> NewVersion:
    """Branch before the question of an answer (the last by default) to ask it again."""
    source = session_get_for_user(session_id=session_id, user=user)
    target = _pick(source, seq, role=MessageRole.ASSISTANT, user=None, missing=REGENERATE_NOTHING)
    if target.role != MessageRole.ASSISTANT:
        raise BadInput(REGENERATE_NOT_AN_ANSWER.format(seq=target.seq))
    question = (
        source.messages.filter(seq=target.seq - 1, role=MessageRole.USER).values_list("content", flat=True).first()
    )
    if not question:
        raise BadInput(REGENERATE_NO_QUESTION.format(seq=target.seq))
    branch = _version(
        source, user=user, upto=target.seq - 2, kind=SessionSource.REGENERATE, label=f"regenerated #{target.seq}"
    )
    return NewVersion(session=branch, message=question, replaces_seq=target.seq)


# --- helpers ------------------------------------------------------------------------------


def _clean_name(name) -> str:
    name = _require_text(name, "name").strip()
    if len(name) > NAME_LIMIT:
        raise BadInput(NAME_TOO_LONG.format(size=len(name), limit=NAME_LIMIT))
    return name


def _open_client(domain: ClientDomain, user) -> ClientDomain:
    if not domain.is_active or not ClientDomain.objects.open_to(user).filter(pk=domain.pk).exists():
        raise BadInput(CLIENT_NOT_ALLOWED.format(slug=domain.slug))
    return domain


def _message_text(message) -> str:
    if not isinstance(message, str):
        raise BadInput(NOT_TEXT.format(field="message"))
    message = message.replace("\x00", "")
    if not message.strip():
        raise BadInput(MESSAGE_EMPTY)
    limit = settings.CHAT_MAX_MESSAGE_CHARS
    if len(message) > limit:
        raise MessageTooLarge(MESSAGE_TOO_LARGE.format(size=len(message), limit=limit))
    return message


def _typed_by(message: SessionMessage, session: ChatSession, user) -> bool:
    # Messages stored before authors were recorded were all typed by the session's owner.
    return message.author_id == user.pk if message.author_id else session.user_id == user.pk


def _pick(session: ChatSession, seq, *, role: str, user, missing: str) -> SessionMessage:
    """The message numbered `seq`, or the latest with `role` (typed by `user`, when given)."""
    messages = session.messages.order_by("-seq")
    if seq is None:
        for candidate in messages.filter(role=role)[:50]:
            if user is None or _typed_by(candidate, session, user):
                return candidate
        raise BadInput(missing)
    last = messages.values_list("seq", flat=True).first() or 0
    if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq <= last:
        raise BadInput(SEQ_NOT_A_NUMBER.format(last=last) if last else missing)
    return messages.get(seq=seq)


def _version(source: ChatSession, *, user, upto: int, kind: str, label: str) -> ChatSession:
    domain = _open_client(source.domain, user)
    if source.archived_at is not None:
        raise BadInput(CONTINUE_ARCHIVED.format(prefix=str(source.session_id)[:8]))
    branch = _copy_session(
        source,
        user=user,
        upto=upto,
        name=f"{source} ({label})"[:NAME_LIMIT],
        source=kind,
        domain=domain,
        brand=source.brand,
        model=source.current_model,
        branched=True,
    )
    if source.status == SessionStatus.ACTIVE and source.user_id == user.pk and not source.is_locked:
        _end(source, reason=EndReason.USER)
    return branch
