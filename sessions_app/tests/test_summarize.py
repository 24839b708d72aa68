"""Context summarization (CONTEXT_OVERFLOW=summarize): it kicks in exactly at the window's edge."""

from __future__ import annotations

import pytest
from django.db import connection

from billing.models import LLMUsage, ModelPrice
from providers.tokens import estimate_messages
from sessions_app.context import build_context, reply_reserve
from sessions_app.invariants import check_session
from sessions_app.models import ChatSession
from sessions_app.toolkit import SessionManager
from tests.querycount import WriteTransactions

MODEL = "openai:gpt-4o-words-12"  # priced as gpt-4o, answers twelve words long
LONG = "Please keep in mind the following ledger detail: " + "entry " * 60


def entry_tokens(message) -> int:
    return estimate_messages([{"role": message.role, "content": message.content}])


def last_request_messages(simulator) -> list[dict]:
    chats = [r for r in simulator.requests if r.path.endswith("/chat/completions")]
    return chats[-1].body["messages"]


@pytest.fixture
def window(owner, client_acme, use_simulator, settings):
    """A chat on a priced model whose window we set; returns (manager, set_window)."""
    settings.CONTEXT_OVERFLOW = "summarize"

    def set_window(tokens: int) -> None:
        ModelPrice.objects.filter(provider="openai", model="gpt-4o").update(context_window=tokens)

    return SessionManager(owner, client="acme", model=MODEL), set_window


def test_history_that_fits_exactly_is_sent_whole_and_one_more_message_is_summarized(window, use_simulator):
    manager, set_window = window
    set_window(100_000)
    manager.chat(f"First. {LONG}")
    session = ChatSession.objects.get(pk=manager.session.pk)
    first, answer = session.messages.order_by("seq")
    second = f"Second. {LONG}"
    need = entry_tokens(first) + entry_tokens(answer) + estimate_messages([{"role": "user", "content": second}])
    edge = need + reply_reserve(need + 256)
    assert reply_reserve(edge) == reply_reserve(need + 256)
    set_window(edge)

    # At the edge: everything fits, nothing is summarized or left out.
    reply = manager.chat(second)
    assert reply.context_omitted == 0
    assert not session.messages.filter(role="system").exists()
    sent = last_request_messages(use_simulator)
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]

    # One message past the edge: the current model summarizes what came before.
    usage_before = LLMUsage.objects.count()
    reply = manager.chat("Third: what did I ask first?")

    summary = session.messages.get(role="system")
    assert summary.seq == 6 and reply.seq == 7
    assert summary.content.startswith("Summary of the conversation up to message #5")
    assert summary.model == MODEL and summary.provider == "openai"
    assert summary.prompt_tokens > 0 and summary.completion_tokens > 0
    assert summary.tokens == summary.prompt_tokens + summary.completion_tokens
    assert summary.cost_usd > 0
    # One usage row per summarizing call (a long history is folded in chunks).
    calls = list(LLMUsage.objects.filter(message=summary))
    assert calls and all(call.status == "ok" for call in calls)
    assert sum(call.cost for call in calls) == summary.cost_usd
    assert sum(call.prompt_tokens + call.completion_tokens for call in calls) == summary.tokens
    assert LLMUsage.objects.count() == usage_before + len(calls) + 1
    assert reply.context_omitted == 0

    # The answer was asked with the summary in place of the old messages.
    sent = last_request_messages(use_simulator)
    assert sent[0]["role"] == "system" and sent[0]["content"] == summary.content
    assert not any(m["content"].startswith("First.") for m in sent)
    assert sent[-1]["content"] == "Third: what did I ask first?"

    # The summary is billed like any call and the session stays sound.
    session.refresh_from_db()
    assert session.total_messages == 7
    assert session.estimated_cost_usd == sum(m.cost_usd for m in session.messages.all())
    assert check_session(session) == []

    # Later calls start from the summary.
    plan = build_context(session=session, target=manager_ref(session))
    assert plan.summarized == [1, 2, 3, 4, 5]
    assert plan.seqs[0] == 6


def manager_ref(session):
    from providers.naming import parse_model

    return parse_model(session.current_model)


def test_truncate_leaves_older_messages_out_and_stores_no_summary(window, settings, use_simulator):
    manager, set_window = window
    settings.CONTEXT_OVERFLOW = "truncate"
    set_window(600)
    manager.chat(f"First. {LONG}")
    manager.chat(f"Second. {LONG}")
    reply = manager.chat(f"Third. {LONG}")

    session = ChatSession.objects.get(pk=manager.session.pk)
    assert not session.messages.filter(role="system").exists()
    assert reply.context_omitted > 0
    assert check_session(session) == []


def test_a_switch_to_a_smaller_window_carries_a_summary(window, owner, client_globex, use_simulator):
    from sessions_app import services

    manager, set_window = window
    set_window(100_000)
    for n in range(3):
        manager.chat(f"Point {n}. {LONG}")
    set_window(400)

    stream = services.session_switch(session_id=manager.session.pk, user=owner, client="globex", reason="Globex now")

    session = ChatSession.objects.get(pk=manager.session.pk)
    summary = session.messages.get(role="system")
    assert any(entry["content"] == summary.content for entry in stream.context_snapshot)
    assert stream.omitted_count == 0
    manager.chat("Carry on.")
    assert check_session(session) == []


def test_a_summarizing_turn_stays_within_three_write_transactions(window):
    """docs/DESIGN.md: at most three per turn. The summary and its usage rows are one of them."""
    manager, set_window = window
    set_window(100_000)
    manager.chat(f"First. {LONG}")
    manager.chat(f"Second. {LONG}")
    set_window(300)  # the next turn no longer fits: it is summarized
    counter = WriteTransactions()
    with connection.execute_wrapper(counter):
        manager.chat("Third: what did I ask first?")
    session = ChatSession.objects.get(pk=manager.session.pk)
    assert session.messages.filter(role="system").count() == 1
    assert counter.count <= 3


@pytest.mark.parametrize(
    ("model", "priced_as"),
    [
        ("ollama:llama3.2-words-12", None),
        ("openai:gpt-4o-words-12", ("openai", "gpt-4o")),
        ("anthropic:claude-sonnet-4-20250514-words-12", ("anthropic", "claude-sonnet-4-20250514")),
    ],
)
def test_summarization_works_on_every_provider(model, priced_as, owner, client_acme, use_simulator, settings):
    """Each adapter is called only with arguments its client takes (Anthropic's rejects `temperature`)."""
    settings.CONTEXT_OVERFLOW = "summarize"

    def set_window(tokens: int) -> None:
        if priced_as is None:
            settings.OLLAMA_NUM_CTX = tokens
        else:
            ModelPrice.objects.filter(provider=priced_as[0], model=priced_as[1]).update(context_window=tokens)

    manager = SessionManager(owner, client="acme", model=model)
    set_window(100_000)
    manager.chat(f"First. {LONG}")
    manager.chat(f"Second. {LONG}")
    set_window(300)
    reply = manager.chat("Third: what did I ask first?")

    session = ChatSession.objects.get(pk=manager.session.pk)
    summary = session.messages.get(role="system")
    assert summary.content.startswith("Summary of the conversation up to message #")
    assert summary.provider == model.split(":")[0]
    assert summary.completion_tokens > 0
    assert reply.status == "complete" and reply.seq == summary.seq + 1
    assert LLMUsage.objects.filter(message=summary, status="ok").exists()
    assert not LLMUsage.objects.filter(session=session, status="error").exists()
    assert check_session(session) == []
