"""The session services: start, chat, switch, end, branch and import, against the simulator."""

from __future__ import annotations

from decimal import Decimal

import pytest

from billing.models import LLMUsage
from sessions_app import services
from sessions_app.errors import (
    CLIENT_NOT_ALLOWED,
    MESSAGE_EMPTY,
    SESSION_ENDED,
    BadInput,
    MessageTooLarge,
    NotFound,
    SessionEnded,
)
from sessions_app.models import ContextStream, SessionMessage, SessionSegment
from sessions_app.selectors import session_get_for_user, session_summary

pytestmark = pytest.mark.usefixtures("sound_sessions")


@pytest.fixture
def session(owner, client_acme, use_simulator):
    return services.session_start(user=owner, client="acme", model="ollama:llama3.2", name="Acme work")


def test_start_opens_a_session_and_its_first_segment(owner, client_acme, use_simulator):
    session = services.session_start(user=owner, client=client_acme, model="llama3.2:latest", system_prompt="Be brief.")
    assert session.status == "active"
    assert session.current_model == "ollama:llama3.2:latest"
    assert session.brand is not None and session.brand.client == client_acme
    segment = SessionSegment.objects.get(session=session)
    assert segment.ended_at is None and segment.started_at == session.started_at


def test_start_names_an_unknown_client_and_model(owner, client_acme, use_simulator):
    with pytest.raises(BadInput, match="'nope'"):
        services.session_start(user=owner, client="nope", model="ollama:llama3.2")
    with pytest.raises(BadInput, match="'openai:no such model'"):
        services.session_start(user=owner, client="acme", model="openai:no such model")
    with pytest.raises(BadInput, match="'openai:unpriced-model'"):
        services.session_start(user=owner, client="acme", model="openai:unpriced-model")


def test_start_refuses_a_client_the_consultant_is_not_a_member_of(owner, colleague, client_acme, use_simulator):
    client_acme.members.add(colleague)
    with pytest.raises(BadInput) as excinfo:
        services.session_start(user=owner, client="acme", model="ollama:llama3.2")
    assert excinfo.value.message == CLIENT_NOT_ALLOWED.format(slug="acme")


def test_chat_streams_tokens_and_stores_both_messages_with_usage(owner, session, chat):
    texts, done = chat(session, owner, "Hello there")
    assert texts and "".join(texts) == done.message.content
    user_msg, answer = SessionMessage.objects.filter(session=session).order_by("seq")
    assert (user_msg.seq, user_msg.role, user_msg.content) == (1, "user", "Hello there")
    assert answer.role == "assistant" and answer.status == "complete"
    assert answer.token_source == "provider" and answer.prompt_tokens > 0 and answer.completion_tokens > 0
    assert answer.cost_usd == Decimal("0")
    usage = LLMUsage.objects.get(session=session)
    assert usage.message == answer and usage.status == "ok" and usage.prompt_tokens == answer.prompt_tokens
    assert done.session.total_messages == 2 and done.session.total_tokens == answer.tokens
    assert done.session.turn_started_at is None


def test_chat_rejects_empty_and_oversized_messages(owner, session, chat, settings):
    settings.CHAT_MAX_MESSAGE_CHARS = 10
    with pytest.raises(BadInput, match=MESSAGE_EMPTY):
        chat(session, owner, "   ")
    with pytest.raises(MessageTooLarge, match="limit is 10"):
        chat(session, owner, "x" * 11)
    assert not SessionMessage.objects.filter(session=session).exists()


def test_another_consultants_session_is_not_found(session, outsider, chat):
    with pytest.raises(NotFound):
        session_get_for_user(session_id=session.pk, user=outsider)
    with pytest.raises(NotFound):
        chat(session, outsider, "hi")
    with pytest.raises(NotFound):
        session_get_for_user(session_id="not-a-uuid", user=outsider)


def test_switch_carries_context_to_target_model(owner, session, client_globex, chat, use_simulator):
    chat(session, owner, "Remember the word pineapple")
    stream = services.session_switch(session_id=session.pk, user=owner, client="globex", model="openai:gpt-4o")
    assert stream.reason == "domain_switch"
    assert stream.message_count == 2 and stream.cost_usd is None
    assert [m["seq"] for m in stream.context_snapshot] == [1, 2]
    carried = SessionMessage.objects.get(session=session, seq=1)
    assert carried.shared_to_domains == ["globex"] and carried.shared_to_models == ["openai:gpt-4o"]

    use_simulator.clear_requests()
    _texts, done = chat(session, owner, "What was the word?")
    request = use_simulator.last_request(path="/v1/chat/completions")
    sent = [m["content"] for m in request["body"]["messages"]]
    assert "Remember the word pineapple" in sent and "What was the word?" in sent
    stream.refresh_from_db()
    assert stream.settled_at is not None and 0 < stream.total_tokens < done.message.prompt_tokens
    assert Decimal("0") < stream.cost_usd <= done.message.cost_usd
    assert done.message.domain.slug == "globex"
    # The stream's cost is inside the message cost, not on top of it.
    assert done.session.estimated_cost_usd == done.message.cost_usd


def test_switch_reason_is_model_upgrade_from_free_to_paid(owner, session, use_simulator):
    stream = services.session_switch(session_id=session.pk, user=owner, model="openai:gpt-4o")
    assert stream.reason == "model_upgrade"
    stream = services.session_switch(session_id=session.pk, user=owner, model="openai:gpt-4o-mini")
    assert stream.reason == "model_switch"


def test_switch_to_the_same_client_and_model_is_bad_input(owner, session):
    with pytest.raises(BadInput, match="already"):
        services.session_switch(session_id=session.pk, user=owner, model="ollama:llama3.2")
    with pytest.raises(BadInput):
        services.session_switch(session_id=session.pk, user=owner)


def test_end_seals_and_ending_twice_returns_the_same_summary(owner, session, client_globex, chat):
    chat(session, owner, "One")
    services.session_switch(session_id=session.pk, user=owner, client="globex")
    chat(session, owner, "Two")
    first = services.session_end(session_id=session.pk, user=owner)
    second = services.session_end(session_id=session.pk, user=owner)
    assert first == second
    assert first["status"] == "ended" and first["integrity"]["valid"] is True
    assert sum(row["seconds"] for row in first["by_client"]) == first["duration_seconds"]
    assert [row["client"] for row in first["by_client"]] == ["acme", "globex"]
    assert first["total_messages"] == 4
    with pytest.raises(SessionEnded, match=SESSION_ENDED):
        chat(session, owner, "Three")


def test_summary_of_an_active_session_reports_integrity_so_far(owner, session, chat):
    chat(session, owner, "Hello")
    summary = session_summary(session=session_get_for_user(session_id=session.pk, user=owner))
    assert summary["integrity"]["valid"] is True and "not sealed yet" in summary["integrity"]["detail"]
    assert ContextStream.objects.count() == 0
