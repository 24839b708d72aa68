"""`config.statements`: the hot path's prepared statements store and read what the ORM would."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import transaction
from django.utils import timezone

from config import statements
from sessions_app import services
from sessions_app.errors import SessionLocked
from sessions_app.models import ChatSession, MessageRole, SessionMessage

pytestmark = pytest.mark.django_db


@pytest.fixture
def session(owner, client_acme):
    return services.session_start(user=owner, client=client_acme, model="ollama:llama3.2")


def test_an_inserted_row_reads_back_through_the_orm_unchanged(session):
    now = timezone.now()
    message = SessionMessage(
        session=session,
        seq=1,
        role=MessageRole.USER,
        content="Quote ' and \\ backslash, 日本語",
        timestamp=now,
        model=session.current_model,
        provider="ollama",
        domain=session.domain,
        cost_usd=Decimal("0.000123"),
        prompt_tokens=7,
    )
    statements.insert(message)
    assert not message._state.adding
    stored = SessionMessage.objects.get(pk=message.pk)
    assert (stored.content, stored.timestamp, stored.cost_usd, stored.prompt_tokens) == (
        message.content,
        now,
        Decimal("0.000123"),
        7,
    )
    assert stored.session_id == session.pk and stored.domain_id == session.domain_id


def test_an_update_matches_on_equalities_and_nulls_and_adds(session):
    later = session.last_activity_at + timedelta(seconds=5)
    where = {"session_id": session.pk, "turn_started_at": None, "invoice": None}
    assert statements.update(ChatSession, where, {"last_activity_at": later}, add={"total_messages": 2}) == 1
    assert statements.update(ChatSession, {**where, "session_id": uuid.uuid4()}, {"turn_owner": "x"}) == 0
    session.refresh_from_db()
    assert (session.last_activity_at, session.total_messages) == (later, 2)


def test_a_selected_row_is_converted_as_the_orm_converts_it(session):
    ChatSession.objects.filter(pk=session.pk).update(estimated_cost_usd=Decimal("1.250000"))
    fields = ("status", "turn_started_at", "total_messages", "estimated_cost_usd", "last_activity_at", "invoice")
    with transaction.atomic():
        row = statements.select_row(ChatSession, fields, {"session_id": session.pk}, for_update=True)
    expected = ChatSession.objects.filter(pk=session.pk).values(*fields).get()
    assert row is not None and row == expected
    assert isinstance(row["estimated_cost_usd"], Decimal) and row["last_activity_at"].tzinfo is not None
    assert statements.select_row(ChatSession, fields, {"session_id": uuid.uuid4()}) is None


def test_an_insert_into_an_invoiced_session_is_refused_as_save_refuses_it(session, monkeypatch):
    from sessions_app import locks

    monkeypatch.setattr(locks, "_cached_session_locked", lambda instance: True)
    message = SessionMessage(session=session, seq=1, role=MessageRole.USER, content="late", domain=session.domain)
    with pytest.raises(SessionLocked):
        statements.insert(message)
    assert not SessionMessage.objects.filter(session=session).exists()


def test_an_instance_loads_every_field_as_a_queryset_would(owner, client_acme):
    from sessions_app.models import ApiToken

    token, raw = ApiToken.issue(user=owner, client=client_acme, name="Editor")
    loaded = statements.select_instance(ApiToken, {"token_hash": ApiToken.hash_token(raw), "revoked_at": None})
    assert loaded is not None and not loaded._state.adding
    orm = ApiToken.objects.get(pk=token.pk)
    assert [getattr(loaded, f.attname) for f in ApiToken._meta.concrete_fields] == [
        getattr(orm, f.attname) for f in ApiToken._meta.concrete_fields
    ]
    assert statements.select_instance(ApiToken, {"token_hash": "no such hash", "revoked_at": None}) is None


def test_the_first_instance_in_order_with_a_correlated_exists_reads_as_the_queryset(owner, client_acme):
    older = services.session_start(user=owner, client=client_acme, model="ollama:llama3.2")
    newer = services.session_start(user=owner, client=client_acme, model="ollama:llama3.2")
    where = {"user": owner.pk, "domain": client_acme.pk}
    for session in (older, newer):
        services.session_switch(session_id=session.pk, user=owner, model="ollama:mistral")  # a stream waits
    services.session_end(session_id=newer.pk, user=owner)
    now = timezone.now()
    ChatSession.objects.filter(pk=newer.pk).update(last_activity_at=now)
    # The older session is the more recent now, and its stream no longer applies.
    ChatSession.objects.filter(pk=older.pk).update(
        last_activity_at=now + timedelta(seconds=1), current_model="ollama:x"
    )

    for order, expected in ((("-last_activity_at",), older), (("last_activity_at",), newer)):
        loaded = statements.select_instance(
            ChatSession, where, related="domain", order_by=order, also={"pending": services.PENDING_STREAM}
        )
        orm = services.with_pending_stream(ChatSession.objects.filter(**where)).order_by(*order).first()
        assert loaded is not None and orm is not None and loaded.pk == orm.pk == expected.pk
        assert loaded.read_with["pending"] is orm.has_pending_stream is (expected == newer)  # type: ignore[attr-defined]
        assert loaded.domain == client_acme and loaded.total_messages == orm.total_messages
    assert (
        statements.select_instance(ChatSession, {**where, "user": owner.pk + 1000}, order_by=("-last_activity_at",))
        is None
    )


def test_selected_rows_are_the_values_list_in_order(session, owner):
    for content in ("one", "two's", "три"):
        services.session_append_history(
            session_id=session.pk, user=owner, messages=[{"role": "user", "content": content}]
        )
    names = ("seq", "role", "content", "model", "status", "hash", "timestamp")
    rows = statements.select_rows(SessionMessage, names, {"session": session.pk}, order_by=("seq",))
    assert rows == list(SessionMessage.objects.filter(session=session).order_by("seq").values_list(*names))
    assert [row[2] for row in rows] == ["one", "two's", "три"] and rows[0][-1].tzinfo is not None
    assert statements.select_rows(SessionMessage, names, {"session": uuid.uuid4()}) == []
