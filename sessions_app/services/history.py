"""Add history without a provider call: branch a session, append already-answered messages."""

from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from billing.models import Brand, ClientDomain
from providers.base import ChatMessage
from providers.naming import parse_model
from sessions_app.errors import (
    CLIENT_NOT_ALLOWED,
    MESSAGE_TOO_LARGE,
    BadInput,
    MessageTooLarge,
)
from sessions_app.models import (
    ChatSession,
    MessageRole,
    SessionMessage,
    SessionSegment,
    SessionSource,
)
from sessions_app.refs import Person, SessionRef
from sessions_app.selectors import session_get_for_user
from sessions_app.services.claims import (
    _check_writable,
    _claim_or_explain,
)
from sessions_app.services.inputs import (
    NAME_LIMIT,
    NAME_TOO_LONG,
    _require_text,
)
from sessions_app.services.store import _load, chain_append

BRANCH_RANGE = "at_seq must be a whole number from 1 to {last}."


BRANCH_EMPTY = "This session has no messages to branch from."


HISTORY_SHAPE = (
    "messages must be a list of {{'role': 'system'|'user'|'assistant', 'content': str}}; item {index} is not."
)


HISTORY_EMPTY = "messages is empty."


HISTORY_LIMIT_FACTOR = 8  # imported answers may be longer than what a consultant may type


def session_branch(*, session_id: SessionRef, user: Person, at_seq: int | None = None, name: str = "") -> ChatSession:
    """A new session with copies of messages 1..at_seq; copies are not billed again."""
    parent = session_get_for_user(session_id=session_id, user=user)
    name = _require_text(name, "name").strip()
    if len(name) > NAME_LIMIT:
        raise BadInput(NAME_TOO_LONG.format(size=len(name), limit=NAME_LIMIT))
    last = parent.messages.order_by("-seq").values_list("seq", flat=True).first()
    if not last:
        raise BadInput(BRANCH_EMPTY)
    if at_seq is None:
        at_seq = last
    if isinstance(at_seq, bool) or not isinstance(at_seq, int) or not 1 <= at_seq <= last:
        raise BadInput(BRANCH_RANGE.format(last=last))
    domain = parent.domain
    if not ClientDomain.objects.open_to(user).filter(pk=domain.pk).exists():
        raise BadInput(CLIENT_NOT_ALLOWED.format(slug=domain.slug))
    name = name or f"{parent} (branch at #{at_seq})"[:NAME_LIMIT]
    return _copy_session(
        parent,
        user=user,
        upto=at_seq,
        name=name,
        source=SessionSource.BRANCH,
        domain=domain,
        brand=parent.brand,
        model=parent.current_model,
        branched=True,
    )


def _copy_session(
    original: ChatSession,
    *,
    user: Person,
    upto: int,
    name: str,
    source: str,
    domain: ClientDomain,
    brand: Brand | None,
    model: str,
    branched: bool,
) -> ChatSession:
    """A new active session holding copies of `original`'s messages 1..upto (never billed again).

    `branched` links it as a branch (`parent`, `branched_at_seq`); otherwise it continues the
    original (`continued_from`). Its time starts now, in its own first segment.
    """
    now = timezone.now()
    with transaction.atomic():
        copy_session = ChatSession.objects.create(
            user=user,
            domain=domain,
            brand=brand,
            name=name,
            system_prompt=original.system_prompt,
            started_at=now,
            last_activity_at=now,
            primary_model=model,
            current_model=model,
            source=source,
            parent=original if branched else None,
            branched_at_seq=upto if branched else None,
            continued_from=None if branched else original,
        )
        SessionSegment.objects.create(session=copy_session, domain=domain, brand=brand, model=model, started_at=now)
        copies = [
            SessionMessage(
                session=copy_session,
                role=message.role,
                content=message.content,
                timestamp=message.timestamp,
                model=message.model,
                provider=message.provider,
                domain_id=message.domain_id,
                prompt_tokens=message.prompt_tokens,
                completion_tokens=message.completion_tokens,
                tokens=message.tokens,
                token_source=message.token_source,
                cost_usd=message.cost_usd,
                status=message.status,
                error_text=message.error_text,
                copied_from=message,
                author_id=message.author_id,
            )
            for message in original.messages.filter(seq__lte=upto).order_by("seq")
        ]
        chain_append(copy_session, copies, now=now)  # copies count as messages, not as billed
    return _load(copy_session.pk)


def session_append_history(
    *, session_id: SessionRef, user: Person, messages: list[ChatMessage], allow_during_turn: bool = False
) -> None:
    """Store already-answered messages as they are, without a provider call (gateway, import).

    They are marked imported: no tokens or cost are billed for them. `allow_during_turn` is for
    an overflow handler that stores a summary while the turn that needs it holds the session.
    """
    if not isinstance(messages, list | tuple):
        raise BadInput(HISTORY_SHAPE.format(index=0))
    if not messages:
        raise BadInput(HISTORY_EMPTY)
    limit = settings.CHAT_MAX_MESSAGE_CHARS * HISTORY_LIMIT_FACTOR
    cleaned: list[tuple[str, str]] = []
    for index, item in enumerate(messages):
        if (
            not isinstance(item, dict)
            or item.get("role") not in MessageRole.values
            or not isinstance(item.get("content"), str)
        ):
            raise BadInput(HISTORY_SHAPE.format(index=index))
        content = item["content"].replace("\x00", "")
        if len(content) > limit:
            raise MessageTooLarge(MESSAGE_TOO_LARGE.format(size=len(content), limit=limit))
        cleaned.append((item["role"], content))
    session = session_get_for_user(session_id=session_id, user=user)
    _check_writable(session)
    ref = parse_model(session.current_model)
    now = timezone.now()
    with transaction.atomic():
        if allow_during_turn:
            ChatSession.objects.select_for_update().filter(pk=session.pk).first()
        else:
            _claim_or_explain(session.pk, now, last_activity_at=now)
        session = _load(session.pk)
        appended = [
            SessionMessage(
                session=session,
                role=role,
                content=content,
                timestamp=now,
                model=session.current_model,
                provider=ref.provider,
                domain=session.domain,
                cost_usd=Decimal("0"),
                is_imported=True,
                author=user if role == MessageRole.USER else None,
            )
            for role, content in cleaned
        ]
        chain_append(session, appended, now=now)
