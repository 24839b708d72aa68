"""The chat WebSocket: who may connect, frame validation, streaming, stop, switch, end, fan-out."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging

import pytest
from channels.db import database_sync_to_async
from channels.layers import InMemoryChannelLayer
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser

from billing.models import LLMUsage
from sessions_app import livechat, services
from sessions_app.consumers import (
    CLOSE_NOT_FOUND,
    CLOSE_UNAUTHENTICATED,
    SessionConsumer,
)
from sessions_app.errors import MESSAGE_EMPTY, SESSION_BUSY
from sessions_app.frames import check_outbound
from sessions_app.invariants import check_session
from sessions_app.models import ChatSession, SessionMessage
from sessions_app.routing import websocket_urlpatterns

pytestmark = pytest.mark.django_db(transaction=True)

SLOW = "ollama:llama3.2-fault-slow-words-400"  # 20 tokens a second: still streaming when we act
FAST = "ollama:llama3.2-words-200"


def socket(session, user) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), f"/ws/sessions/{session.pk}/")
    communicator.scope["user"] = user
    return communicator


async def connected(session, user) -> WebsocketCommunicator:
    communicator = socket(session, user)
    ok, _ = await communicator.connect(timeout=10)
    assert ok
    ready = await receive(communicator)
    assert ready["type"] == "ready"
    return communicator


async def receive(communicator, timeout: float = 10) -> dict:
    """The next frame, held to its TypedDict in sessions_app/frames.py (every test here checks shapes)."""
    frame = json.loads(await communicator.receive_from(timeout=timeout))
    assert not check_outbound(frame), check_outbound(frame)
    return frame


async def frames_until(communicator, frame_type: str, timeout: float = 20) -> list[dict]:
    """Every frame up to and including the first of `frame_type`."""
    frames = []
    while True:
        frame = await receive(communicator, timeout)
        frames.append(frame)
        if frame["type"] == frame_type:
            return frames


def token_text(frames: list[dict]) -> str:
    return "".join(f["text"] for f in frames if f["type"] == "token")


@pytest.fixture
def start(owner, client_acme, use_simulator):
    def make(model: str = FAST, **kwargs) -> ChatSession:
        return services.session_start(user=owner, client=client_acme, model=model, **kwargs)

    return make


@database_sync_to_async
def stored_messages(session) -> list[SessionMessage]:
    return list(SessionMessage.objects.filter(session=session).order_by("seq"))


@database_sync_to_async
def reload(session) -> ChatSession:
    return ChatSession.objects.select_related("domain", "brand").get(pk=session.pk)


# --- Who may connect -------------------------------------------------------------------------


async def refused_with(communicator) -> int:
    """The code a refused socket is closed with: accepted first, so the page sees the code."""
    assert await communicator.connect(timeout=10) == (True, None)
    closed = await communicator.receive_output(timeout=10)
    assert closed["type"] == "websocket.close"
    return closed["code"]


async def test_only_the_signed_in_owner_may_connect_to_an_unshared_session(start, outsider, staff):
    session = await database_sync_to_async(start)()
    for user, code in [(AnonymousUser(), CLOSE_UNAUTHENTICATED), (outsider, CLOSE_NOT_FOUND), (staff, CLOSE_NOT_FOUND)]:
        # Staff review sessions in the admin; a live chat is its participants' alone
        # (test_shared_live.py: the consultants it is shared with).
        assert await refused_with(socket(session, user)) == code


async def test_owner_is_greeted_with_the_session(start, owner):
    session = await database_sync_to_async(start)()
    communicator = socket(session, owner)
    assert (await communicator.connect(timeout=10))[0]
    ready = await receive(communicator)
    assert ready["type"] == "ready"
    assert ready["session"]["session_id"] == str(session.pk)
    assert ready["session"]["client"] == "acme"
    assert ready["streaming"] is False
    await communicator.disconnect()


async def test_full_stack_accepts_the_session_cookie_and_refuses_without_it(start, owner, client):
    from config.asgi import application

    session = await database_sync_to_async(start)()
    await database_sync_to_async(client.force_login)(owner)
    cookie = f"sessionid={client.cookies['sessionid'].value}".encode()
    path = f"/ws/sessions/{session.pk}/"

    signed_in = WebsocketCommunicator(
        application, path, headers=[(b"origin", b"http://localhost"), (b"cookie", cookie)]
    )
    assert (await signed_in.connect(timeout=10))[0]
    assert (await receive(signed_in))["type"] == "ready"
    await signed_in.disconnect()

    anonymous = WebsocketCommunicator(application, path, headers=[(b"origin", b"http://localhost")])
    assert await refused_with(anonymous) == CLOSE_UNAUTHENTICATED

    foreign_origin = WebsocketCommunicator(
        application, path, headers=[(b"origin", b"https://evil.example"), (b"cookie", cookie)]
    )
    assert (await foreign_origin.connect(timeout=10))[0] is False


# --- Every inbound frame is validated ----------------------------------------------------------


async def test_bad_frames_get_error_frames_and_the_socket_stays_open(start, owner, settings):
    settings.CHAT_MAX_MESSAGE_CHARS = 50
    session = await database_sync_to_async(start)()
    communicator = await connected(session, owner)

    cases = [
        ("not json at all", "invalid_json"),
        ("[1, 2]", "invalid_frame"),
        ('{"message": "no type"}', "invalid_frame"),
        ('{"type": "dance"}', "unknown_type"),
        ('{"type": "chat"}', "bad_request"),
        ('{"type": "chat", "message": "   "}', "bad_request"),
        ('{"type": "chat", "message": 42}', "bad_request"),
        ('{"type": "chat", "message": "hi", "turn": "<script>"}', "bad_request"),
        (json.dumps({"type": "chat", "message": "x" * 51}), "message_too_large"),
        (json.dumps({"type": "chat", "message": "x" * 10_000}), "message_too_large"),
        ('{"type": "switch"}', "bad_request"),
        ('{"type": "switch", "client": ["acme"]}', "bad_request"),
    ]
    for text, code in cases:
        await communicator.send_to(text_data=text)
        frame = await receive(communicator)
        assert (frame["type"], frame["code"]) == ("error", code), text
        assert frame["message"]

    await communicator.send_json_to({"type": "switch", "client": "nobody"})
    unknown = await receive(communicator)
    assert (unknown["type"], unknown["code"]) == ("error", "bad_request")
    assert "nobody" in unknown["message"]

    await communicator.send_to(bytes_data=b"\x00\x01")
    assert (await receive(communicator))["code"] == "invalid_frame"

    await communicator.send_json_to({"type": "chat"})
    assert (await receive(communicator))["message"] == MESSAGE_EMPTY

    await communicator.send_json_to({"type": "ping"})
    assert (await receive(communicator))["type"] == "pong"
    assert await stored_messages(session) == []
    await communicator.disconnect()


# --- Streaming -------------------------------------------------------------------------------


async def test_an_answer_streams_as_tokens_then_message_done_with_totals(start, owner):
    session = await database_sync_to_async(start)()
    communicator = await connected(session, owner)
    await communicator.send_json_to({"type": "chat", "message": "Summarise the contract", "turn": "t1"})
    frames = await frames_until(communicator, "message.done")
    await communicator.disconnect()

    assert frames[0] == {"type": "turn.started", "turn": "t1", "message": "Summarise the contract"}
    done = frames[-1]
    assert {f["turn"] for f in frames} == {"t1"}
    assert token_text(frames) == done["message"]["content"]
    assert done["message"]["role"] == "assistant"
    assert done["message"]["status"] == "complete"
    assert done["message"]["tokens"] > 0
    assert done["message"]["cost_usd"] == "0.000000"
    assert done["session"]["total_messages"] == 2
    assert done["session"]["total_tokens"] == done["message"]["tokens"] + 0  # the user message costs nothing
    user, answer = await stored_messages(session)
    assert (user.role, user.content) == ("user", "Summarise the contract")
    assert answer.content == done["message"]["content"]


async def test_a_fast_stream_is_coalesced_by_the_timer_not_by_the_number_of_tokens(start, owner, monkeypatch):
    session = await database_sync_to_async(start)()
    communicator = await connected(session, owner)

    # A long interval: the first delta leaves at once and everything else in one final frame.
    monkeypatch.setattr(SessionConsumer, "token_interval", 60.0)
    await communicator.send_json_to({"type": "chat", "message": "hello"})
    coalesced = await frames_until(communicator, "message.done")

    # No interval: every delta would be a frame of its own.
    monkeypatch.setattr(SessionConsumer, "token_interval", 0.0)
    await communicator.send_json_to({"type": "chat", "message": "hello again"})
    uncoalesced = await frames_until(communicator, "message.done")
    await communicator.disconnect()

    assert len([f for f in coalesced if f["type"] == "token"]) == 2
    assert token_text(coalesced) == coalesced[-1]["message"]["content"]
    assert len(coalesced[-1]["message"]["content"].split()) >= 200
    assert len([f for f in uncoalesced if f["type"] == "token"]) >= 200
    assert token_text(uncoalesced) == uncoalesced[-1]["message"]["content"]


async def test_a_second_chat_while_streaming_is_refused_as_busy(start, owner):
    session = await database_sync_to_async(start)(model=SLOW)
    communicator = await connected(session, owner)
    await communicator.send_json_to({"type": "chat", "message": "first", "turn": "a"})
    await frames_until(communicator, "token")
    await communicator.send_json_to({"type": "chat", "message": "second", "turn": "b"})
    frames = await frames_until(communicator, "error")
    assert (frames[-1]["code"], frames[-1]["message"]) == ("session_busy", SESSION_BUSY)
    await communicator.send_json_to({"type": "stop"})
    await frames_until(communicator, "stopped")
    await communicator.disconnect()
    assert [m.content for m in await stored_messages(session) if m.role == "user"] == ["first"]


async def test_stop_cancels_the_answer_and_stores_exactly_what_was_shown(start, owner):
    session = await database_sync_to_async(start)(model=SLOW)
    communicator = await connected(session, owner)
    await communicator.send_json_to({"type": "chat", "message": "tell me everything", "turn": "s"})
    frames = await frames_until(communicator, "token")
    frames += await frames_until(communicator, "token")
    await communicator.send_json_to({"type": "stop"})
    frames += await frames_until(communicator, "stopped")
    await communicator.disconnect()

    stopped = frames[-1]
    assert stopped["stored"]["status"] == "partial"
    assert stopped["stored"]["content"] == token_text(frames)
    assert stopped["session"]["total_messages"] == 2
    answer = (await stored_messages(session))[-1]
    assert (answer.role, answer.status, answer.content) == ("assistant", "partial", token_text(frames))
    usage = await database_sync_to_async(lambda: LLMUsage.objects.get(session=session))()
    assert usage.status == "cancelled"
    assert (await reload(session)).turn_started_at is None


async def answers_finished() -> None:
    """Wait for the turns this process runs (they outlive their sockets) to store their answers."""
    await asyncio.gather(*livechat.turns_in_flight())


async def test_disconnecting_mid_answer_does_not_cancel_it(start, owner):
    # The page closing or reloading only stops watching: the answer runs to its end and is stored.
    session = await database_sync_to_async(start)(model="ollama:llama3.2-fault-slow-words-12")
    communicator = await connected(session, owner)
    await communicator.send_json_to({"type": "chat", "message": "a long one please"})
    frames = await frames_until(communicator, "token")
    await communicator.disconnect()
    await answers_finished()

    messages = await stored_messages(session)
    assert [m.role for m in messages] == ["user", "assistant"]
    assert messages[-1].status == "complete"
    assert messages[-1].content.startswith(token_text(frames))
    assert len(messages[-1].content.split()) == 12
    assert (await reload(session)).turn_started_at is None


async def test_a_provider_failure_is_an_error_frame_with_the_stored_partial(start, owner):
    session = await database_sync_to_async(start)(model="ollama:llama3.2-fault-midstream")
    communicator = await connected(session, owner)
    await communicator.send_json_to({"type": "chat", "message": "hi", "turn": "f"})
    frames = await frames_until(communicator, "error")
    await communicator.disconnect()
    error = frames[-1]
    assert error["code"] == "provider_error"
    assert error["turn"] == "f"
    assert error["stored"]["status"] in ("partial", "error")
    assert error["stored"]["content"] == token_text(frames)


# --- Switch and end --------------------------------------------------------------------------


async def test_switch_moves_the_session_and_sends_the_new_brand(start, owner, client_globex):
    session = await database_sync_to_async(start)()
    communicator = await connected(session, owner)
    await communicator.send_json_to({"type": "switch", "client": "globex", "reason": "their ticket"})
    switched = await receive(communicator)
    await communicator.disconnect()

    assert switched["type"] == "switched"
    assert switched["client"] == {"slug": "globex", "name": "Globex"}
    assert switched["model"] == session.current_model
    assert switched["brand"]["name"] == "Globex"
    assert switched["brand"]["primary_color"] == "#c92a2a"
    assert switched["stream"]["source_client"] == "acme"
    assert switched["stream"]["target_client"] == "globex"
    assert switched["session"]["client"] == "globex"
    assert (await reload(session)).domain.slug == "globex"


async def test_switch_while_streaming_is_refused_as_busy(start, owner, client_globex):
    session = await database_sync_to_async(start)(model=SLOW)
    communicator = await connected(session, owner)
    await communicator.send_json_to({"type": "chat", "message": "go"})
    await frames_until(communicator, "token")
    await communicator.send_json_to({"type": "switch", "client": "globex"})
    frames = await frames_until(communicator, "error")
    assert frames[-1]["code"] == "session_busy"
    await communicator.disconnect()
    assert (await reload(session)).domain.slug == "acme"


async def test_end_stops_the_answer_and_sends_the_summary_url(start, owner):
    session = await database_sync_to_async(start)(model=SLOW)
    communicator = await connected(session, owner)
    await communicator.send_json_to({"type": "chat", "message": "go"})
    await frames_until(communicator, "token")
    await communicator.send_json_to({"type": "end"})
    frames = await frames_until(communicator, "ended")
    assert "stopped" in [f["type"] for f in frames]
    ended = frames[-1]
    assert ended["summary_url"] == f"/sessions/{session.pk}/summary/"
    assert ended["summary"]["status"] == "ended"
    assert ended["summary"]["by_client"][0]["client"] == "acme"

    await communicator.send_json_to({"type": "chat", "message": "one more"})
    error = await frames_until(communicator, "error")
    assert error[-1]["code"] == "session_ended"
    await communicator.disconnect()
    assert [m.status for m in await stored_messages(session)] == ["complete", "partial"]


# --- Fan-out to the session's other sockets ----------------------------------------------------


async def test_a_second_tab_watches_the_same_answer_live(start, owner):
    session = await database_sync_to_async(start)()
    asking = await connected(session, owner)
    watching = await connected(session, owner)
    await asking.send_json_to({"type": "chat", "message": "for both tabs", "turn": "w"})
    asked = await frames_until(asking, "message.done")
    watched = await frames_until(watching, "message.done")
    await asking.disconnect()
    await watching.disconnect()

    question = watched[0].pop("question")
    assert watched[0] == {"type": "turn.started", "turn": "w", "message": "for both tabs"}
    assert (question["seq"], question["author"], question["content"]) == (1, "olivia", "for both tabs")
    assert asked[-1]["question"] == question  # the asker learns its message's number and time
    assert token_text(watched) == token_text(asked) == watched[-1]["message"]["content"]
    assert watched[-1]["message"]["message_id"] == asked[-1]["message"]["message_id"]


async def test_a_busy_refusal_is_not_broadcast_to_the_other_tab(start, owner):
    session = await database_sync_to_async(start)(model=SLOW)
    asking = await connected(session, owner)
    other = await connected(session, owner)
    await asking.send_json_to({"type": "chat", "message": "first"})
    await frames_until(other, "token")
    await other.send_json_to({"type": "chat", "message": "second", "turn": "x"})
    refused = await frames_until(other, "error")
    assert refused[-1]["code"] == "session_busy"
    # The other tab may stop the answer it watches.
    await other.send_json_to({"type": "stop"})
    asked = await frames_until(asking, "stopped")
    assert "error" not in [f["type"] for f in asked]
    await asking.disconnect()
    await other.disconnect()


class FailingChannelLayer(InMemoryChannelLayer):
    """A channel layer whose group operations fail, as a Redis outage would make them."""

    async def group_add(self, group, channel):
        raise ConnectionError("channel layer down")

    async def group_send(self, group, message):
        raise ConnectionError("channel layer down")


async def test_the_asking_socket_gets_its_answer_when_the_channel_layer_fails(start, owner, settings, caplog):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "sessions_app.tests.test_consumers.FailingChannelLayer"}}
    session = await database_sync_to_async(start)()
    communicator = socket(session, owner)
    with caplog.at_level(logging.WARNING, logger="sessions_app.consumers"):
        assert (await communicator.connect(timeout=10))[0]
        assert (await receive(communicator))["type"] == "ready"
        await communicator.send_json_to({"type": "chat", "message": "still there?"})
        frames = await frames_until(communicator, "message.done")
        await communicator.disconnect()
    assert token_text(frames) == frames[-1]["message"]["content"]
    assert "Fan-out" in caplog.text


async def test_the_asking_socket_gets_its_answer_when_redis_is_unreachable(start, owner, settings, caplog):
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": ["redis://127.0.0.1:9/0"]}}
    }
    session = await database_sync_to_async(start)()
    communicator = socket(session, owner)
    with caplog.at_level(logging.WARNING, logger="sessions_app.consumers"):
        assert (await communicator.connect(timeout=10))[0]
        assert (await receive(communicator))["type"] == "ready"
        await communicator.send_json_to({"type": "chat", "message": "still there?"})
        frames = await frames_until(communicator, "message.done")
        await communicator.disconnect()
    assert frames[-1]["message"]["status"] == "complete"
    assert token_text(frames) == frames[-1]["message"]["content"]


async def test_the_coalescer_never_sends_two_frames_within_one_interval():
    from sessions_app.consumers import TokenCoalescer

    loop = asyncio.get_running_loop()
    sent: list[tuple[float, str]] = []

    async def emit(text):
        sent.append((loop.time(), text))

    coalescer = TokenCoalescer(emit, 0.05)
    for index in range(40):
        await coalescer.add(f"{index} ")
        await asyncio.sleep(0.005)
    await coalescer.close()
    assert "".join(text for _, text in sent) == "".join(f"{i} " for i in range(40))
    # Every frame but the final flush waits a full interval after the one before.
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(sent[:-1])]
    assert all(gap >= 0.049 for gap in gaps)
    assert len(sent) < 40


async def test_turns_after_a_message_from_elsewhere_continue_the_same_history(start, owner):
    """The socket keeps the session between turns; a message stored elsewhere is not missed."""
    session = await database_sync_to_async(start)()
    communicator = await connected(session, owner)
    await communicator.send_json_to({"type": "chat", "message": "first", "turn": "a"})
    await frames_until(communicator, "message.done")
    # Another device chats in the same session meanwhile (through the chat service directly).
    await database_sync_to_async(services.session_append_history)(
        session_id=session.pk, user=owner, messages=[{"role": "user", "content": "from the phone"}]
    )
    await communicator.send_json_to({"type": "chat", "message": "second", "turn": "b"})
    done = (await frames_until(communicator, "message.done"))[-1]
    await communicator.send_json_to({"type": "chat", "message": "third", "turn": "c"})
    third = (await frames_until(communicator, "message.done"))[-1]
    await communicator.disconnect()

    assert done["message"]["seq"] == 5 and third["message"]["seq"] == 7
    assert third["session"]["total_messages"] == 7
    contents = [m.content for m in await stored_messages(session)]
    assert contents[:3] == [contents[0], contents[1], "from the phone"] and contents[3] == "second"
    assert await database_sync_to_async(check_session)(await reload(session)) == []


# --- Answers that outlive the socket: resume --------------------------------------------------

RESUMABLE = "ollama:llama3.2-fault-slow-words-30"  # 20 tokens a second: about 1.5 s of answer


async def test_a_tab_opened_mid_answer_gets_the_text_so_far_then_the_rest(start, owner):
    session = await database_sync_to_async(start)(model=RESUMABLE)
    asking = await connected(session, owner)
    await asking.send_json_to({"type": "chat", "message": "for everyone", "turn": "r1"})
    asked = await frames_until(asking, "token")
    asked += await frames_until(asking, "token")

    late = await connected(session, owner)  # a second tab, opened mid-answer
    await late.send_json_to({"type": "resume", "turn": None, "after": 0})
    caught = await frames_until(late, "resumed")
    assert caught[0] == {"type": "turn.started", "turn": "r1", "message": "for everyone", "resumed": True}
    assert caught[-1]["turn"] == "r1" and caught[-1]["n"] >= 2
    rest = await frames_until(late, "message.done")
    asked += await frames_until(asking, "message.done")
    await asking.disconnect()
    await late.disconnect()

    shown = token_text(caught + rest)
    assert shown == token_text(asked) == asked[-1]["message"]["content"]
    numbers = [f["n"] for f in caught + rest if f["type"] == "token"]
    assert numbers == sorted(set(numbers))  # nothing doubled, in order


async def test_a_reconnecting_tab_gets_exactly_the_frames_it_missed(start, owner):
    session = await database_sync_to_async(start)(model=RESUMABLE)
    asking = await connected(session, owner)
    await asking.send_json_to({"type": "chat", "message": "keep going", "turn": "r2"})
    first = await frames_until(asking, "token")
    await asking.disconnect()  # the tab reloads: only watching stops
    have = first[-1]["n"]
    await asyncio.sleep(0.3)  # the answer goes on meanwhile

    back = await connected(session, owner)
    await back.send_json_to({"type": "resume", "turn": "r2", "after": have})
    caught = await frames_until(back, "resumed")
    rest = await frames_until(back, "message.done")
    await back.disconnect()

    assert "turn.started" not in [f["type"] for f in caught]
    assert caught[0]["type"] == "token" and caught[0]["n"] > have
    assert token_text(first + caught + rest) == rest[-1]["message"]["content"]
    assert rest[-1]["message"]["status"] == "complete"


async def test_resume_with_no_answer_streaming_says_so(start, owner):
    session = await database_sync_to_async(start)()
    communicator = await connected(session, owner)
    await communicator.send_json_to({"type": "resume", "turn": "gone", "after": 3})
    assert await receive(communicator) == {"type": "resumed", "turn": None}
    for bad in ({"type": "resume", "after": -1}, {"type": "resume", "after": "3"}, {"type": "resume", "turn": "<x>"}):
        await communicator.send_json_to(bad)
        assert (await receive(communicator))["code"] == "bad_request"
    await communicator.disconnect()


async def test_a_tab_that_has_not_resumed_gets_no_tokens_of_a_turn_it_joined_late(start, owner):
    session = await database_sync_to_async(start)(model="ollama:llama3.2-fault-slow-words-8")
    asking = await connected(session, owner)
    await asking.send_json_to({"type": "chat", "message": "quiet", "turn": "q"})
    await frames_until(asking, "token")
    late = await connected(session, owner)  # never resumes: no half an answer, only the end
    done = await frames_until(late, "message.done")
    await frames_until(asking, "message.done")
    await asking.disconnect()
    await late.disconnect()
    assert [f["type"] for f in done] == ["message.done"]


async def test_stop_from_another_tab_stops_the_answer_and_says_who_stopped_it(start, owner):
    session = await database_sync_to_async(start)(model=SLOW)
    asking = await connected(session, owner)
    other = await connected(session, owner)
    await asking.send_json_to({"type": "chat", "message": "long", "turn": "s2"})
    await frames_until(other, "token")
    await other.send_json_to({"type": "stop"})
    stopped = (await frames_until(asking, "stopped"))[-1]
    await frames_until(other, "stopped")
    await asking.disconnect()
    await other.disconnect()
    assert stopped["stored"]["status"] == "partial"
    assert stopped["stored"]["error"] == services.STOPPED_BY_USER
