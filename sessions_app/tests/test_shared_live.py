"""A shared session, live: the owner's and the invited consultant's sockets on one stream.

Who may connect (participants only), who typed what, one timer and one bill, Stop from either,
End from the owner only, revocation closing the guest's socket at once (4403), and edit and
regenerate over the socket making a new version without rewriting the billed session.
"""

from __future__ import annotations

import asyncio

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone

from billing.models import LLMUsage
from sessions_app import livechat, services
from sessions_app.consumers import CLOSE_NOT_FOUND, CLOSE_REVOKED, END_NOT_OWNER_MESSAGE, REVOKED_MESSAGE
from sessions_app.models import ChatSession, SessionInvitation, SessionMessage, SessionSegment, SessionSource
from sessions_app.tests.test_consumers import (
    FAST,
    SLOW,
    connected,
    frames_until,
    receive,
    refused_with,
    reload,
    socket,
    stored_messages,
    token_text,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def shared(owner, colleague, client_acme, use_simulator):
    """A running session of the owner's, shared with the colleague."""

    for user, first, last in ((owner, "Olivia", "Reyes"), (colleague, "Colin", "Barr")):
        user.first_name, user.last_name = first, last
        user.save(update_fields=["first_name", "last_name"])

    def make(model: str = FAST) -> ChatSession:
        session = services.session_start(user=owner, client=client_acme, model=model)
        services.session_invite(session_id=session.pk, user=owner, invitee="colin")
        return session

    return make


async def closed_with(communicator, timeout: float = 10) -> int:
    output = await communicator.receive_output(timeout=timeout)
    assert output["type"] == "websocket.close", output
    return output["code"]


async def finish_turns() -> None:
    await asyncio.gather(*livechat.turns_in_flight())


# --- Who may connect ------------------------------------------------------------------------


async def test_the_invited_consultant_connects_and_the_uninvited_and_staff_get_4404(shared, colleague, outsider, staff):
    session = await database_sync_to_async(shared)()
    guest = socket(session, colleague)
    assert (await guest.connect(timeout=10))[0]
    ready = await receive(guest)
    assert (ready["type"], ready["owner"], ready["session"]["session_id"]) == ("ready", False, str(session.pk))
    await guest.disconnect()
    for user in (outsider, staff):  # staff review in the admin; they do not join a live chat
        assert await refused_with(socket(session, user)) == CLOSE_NOT_FOUND


# --- One stream, two people -----------------------------------------------------------------


async def test_both_see_one_stream_each_message_records_its_author_and_the_bill_stays_the_owners(
    shared, owner, colleague
):
    session = await database_sync_to_async(shared)()
    mine = await connected(session, owner)
    theirs = await connected(session, colleague)

    await mine.send_json_to({"type": "chat", "message": "Olivia asks", "turn": "o1"})
    asked = await frames_until(mine, "message.done")
    watched = await frames_until(theirs, "message.done")
    assert watched[0]["type"] == "turn.started" and watched[0]["question"]["author"] == "olivia"
    assert token_text(watched) == token_text(asked) == watched[-1]["message"]["content"]

    await theirs.send_json_to({"type": "chat", "message": "Colin asks", "turn": "c1"})
    by_guest = await frames_until(mine, "message.done")
    await frames_until(theirs, "message.done")
    started = by_guest[0]
    assert started["type"] == "turn.started" and started["message"] == "Colin asks"
    assert (started["question"]["author"], started["question"]["author_name"]) == ("colin", "Colin Barr")
    await mine.disconnect()
    await theirs.disconnect()

    stored = await stored_messages(session)
    assert [(m.role, m.author_id) for m in stored] == [
        ("user", owner.pk),
        ("assistant", None),
        ("user", colleague.pk),
        ("assistant", None),
    ]

    def bill():
        usage = list(LLMUsage.objects.filter(session=session).order_by("created_at"))
        segments = SessionSegment.objects.filter(session=session).count()
        return [(u.user_id, u.client_id) for u in usage], segments, ChatSession.objects.count()

    usage, segments, sessions = await database_sync_to_async(bill)()
    # Who asked is on each call; the client is the session's; one timer (one segment, one session).
    assert usage == [(owner.pk, session.domain_id), (colleague.pk, session.domain_id)]
    assert (segments, sessions) == (1, 1)


async def test_the_guest_stops_the_owners_answer_but_may_not_end_the_session(shared, owner, colleague):
    session = await database_sync_to_async(shared)(model=SLOW)
    mine = await connected(session, owner)
    theirs = await connected(session, colleague)
    await mine.send_json_to({"type": "chat", "message": "a long one", "turn": "long"})
    await frames_until(theirs, "token")

    await theirs.send_json_to({"type": "end"})
    refused = await frames_until(theirs, "error")
    assert (refused[-1]["code"], refused[-1]["message"]) == (
        "not_owner",
        END_NOT_OWNER_MESSAGE.format(owner="Olivia Reyes"),
    )
    assert (await reload(session)).status == "active"

    await theirs.send_json_to({"type": "stop"})
    stopped = await frames_until(mine, "stopped")
    assert stopped[-1]["stored"]["status"] == "partial"
    await frames_until(theirs, "stopped")
    await mine.disconnect()
    await theirs.disconnect()
    assert (await reload(session)).status == "active"


# --- Revocation -----------------------------------------------------------------------------


async def test_revoking_closes_the_guests_open_socket_at_once_and_leaves_the_owners(shared, owner, colleague):
    session = await database_sync_to_async(shared)()
    mine = await connected(session, owner)
    theirs = await connected(session, colleague)

    await database_sync_to_async(services.session_revoke)(session_id=session.pk, user=owner, invitee="colin")

    frame = await receive(theirs)
    assert frame == {"type": "revoked", "message": REVOKED_MESSAGE.format(owner="Olivia Reyes")}
    assert await closed_with(theirs) == CLOSE_REVOKED
    await mine.send_json_to({"type": "ping"})
    assert (await receive(mine))["type"] == "pong"  # the owner's socket goes on
    await mine.disconnect()
    assert await refused_with(socket(session, colleague)) == CLOSE_NOT_FOUND  # and cannot come back


async def test_a_revocation_nobody_announced_applies_on_the_guests_next_frame(shared, colleague):
    session = await database_sync_to_async(shared)()
    theirs = await connected(session, colleague)
    # Revoked behind the sockets' backs (another process whose announcement was lost, say).
    await database_sync_to_async(
        lambda: SessionInvitation.objects.filter(session=session).update(revoked_at=timezone.now())
    )()
    await theirs.send_json_to({"type": "chat", "message": "still there?"})
    assert (await receive(theirs))["type"] == "revoked"
    assert await closed_with(theirs) == CLOSE_REVOKED
    assert await stored_messages(session) == []  # the frame was not acted on


async def test_a_switch_to_a_client_the_guest_may_not_bill_closes_their_socket(shared, owner, colleague, client_globex):
    session = await database_sync_to_async(shared)()
    await database_sync_to_async(client_globex.members.add)(owner)  # globex: members only
    mine = await connected(session, owner)
    theirs = await connected(session, colleague)
    await mine.send_json_to({"type": "switch", "client": "globex"})
    assert (await frames_until(mine, "switched"))[-1]["session"]["client"] == "globex"
    assert (await frames_until(theirs, "revoked"))[-1]["type"] == "revoked"
    assert await closed_with(theirs) == CLOSE_REVOKED
    await mine.disconnect()


# --- Edit and regenerate over the socket ----------------------------------------------------


async def test_an_edit_makes_a_new_version_streams_its_answer_and_ends_the_owners_old_session(shared, owner, colleague):
    session = await database_sync_to_async(shared)()
    mine = await connected(session, owner)
    theirs = await connected(session, colleague)
    await mine.send_json_to({"type": "chat", "message": "first question", "turn": "q"})
    await frames_until(mine, "message.done")
    await frames_until(theirs, "message.done")
    before = [(m.seq, m.content, m.cost_usd, m.hash) for m in await stored_messages(session)]

    await mine.send_json_to({"type": "edit", "seq": 1, "message": "better question"})
    version = (await frames_until(mine, "version"))[-1]
    assert version["kind"] == "edit" and version["replaces_seq"] == 1
    assert version["url"] == f"/sessions/{version['session']['session_id']}/"
    # The owner's old session ended (one timer); the guest's page hears it.
    assert (await frames_until(theirs, "ended"))[-1]["summary"]["session_id"] == str(session.pk)
    await finish_turns()
    await mine.disconnect()
    await theirs.disconnect()

    branch = await database_sync_to_async(ChatSession.objects.get)(pk=version["session"]["session_id"])
    assert (branch.source, branch.user_id, branch.status) == (SessionSource.EDIT, owner.pk, "active")
    new = await stored_messages(branch)
    assert [(m.role, m.content) for m in new][:1] == [("user", "better question")]
    assert new[-1].role == "assistant" and new[-1].status == "complete"
    after = [(m.seq, m.content, m.cost_usd, m.hash) for m in await stored_messages(session)]
    assert after == before  # billed history untouched
    assert (await reload(session)).status == "ended"


async def test_the_guest_regenerates_into_a_version_of_their_own_and_the_owners_session_runs_on(
    shared, owner, colleague
):
    session = await database_sync_to_async(shared)()
    theirs = await connected(session, colleague)
    await theirs.send_json_to({"type": "chat", "message": "guest question", "turn": "g"})
    await frames_until(theirs, "message.done")
    await theirs.send_json_to({"type": "regenerate", "seq": 2})
    version = (await frames_until(theirs, "version"))[-1]
    await finish_turns()
    await theirs.disconnect()
    branch = await database_sync_to_async(ChatSession.objects.get)(pk=version["session"]["session_id"])
    assert (branch.source, branch.user_id) == (SessionSource.REGENERATE, colleague.pk)
    first = (await stored_messages(branch))[0]
    assert (first.role, first.content) == ("user", "guest question")
    assert (await reload(session)).status == "active"  # not the guest's to end


async def test_version_frames_are_validated_and_wait_for_the_answer(shared, owner):
    session = await database_sync_to_async(shared)(model=SLOW)
    mine = await connected(session, owner)
    for frame, code in [
        ({"type": "edit", "seq": "1", "message": "x"}, "bad_request"),
        ({"type": "edit", "seq": 1}, "bad_request"),
        ({"type": "regenerate", "seq": True}, "bad_request"),
        ({"type": "regenerate"}, "bad_request"),  # nothing to regenerate yet
    ]:
        await mine.send_json_to(frame)
        got = await receive(mine)
        assert (got["type"], got["code"]) == ("error", code), frame
    await mine.send_json_to({"type": "chat", "message": "slow", "turn": "s"})
    await frames_until(mine, "token")
    await mine.send_json_to({"type": "regenerate"})
    busy = await frames_until(mine, "error")
    assert busy[-1]["code"] == "session_busy"
    await mine.send_json_to({"type": "stop"})
    await frames_until(mine, "stopped")
    await mine.disconnect()
    assert await database_sync_to_async(SessionMessage.objects.exclude(session=session).count)() == 0
