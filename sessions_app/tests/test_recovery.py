"""Answers whose process is gone: checkpoints, settling from them, one stale rule, a lost final store.

DESIGN.md invariant 5: a process that dies mid-answer loses at most 2 seconds of it; a turn
whose process is gone is settled as `partial` (by the guardian, the next start-up, the next
chat, or an end), never left "in progress"; a failed final store ends the stream with an error,
keeps the text in the log, and the guardian restores it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
from datetime import timedelta
from io import StringIO

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.db import database_sync_to_async
from django.core.management import call_command
from django.db import OperationalError, connection
from django.test import AsyncClient
from django.utils import timezone
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from billing import selectors as billing_selectors
from billing.models import LLMUsage
from sessions_app import services
from sessions_app.errors import SessionBusy, SessionEnded, StoreFailed
from sessions_app.events import Done
from sessions_app.invariants import check_session
from sessions_app.models import ORPHANED_TURN, ApiToken, ChatSession, SessionMessage
from sessions_app.services import turns
from sessions_app.tests.schema_check import assert_matches
from tests.querycount import WriteTransactions

pytestmark = pytest.mark.usefixtures("sound_sessions")


@pytest.fixture
def acme(client_acme, use_simulator):
    return client_acme


def start(owner, model="ollama:llama3.2"):
    return services.session_start(user=owner, client="acme", model=model)


def dead_owner() -> str:
    """The owner string of a process on this host that has exited."""
    process = subprocess.Popen(["true"])
    process.wait()
    return f"{socket.gethostname()}:{process.pid}:1"


def abandoned_turn(session, owner, *, text: str, owner_id: str, at=None) -> None:
    """A question whose answer streamed in a process that is now gone, with `text` checkpointed."""
    begun = services.begin_turn(session_id=session.pk, user=owner, message="Where were we?")
    turns._unregister(begun.turn)  # that process's registry died with it
    ChatSession.objects.filter(pk=session.pk).update(
        turn_owner=owner_id, turn_partial=text, turn_checkpoint_at=at or timezone.now(), turn_prompt_tokens=12
    )


def guard() -> str:
    out = StringIO()
    call_command("guard_sessions", stdout=out)
    return out.getvalue()


# --- One definition of stale (issue 17) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("stale_seconds", "silent_for", "stale"), [(100, 101, True), (100, 99, False), (1000, 101, False)]
)
def test_the_guardian_the_monitoring_page_and_the_claim_takeover_read_one_stale_setting(
    owner, acme, settings, chat, stale_seconds, silent_for, stale
):
    settings.TURN_STALE_SECONDS = stale_seconds
    session = start(owner)
    claimed = timezone.now() - timedelta(seconds=silent_for)
    # A process on another host: only the stale rule can tell it is gone.
    abandoned_turn(session, owner, text="Half an answer", owner_id="elsewhere:4242:1", at=claimed)
    ChatSession.objects.filter(pk=session.pk).update(turn_started_at=claimed)

    listed = billing_selectors.stuck_sessions().filter(pk=session.pk).exists()
    stuck = services.sessions_stuck().filter(pk=session.pk).exists()
    assert listed == stuck == stale
    if stale:
        _texts, done = chat(session, owner, "Carry on")  # the takeover settles the stale answer first
        assert [m.status for m in session.messages.order_by("seq")] == ["complete", "partial", "complete", "complete"]
        assert done.message.seq == 4
    else:
        with pytest.raises(SessionBusy):
            chat(session, owner, "Carry on")
        assert "0 stuck" in guard()
        ChatSession.objects.filter(pk=session.pk).update(turn_owner=ORPHANED_TURN)  # let sound_sessions finish
        guard()


# --- Checkpoints ------------------------------------------------------------------------------


def test_a_long_answer_is_checkpointed_at_most_once_per_interval_and_never_per_token(owner, acme, chat, monkeypatch):
    # A fifth of the design's 2 s, so a 2-second answer shows several checkpoints.
    monkeypatch.setattr(turns, "CHECKPOINT_SECONDS", 0.2)
    session = start(owner, model="ollama:llama3.2-rate-50-words-100")
    seen: list[tuple[str, str]] = []

    async def look(count: int) -> None:
        if count % 20 == 0:
            row = await sync_to_async(
                lambda: ChatSession.objects.values_list("turn_partial", "turn_owner").get(pk=session.pk)
            )()
            seen.append(row)

    counter = WriteTransactions()
    with connection.execute_wrapper(counter):
        started = timezone.now()
        texts, done = chat(session, owner, "A long one", on_token=look)
        seconds = (timezone.now() - started).total_seconds()
    assert done.message.status == "complete" and len(texts) == 100
    checkpoints = counter.count - 2  # the claim with the question, the answer
    assert 1 <= checkpoints <= seconds / 0.2 + 1
    # What a checkpoint holds is the answer so far, by this process.
    partials = [text for text, _owner in seen if text]
    assert partials and all(done.message.content.startswith(text) for text in partials)
    assert {owner_id for _text, owner_id in seen} == {services.process_owner()}
    stored = ChatSession.objects.get(pk=session.pk)
    assert (stored.turn_partial, stored.turn_owner, stored.turn_checkpoint_at) == ("", "", None)


def test_a_short_answer_writes_no_checkpoint(owner, acme, chat):
    session = start(owner, model="ollama:llama3.2-words-60")
    counter = WriteTransactions()
    with connection.execute_wrapper(counter):
        chat(session, owner, "Quick")
    assert counter.count == 2


# --- Settling a turn whose process is gone ------------------------------------------------------


def test_the_guardian_settles_an_answer_whose_process_died_from_its_checkpoint(owner, acme):
    session = start(owner)
    abandoned_turn(session, owner, text="The first half of the answer", owner_id=dead_owner())
    held = ChatSession.objects.get(pk=session.pk)
    saved = held.turn_checkpoint_at
    assert not services.turn_is_live(held)

    out = guard()
    assert f"stuck {session.pk}" in out and "1 stuck turn(s) settled" in out
    answer = SessionMessage.objects.get(session=session, role="assistant")
    assert (answer.status, answer.content) == ("partial", "The first half of the answer")
    assert answer.error_text == services.SETTLED_CUT_OFF.format(at=saved)
    assert answer.timestamp == saved and answer.token_source == "estimated" and answer.prompt_tokens == 12
    usage = LLMUsage.objects.get(message=answer)
    assert usage.status == "error" and usage.completion_tokens == answer.completion_tokens > 0
    fresh = ChatSession.objects.get(pk=session.pk)
    assert fresh.turn_started_at is None and fresh.total_messages == 2
    assert check_session(fresh) == []
    assert "0 stuck" in guard()  # settled once


def test_a_live_answer_of_this_process_is_never_settled(owner, acme):
    session = start(owner)
    begun = services.begin_turn(session_id=session.pk, user=owner, message="Still thinking")
    try:
        assert services.turn_is_live(ChatSession.objects.get(pk=session.pk))
        assert "0 stuck" in guard()
        assert not SessionMessage.objects.filter(session=session, role="assistant").exists()
    finally:
        turns._unregister(begun.turn)
        ChatSession.objects.filter(pk=session.pk).update(turn_owner=ORPHANED_TURN)
        guard()


def test_the_next_chat_settles_a_dead_answer_instead_of_waiting_for_it(owner, acme, chat):
    session = start(owner)
    abandoned_turn(session, owner, text="Cut here", owner_id=dead_owner())
    _texts, done = chat(session, owner, "Let us try again")
    rows = list(session.messages.order_by("seq").values_list("role", "status", "content"))
    assert rows[:3] == [
        ("user", "complete", "Where were we?"),
        ("assistant", "partial", "Cut here"),
        ("user", "complete", "Let us try again"),
    ]
    assert done.message.seq == 4 and done.message.status == "complete"


def test_an_end_settles_a_dead_answer_before_the_seal_without_waiting(owner, acme):
    session = start(owner)
    abandoned_turn(session, owner, text="", owner_id=dead_owner())
    summary = services.session_end(session_id=session.pk, user=owner)
    answer = SessionMessage.objects.get(session=session, role="assistant")
    assert answer.status == "error" and answer.content == "" and answer.tokens == 0
    ended = ChatSession.objects.get(pk=session.pk)
    assert answer.timestamp <= ended.ended_at
    assert summary["integrity"]["valid"] and summary["total_messages"] == 2


# --- A lost final store (issue 18, item 8) ------------------------------------------------------


class LoseTheDatabase:
    """Fail every INSERT of a message once `lost` is set, as a dropped database connection would."""

    def __init__(self) -> None:
        self.lost = False

    def __call__(self, execute, sql, params, many, ctx):
        if self.lost and "ollama_session_messages" in sql and sql.lstrip().upper().startswith("INSERT"):
            raise OperationalError("server closed the connection unexpectedly")
        return execute(sql, params, many, ctx)


def test_a_failed_final_store_raises_logs_the_text_hands_over_the_claim_and_the_guardian_restores_it(
    owner, acme, caplog
):
    session = start(owner, model="ollama:llama3.2-words-30")
    outage = LoseTheDatabase()

    async def scenario():
        received = []
        events = services.session_chat(session_id=session.pk, user=owner, message="Answer me")
        with pytest.raises(StoreFailed) as excinfo:
            async for event in events:
                received.append(event.text)
                outage.lost = True  # the question is stored; the database goes away mid-answer
        return "".join(received), excinfo.value

    with caplog.at_level(logging.ERROR, logger="sessions_app.services.turns"), connection.execute_wrapper(outage):
        text, error = async_to_sync(scenario)()
    assert error.status == 503 and error.message == services.ANSWER_NOT_STORED
    assert text and text in caplog.text  # the text survives in the log line
    held = ChatSession.objects.get(pk=session.pk)
    assert (held.turn_owner, held.turn_partial) == (ORPHANED_TURN, text)  # released to the guardian
    assert not SessionMessage.objects.filter(session=session, role="assistant").exists()

    assert f"stuck {session.pk}" in guard()
    answer = SessionMessage.objects.get(session=session, role="assistant")
    assert (answer.status, answer.content) == ("partial", text)
    assert answer.error_text.startswith("Cut off: this answer could not be stored")


class LoseTheDatabaseAtTheFinalStore:
    """Fail the second INSERT of a message (the answer; the first is the question)."""

    def __init__(self) -> None:
        self.inserts = 0

    def __call__(self, execute, sql, params, many, ctx):
        if "ollama_session_messages" in sql and sql.lstrip().upper().startswith("INSERT"):
            self.inserts += 1
            if self.inserts >= 2:
                raise OperationalError("server closed the connection unexpectedly")
        return execute(sql, params, many, ctx)


def _stream(path: str, body: dict, token: str) -> bytes:
    async def go():
        response = await AsyncClient().post(
            path, body, content_type="application/json", headers={"authorization": f"Bearer {token}"}
        )
        assert response.status_code == 200, response.content
        return b"".join([chunk async for chunk in response.streaming_content])

    return async_to_sync(go)()


@pytest.mark.parametrize("protocol", ["rest", "ollama", "openai"])
def test_a_lost_final_store_ends_each_stream_with_its_protocols_error(owner, acme, caplog, protocol):
    _token, raw = ApiToken.issue(user=owner, client=acme)
    session = start(owner, model="ollama:llama3.2-words-20")
    with connection.execute_wrapper(LoseTheDatabaseAtTheFinalStore()), caplog.at_level(logging.ERROR):
        if protocol == "rest":
            body = _stream(f"/api/ollama/session/{session.pk}/chat", {"message": "Hi", "stream": True}, raw)
            last = json.loads(body.decode().splitlines()[-1])
            assert last == {"type": "error", "error": {"code": "store_failed", "message": services.ANSWER_NOT_STORED}}
            text = "".join(json.loads(line).get("text", "") for line in body.decode().splitlines())
        elif protocol == "ollama":
            chat = {"model": "llama3.2-words-20", "messages": [{"role": "user", "content": "Hi"}]}
            lines = [json.loads(line) for line in _stream("/api/chat", chat, raw).decode().splitlines()]
            assert lines[-1] == {"error": services.ANSWER_NOT_STORED}
            text = "".join(line["message"]["content"] for line in lines[:-1])
        else:
            chat = {"model": "llama3.2-words-20", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
            events = _stream("/v1/chat/completions", chat, raw).decode().split("\n\n")
            error = json.loads(events[-2].removeprefix("data: "))["error"]
            assert (error["code"], error["message"]) == ("store_failed", services.ANSWER_NOT_STORED)
            chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c.get("choices"))
    assert text and text in caplog.text  # kept in the log line
    guard()  # the guardian restores it
    sessions = ChatSession.objects.filter(user=owner, turn_started_at__isnull=True)
    restored = SessionMessage.objects.filter(session__in=sessions, role="assistant", status="partial")
    assert [m.content for m in restored] == [text]


@pytest.mark.django_db(transaction=True)
async def test_a_lost_final_store_is_an_error_frame_on_the_chat_socket(owner, acme, settings):
    from channels.routing import URLRouter
    from channels.testing import WebsocketCommunicator

    from sessions_app import livechat
    from sessions_app.routing import websocket_urlpatterns

    session = await sync_to_async(start)(owner, model="ollama:llama3.2-words-20")
    outage = LoseTheDatabaseAtTheFinalStore()
    # The socket's database work runs on the database thread: lose the database there.
    await database_sync_to_async(lambda: connection.execute_wrappers.append(outage))()
    socket = WebsocketCommunicator(URLRouter(websocket_urlpatterns), f"/ws/sessions/{session.pk}/")
    socket.scope["user"] = owner
    try:
        assert (await socket.connect(timeout=10))[0]
        assert json.loads(await socket.receive_from(timeout=10))["type"] == "ready"
        await socket.send_json_to({"type": "chat", "message": "Hi", "turn": "lost"})
        frames = []
        while not frames or frames[-1]["type"] not in ("error", "message.done"):
            frames.append(json.loads(await socket.receive_from(timeout=10)))
        await socket.disconnect()
        await asyncio.gather(*livechat.turns_in_flight())
    finally:
        await database_sync_to_async(lambda: connection.execute_wrappers.remove(outage))()
    error = frames[-1]
    assert (error["type"], error["code"], error["turn"]) == ("error", "store_failed", "lost")
    assert error["stored"] is None  # it never claims the answer was stored
    assert error["message"] == services.ANSWER_NOT_STORED
    out = await database_sync_to_async(guard)()
    assert f"stuck {session.pk}" in out


def test_the_rest_api_answers_503_with_retry_after_when_the_database_is_unreachable(owner, acme):
    from django.test import Client

    _token, raw = ApiToken.issue(user=owner)
    api = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")

    def unreachable(execute, sql, params, many, ctx):
        raise OperationalError('connection to server at "127.0.0.1", port 5432 failed: Connection refused')

    with connection.execute_wrapper(unreachable):
        response = api.get("/api/ollama/sessions")
    assert response.status_code == 503 and response["Retry-After"] == "1"
    assert response.json()["error"]["code"] == "database_unavailable"
    assert_matches(response.json(), "/sessions", "get", 503)


# --- An end racing the start of a turn (issue 18, item 3) ---------------------------------------


@pytest.mark.slow
@hypothesis_settings(
    max_examples=16, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    ask_after=st.floats(min_value=0, max_value=0.03),
    end_after=st.floats(min_value=0, max_value=0.4),
    how=st.sampled_from(["async", "sync"]),
)
def test_an_end_racing_the_start_of_a_turn_stops_it_or_waits_and_never_stores_after_the_end(
    owner, acme, ask_after, end_after, how
):
    session = start(owner, model="ollama:llama3.2-fault-slow-words-4")

    async def scenario():
        async def ask():
            await asyncio.sleep(ask_after)
            events = []
            try:
                async for event in services.session_chat(session_id=session.pk, user=owner, message="Race me"):
                    events.append(event)
            except SessionEnded as exc:  # ended before the claim, or stopped by the end
                return exc
            return events

        async def end():
            await asyncio.sleep(end_after)
            if how == "async":
                return await services.asession_end(session_id=session.pk, user=owner)
            return await sync_to_async(services.session_end)(session_id=session.pk, user=owner)

        return await asyncio.gather(ask(), end())

    asked, summary = async_to_sync(scenario)()
    again = services.session_end(session_id=session.pk, user=owner)
    assert again == summary  # ending twice: the identical JSON
    ended = ChatSession.objects.get(pk=session.pk)
    messages = list(ended.messages.order_by("seq"))
    assert all(m.timestamp <= ended.ended_at for m in messages)
    assert all(u.created_at <= ended.ended_at for u in LLMUsage.objects.filter(session=ended))
    if isinstance(asked, list):
        assert isinstance(asked[-1], Done) and [m.status for m in messages] == ["complete", "complete"]
    else:
        assert [m.role for m in messages] in ([], ["user", "assistant"])
        assert all(m.status != "complete" for m in messages if m.role == "assistant")
    assert summary["total_messages"] == len(messages) and summary["integrity"]["valid"]
    assert check_session(ended) == []
