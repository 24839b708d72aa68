"""Chat turns under races and failures: busy sessions, switch/end mid-answer, provider faults, cancellation."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.core.cache import cache
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from billing.models import Invoice, LLMUsage
from sessions_app import context, services
from sessions_app.errors import BadInput, ProviderFailed, ProviderTimeout, SessionBusy, SessionEnded, SessionLocked
from sessions_app.events import Done, Token
from sessions_app.models import ApiToken, ChatSession, SessionMessage
from tests.querycount import WriteTransactions

pytestmark = pytest.mark.usefixtures("sound_sessions")


def start(owner, model="ollama:llama3.2", **kwargs):
    return services.session_start(user=owner, client="acme", model=model, **kwargs)


@pytest.fixture
def acme(client_acme, use_simulator):
    return client_acme


def test_a_chat_turn_is_at_most_three_write_transactions_and_none_per_token(owner, acme, chat):
    session = start(owner, model="ollama:llama3.2-words-60")
    counter = WriteTransactions()
    with connection.execute_wrapper(counter):
        texts, done = chat(session, owner, "Count my transactions")
    assert len(texts) == 60 and done.message.status == "complete"
    assert counter.count <= 3
    assert counter.count == 2  # claim + user message, then answer + usage + totals + chain


def test_a_failed_turn_is_also_at_most_three_write_transactions(owner, acme, chat):
    session = start(owner, model="ollama:llama3.2-fault-midstream")
    counter = WriteTransactions()
    with connection.execute_wrapper(counter), pytest.raises(ProviderFailed):
        chat(session, owner, "Fail midway")
    assert counter.count <= 3


def test_second_chat_on_a_busy_session_gets_409_and_seqs_never_interleave(owner, acme):
    session = start(owner, model="ollama:llama3.2-fault-slow-words-6")

    async def consume(message):
        out = []
        async for event in services.session_chat(session_id=session.pk, user=owner, message=message):
            out.append(event)
        return out

    async def both():
        return await asyncio.gather(consume("first"), consume("second"), return_exceptions=True)

    first, second = async_to_sync(both)()
    assert isinstance(first[-1], Done)
    assert isinstance(second, SessionBusy) and second.status == 409
    rows = list(SessionMessage.objects.filter(session=session).values_list("seq", "role", "content"))
    assert [(seq, role) for seq, role, _ in rows] == [(1, "user"), (2, "assistant")]
    assert rows[0][2] == "first"


def test_a_stale_claim_from_a_crashed_worker_is_taken_over(owner, acme, chat):
    session = start(owner)
    long_ago = timezone.now() - services.turn_stale_after() - timedelta(seconds=1)
    ChatSession.objects.filter(pk=session.pk).update(turn_started_at=long_ago)
    _texts, done = chat(session, owner, "Anyone there?")
    assert done.message.status == "complete" and done.session.turn_started_at is None


def test_switch_during_an_answer_applies_after_the_answer(owner, acme, client_globex):
    session = start(owner, model="ollama:llama3.2-fault-slow-words-6")

    async def scenario():
        events = services.session_chat(session_id=session.pk, user=owner, message="Explain slowly")
        first = await events.__anext__()
        assert isinstance(first, Token)
        with pytest.raises(SessionBusy, match="applies once it finishes"):
            await sync_to_async(services.session_switch)(session_id=session.pk, user=owner, client="globex")
        switch = asyncio.ensure_future(services.asession_switch(session_id=session.pk, user=owner, client="globex"))
        rest = [event async for event in events]
        return rest, await switch

    rest, stream = async_to_sync(scenario)()
    assert isinstance(rest[-1], Done) and rest[-1].message.status == "complete"
    # The switch happened after the answer, so the answer is part of what was carried.
    assert [entry["seq"] for entry in stream.context_snapshot] == [1, 2]
    assert stream.target_domain.slug == "globex"


def test_end_during_an_answer_stops_it_and_stores_the_partial(owner, acme, use_simulator):
    session = start(owner, model="ollama:llama3.2-fault-slow-words-40")

    async def scenario():
        received = []
        summary = None
        with pytest.raises(SessionEnded, match="partial answer was stored"):
            async for event in services.session_chat(session_id=session.pk, user=owner, message="Go on"):
                received.append(event.text)
                if len(received) == 2:
                    summary = await sync_to_async(services.session_end)(session_id=session.pk, user=owner)
        return received, summary

    received, summary = async_to_sync(scenario)()
    answer = SessionMessage.objects.get(session=session, role="assistant")
    assert answer.status == "partial" and answer.content == "".join(received) and len(received) == 2
    assert LLMUsage.objects.get(message=answer).status == "cancelled"
    assert summary["status"] == "ended" and summary["total_messages"] == 2 and summary["integrity"]["valid"]
    request = use_simulator.last_request(path="/api/chat")
    assert request.wait_finished(5) and request["outcome"] != "complete"


def test_async_end_during_an_answer_behaves_the_same(owner, acme):
    session = start(owner, model="ollama:llama3.2-fault-slow-words-40")

    async def scenario():
        events = services.session_chat(session_id=session.pk, user=owner, message="Go on")
        await events.__anext__()
        summary = await services.asession_end(session_id=session.pk, user=owner)
        with pytest.raises(SessionEnded):
            async for _event in events:
                pass
        return summary

    summary = async_to_sync(scenario)()
    assert summary["status"] == "ended" and summary["total_messages"] == 2


@pytest.mark.parametrize(
    ("model", "error", "status"),
    [
        ("ollama:llama3.2-fault-midstream", ProviderFailed, "partial"),
        # A cut connection may lose the last bytes before them: partial, or error when none arrived.
        ("ollama:llama3.2-fault-cut", ProviderFailed, "partial|error"),
        ("ollama:llama3.2-fault-status-500", ProviderFailed, "error"),
        ("ollama:missing-model", ProviderFailed, "error"),
        ("openai:gpt-4o-fault-midstream", ProviderFailed, "partial"),
        ("anthropic:claude-sonnet-4-20250514-fault-cut", ProviderFailed, "partial|error"),
        ("openai:gpt-4o-fault-status-400", ProviderFailed, "error"),
    ],
)
def test_provider_failure_stores_the_user_message_and_what_arrived(owner, acme, chat, model, error, status):
    session = start(owner, model=model)
    with pytest.raises(error) as excinfo:
        chat(session, owner, "Please answer")
    assert excinfo.value.status == 502
    user_msg, answer = SessionMessage.objects.filter(session=session).order_by("seq")
    assert user_msg.content == "Please answer"
    assert answer.status in status.split("|") and answer.error_text
    assert excinfo.value.message_id == answer.message_id
    usage = LLMUsage.objects.get(message=answer)
    assert usage.status == "error" and usage.error_text
    if answer.status == "error":
        assert answer.content == "" and answer.tokens == 0
    else:
        assert answer.content and answer.token_source in ("estimated", "provider")


def test_stalls_time_out_with_504_and_keep_the_text(owner, acme, chat, settings):
    # Generous for the first token (a loaded machine), short for the silence after it.
    settings.PROVIDER_FIRST_TOKEN_TIMEOUT = 10
    settings.PROVIDER_IDLE_TIMEOUT = 1.0
    session = start(owner, model="ollama:llama3.2-fault-stall")
    with pytest.raises(ProviderTimeout) as excinfo:
        chat(session, owner, "Stall please")
    assert excinfo.value.status == 504
    answer = SessionMessage.objects.get(session=session, role="assistant")
    assert answer.status == "partial" and answer.content
    settings.PROVIDER_FIRST_TOKEN_TIMEOUT = 0.3
    session = start(owner, model="ollama:llama3.2-fault-stall-first")
    with pytest.raises(ProviderTimeout):
        chat(session, owner, "Stall first")
    assert SessionMessage.objects.get(session=session, role="assistant").status == "error"


def test_closing_the_stream_stores_the_partial_and_closes_upstream(owner, acme, chat, use_simulator):
    session = start(owner, model="ollama:llama3.2-fault-slow-words-40")
    texts, done = chat(session, owner, "Stop me", stop_after=3)
    assert done is None and len(texts) == 3
    answer = SessionMessage.objects.get(session=session, role="assistant")
    assert answer.status == "partial" and answer.content == "".join(texts)
    assert answer.token_source == "estimated" and answer.completion_tokens > 0
    assert LLMUsage.objects.get(message=answer).status == "cancelled"
    request = use_simulator.last_request(path="/api/chat")
    assert request.wait_finished(5) and request["outcome"] != "complete"
    assert ChatSession.objects.get(pk=session.pk).turn_started_at is None


def test_cancelling_the_task_stores_the_partial(owner, acme):
    session = start(owner, model="ollama:llama3.2-fault-slow-words-40")

    async def scenario():
        got = asyncio.Event()

        async def consume():
            async for _event in services.session_chat(session_id=session.pk, user=owner, message="Cancel me"):
                got.set()

        task = asyncio.ensure_future(consume())
        await got.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async_to_sync(scenario)()
    answer = SessionMessage.objects.get(session=session, role="assistant")
    assert answer.status == "partial" and answer.content
    assert LLMUsage.objects.get(message=answer).status == "cancelled"


def test_context_fits_the_window_keeps_the_system_prompt_and_records_omissions(
    owner, acme, chat, settings, use_simulator
):
    settings.OLLAMA_NUM_CTX = 512
    session = start(owner, system_prompt="You are terse.")
    services.session_append_history(
        session_id=session.pk,
        user=owner,
        messages=[
            {"role": "user" if i % 2 == 0 else "assistant", "content": f"filler {i} " + "word " * 120} for i in range(8)
        ],
    )
    use_simulator.clear_requests()
    _texts, done = chat(session, owner, "The latest question")
    assert done.message.context_omitted > 0
    sent = use_simulator.last_request(path="/api/chat")["body"]["messages"]
    assert sent[0] == {"role": "system", "content": "You are terse."}
    assert sent[-1]["content"] == "The latest question"
    assert len(sent) < 10


def test_summarize_overflow_calls_the_registered_handler(owner, acme, chat, settings, use_simulator):
    settings.OLLAMA_NUM_CTX = 512
    settings.CONTEXT_OVERFLOW = "summarize"
    calls = []

    def summarize(*, session, target, plan):
        calls.append(list(plan.omitted))
        plan.extra_system.append(f"Summary of {len(plan.omitted)} earlier messages.")
        return plan

    previous = context._OVERFLOW_HANDLERS.get("summarize")
    context.register_overflow_handler("summarize", summarize)
    try:
        session = start(owner)
        services.session_append_history(
            session_id=session.pk,
            user=owner,
            messages=[{"role": "user", "content": "word " * 150} for _ in range(6)],
        )
        use_simulator.clear_requests()
        chat(session, owner, "Now?")
    finally:
        context._OVERFLOW_HANDLERS.pop("summarize", None)
        if previous is not None:
            context.register_overflow_handler("summarize", previous)
    assert calls and calls[0]
    sent = use_simulator.last_request(path="/api/chat")["body"]["messages"]
    assert any(m["content"].startswith("Summary of") for m in sent)


def test_a_stored_summary_message_stands_in_for_older_history(owner, acme, chat, use_simulator):
    session = start(owner)
    chat(session, owner, "Old question")
    services.session_append_history(
        session_id=session.pk, user=owner, messages=[{"role": "system", "content": "Summary: old stuff."}]
    )
    use_simulator.clear_requests()
    chat(session, owner, "New question")
    sent = [m["content"] for m in use_simulator.last_request(path="/api/chat")["body"]["messages"]]
    assert sent == ["Summary: old stuff.", "New question"]


def test_paid_model_usage_is_priced_from_the_reported_snapshot(owner, acme, chat):
    session = start(owner, model="openai:gpt-4o")
    _texts, done = chat(session, owner, "Price me")
    usage = LLMUsage.objects.get(message=done.message)
    assert usage.provider_model.startswith("gpt-4o-2024") and usage.cost == done.message.cost_usd > 0
    assert done.message.token_source == "provider"


def test_an_end_requested_by_another_worker_stops_the_answer_through_the_cache(owner, acme, settings):
    settings.REDIS_URL = "redis://shared-cache-stand-in"  # the watcher runs when workers share a cache
    session = start(owner, model="ollama:llama3.2-fault-slow-words-60")

    async def scenario():
        events = services.session_chat(session_id=session.pk, user=owner, message="Long answer")
        await events.__anext__()
        claim = await sync_to_async(lambda: ChatSession.objects.get(pk=session.pk).turn_started_at)()
        await sync_to_async(cache.set)(services._stop_key(session.pk, claim), True)
        with pytest.raises(SessionEnded):
            async for _event in events:
                pass

    async_to_sync(scenario)()
    answer = SessionMessage.objects.get(session=session, role="assistant")
    assert answer.status == "partial" and answer.error_text == services.STOPPED_BY_END
    assert ChatSession.objects.get(pk=session.pk).turn_started_at is None
    summary = services.session_end(session_id=session.pk, user=owner)
    assert summary["total_messages"] == 2 and summary["integrity"]["valid"]


def test_an_invoiced_session_is_locked(owner, acme, chat):
    session = start(owner)
    chat(session, owner, "Bill me")
    services.session_end(session_id=session.pk, user=owner)
    invoice = Invoice.objects.create(
        client=acme, period_start=timezone.now().date(), period_end=timezone.now().date(), status="issued"
    )
    ChatSession.objects.filter(pk=session.pk).update(invoice=invoice)
    assert services.session_end(session_id=session.pk, user=owner)["status"] == "ended"
    active = start(owner)
    ChatSession.objects.filter(pk=active.pk).update(invoice=invoice)
    with pytest.raises(SessionLocked):
        chat(active, owner, "Too late")
    ChatSession.objects.filter(pk=active.pk).update(invoice=None)


def test_a_token_bound_to_a_client_cannot_start_sessions_for_another(owner, acme, client_globex):
    token, _raw = ApiToken.issue(user=owner, client=acme)
    with pytest.raises(BadInput, match="only bill client 'acme'"):
        services.session_start(user=owner, client="globex", model="ollama:llama3.2", api_token=token)
    assert (
        services.session_start(user=owner, client="acme", model="ollama:llama3.2", api_token=token).api_token == token
    )


def _known(session_id) -> services.KnownSession:
    """The session and its messages as the gateway's join reads them."""
    session = services.with_pending_stream(ChatSession.objects.select_related("domain")).get(pk=session_id)
    rows = list(
        SessionMessage.objects.filter(session_id=session_id).order_by("seq").values_list(*services.TURN_ROW_FIELDS)
    )
    return services.KnownSession(session, rows)


def _finish(start, owner, message):
    """Run a begun turn to its stored answer."""

    async def go():
        return [e async for e in services.session_chat(session_id=None, user=owner, message=message, start=start)]

    return async_to_sync(go)()


def test_a_turn_begun_on_what_the_caller_just_read_reads_neither_again(owner, acme, chat):
    session = start(owner)
    chat(session, owner, "First")
    known = _known(session.pk)
    with CaptureQueriesContext(connection) as queries:
        begun = services.begin_turn(session_id=session.pk, user=owner, message="Second", known=known)
    sql = [q["sql"] for q in queries.captured_queries]
    assert not any(s.startswith("SELECT") and "ollama_session_messages" in s for s in sql)
    assert not any(s.startswith("SELECT") and 'FROM "ollama_streaming_sessions"' in s for s in sql)
    assert begun.user_message.seq == 3 and begun.session is known.session
    events = _finish(begun, owner, "Second")
    assert events[-1].message.seq == 4 and events[-1].message.status == "complete"
    assert ChatSession.objects.get(pk=session.pk).total_messages == 4


def test_what_the_caller_read_is_read_again_when_a_message_arrived_since(owner, acme, chat):
    session = start(owner)
    known = _known(session.pk)
    chat(session, owner, "Sent from another tab meanwhile")  # two messages the reader has not seen
    begun = services.begin_turn(session_id=session.pk, user=owner, message="Mine", known=known)
    assert begun.user_message.seq == 3
    assert [entry.seq for entry in begun.plan.entries] == [1, 2, 3]
    _finish(begun, owner, "Mine")  # the chain links to the other tab's answer (sound_sessions checks it)


def test_what_the_caller_read_is_read_again_after_a_switch(owner, acme, chat, client_globex):
    session = start(owner)
    chat(session, owner, "Before the switch")
    known = _known(session.pk)
    services.session_switch(session_id=session.pk, user=owner, client="globex", model="ollama:qwen2.5")
    begun = services.begin_turn(session_id=session.pk, user=owner, message="After", known=known)
    assert begun.model_name == "ollama:qwen2.5" and begun.user_message.domain.slug == "globex"
    assert begun.stream is not None  # the switch's pending context stream is settled by this call
    events = _finish(begun, owner, "After")
    assert events[-1].message.domain.slug == "globex"


def test_a_finished_turn_hands_its_caller_the_session_for_the_next_turn(owner, acme, chat):
    session = start(owner)
    _texts, done = chat(session, owner, "First")
    known = done.known
    assert known is not None and known.session.total_messages == 2
    stored = list(SessionMessage.objects.filter(session=session).order_by("seq").values_list(*services.TURN_ROW_FIELDS))
    assert known.rows == stored  # exactly what reading them again would give

    async def second():
        return [
            e async for e in services.session_chat(session_id=session.pk, user=owner, message="Second", known=known)
        ]

    with CaptureQueriesContext(connection) as queries:
        events = async_to_sync(second)()
    # The history is not read again (the answer's transaction still reads the chain's tail).
    assert not any('"ollama_session_messages"."content"' in q["sql"] for q in queries)
    assert events[-1].message.seq == 4 and events[-1].known.session.total_messages == 4


def test_no_session_is_handed_on_when_it_is_too_long_to_keep(owner, acme, chat, monkeypatch):
    monkeypatch.setattr(services.turns, "KNOWN_HISTORY_MAX_CHARS", 10)
    _texts, done = chat(start(owner), owner, "A question longer than ten characters")
    assert done.known is None
