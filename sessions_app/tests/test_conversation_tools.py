"""Conversation tools over REST: branch, continue, rename and hide, edit, regenerate, versions,
transcripts, and shared sessions (invite, chat together, revoke), each answer held to openapi.json.
"""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal

import pytest
from asgiref.sync import async_to_sync
from django.test import AsyncClient, Client
from django.utils import timezone

from billing.models import LLMUsage
from sessions_app import services
from sessions_app.errors import NOT_OWNER
from sessions_app.models import ApiToken, ChatSession, SessionInvitation, SessionMessage, SessionSegment
from sessions_app.tests.test_api import API, call
from tests.factories import ClientFactory, UserFactory

pytestmark = pytest.mark.usefixtures("sound_sessions")


def bearer(user) -> Client:
    _token, raw = ApiToken.issue(user=user, name="tests")
    return Client(HTTP_AUTHORIZATION=f"Bearer {raw}")


@pytest.fixture
def api(owner):
    return bearer(owner)


@pytest.fixture
def colleague_api(colleague):
    return bearer(colleague)


def start(api, **extra) -> str:
    body = {"client": "acme", "model": "ollama:llama3.2", **extra}
    return call(api, "POST", "/session/start", body, status=201, spec_path="/session/start")["session_id"]


def say(api, sid: str, text: str) -> dict:
    return call(
        api, "POST", f"/session/{sid}/chat", {"message": text}, status=200, spec_path="/session/{session_id}/chat"
    )


def totals(sid: str) -> tuple:
    session = ChatSession.objects.get(pk=sid)
    return session.total_messages, session.total_tokens, session.estimated_cost_usd


# --- branch ---------------------------------------------------------------------------------


def test_branch_copies_messages_up_to_at_and_bills_only_what_follows(api, client_acme, use_simulator):
    sid = start(api, name="Lease review")
    say(api, sid, "First question")
    say(api, sid, "Second question")

    branch = call(
        api,
        "POST",
        f"/session/{sid}/branch",
        {"at": 2, "name": "Plan B"},
        status=201,
        spec_path="/session/{session_id}/branch",
    )
    assert (branch["name"], branch["parent"], branch["branched_at_seq"]) == ("Plan B", sid, 2)
    assert (branch["total_messages"], branch["total_tokens"], branch["total_cost_usd"]) == (2, 0, "0.000000")
    copies = SessionMessage.objects.filter(session_id=branch["session_id"]).order_by("seq")
    assert [m.content for m in copies][:1] == ["First question"]
    assert all(m.copied_from_id for m in copies)

    everything = call(api, "POST", f"/session/{sid}/branch", {}, status=201)
    assert everything["branched_at_seq"] == 4 and everything["name"] == "Lease review (branch at #4)"
    assert "from 1 to 4" in call(api, "POST", f"/session/{sid}/branch", {"at": 9}, status=400)["error"]["message"]
    assert call(api, "POST", f"/session/{sid}/branch", {"at": "2"}, status=400)["error"]["message"].startswith("'at'")


# --- continue -------------------------------------------------------------------------------


def test_continue_carries_an_ended_sessions_history_into_new_billed_time(
    api, client_acme, client_globex, use_simulator
):
    sid = start(api, name="Supplier audit", system_prompt="Be brief.")
    say(api, sid, "Our codename is Bluebird.")
    running = call(api, "POST", f"/session/{sid}/continue", {}, status=409)
    assert running["error"] == {"code": "session_active", "message": services.CONTINUE_ACTIVE}
    call(api, "POST", f"/session/{sid}/end", status=200)
    before = totals(sid)

    new = call(api, "POST", f"/session/{sid}/continue", {}, status=201, spec_path="/session/{session_id}/continue")
    assert (new["client"], new["model"], new["status"], new["continued_from"]) == (
        "acme",
        "ollama:llama3.2",
        "active",
        sid,
    )
    assert new["name"] == "Supplier audit (continued)" and new["total_cost_usd"] == "0.000000"
    continued = ChatSession.objects.get(pk=new["session_id"])
    assert continued.system_prompt == "Be brief." and continued.source == "continue"
    assert continued.started_at > ChatSession.objects.get(pk=sid).ended_at  # new time, never the old

    use_simulator.clear_requests()
    answer = say(api, new["session_id"], "What is our codename?")
    sent = [m["content"] for m in use_simulator.last_request(path="/api/chat")["body"]["messages"]]
    assert "Our codename is Bluebird." in sent and sent[-1] == "What is our codename?"
    assert answer["session"]["total_tokens"] == answer["tokens"]  # only the new answer is billed here
    assert totals(sid) == before

    # Linked both ways.
    versions = call(api, "GET", f"/session/{sid}/versions", status=200, spec_path="/session/{session_id}/versions")
    assert [row["session_id"] for row in versions["continuations"]] == [new["session_id"]]
    back = call(api, "GET", f"/session/{new['session_id']}/versions", status=200)
    assert back["continued_from"]["session_id"] == sid

    # Another client and model, on request; a client you may not bill is refused.
    elsewhere = call(
        api, "POST", f"/session/{sid}/continue", {"client": "globex", "model": "ollama:mistral"}, status=201
    )
    assert (elsewhere["client"], elsewhere["model"]) == ("globex", "ollama:mistral")
    ClientFactory(slug="private").members.add(UserFactory(username="someone"))
    call(api, "POST", f"/session/{sid}/continue", {"client": "private"}, status=400)
    call(api, "POST", f"/session/{sid}/continue", {"model": "ollama:two words"}, status=400)


def test_a_client_bound_token_continues_for_its_client_only(owner, client_acme, client_globex, use_simulator):
    _token, raw = ApiToken.issue(user=owner, client=client_acme)
    bound = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    sid = start(bound)
    call(bound, "POST", f"/session/{sid}/end", status=200)
    error = call(bound, "POST", f"/session/{sid}/continue", {"client": "globex"}, status=400)
    assert "only bill client 'acme'" in error["error"]["message"]
    call(bound, "POST", f"/session/{sid}/continue", {"client": "acme"}, status=201)


# --- rename and hide --------------------------------------------------------------------------


def test_patch_renames_and_hides_without_touching_billed_data(api, client_acme, use_simulator):
    sid = start(api, name="Draft")
    say(api, sid, "Hello")
    before = totals(sid)

    renamed = call(
        api, "PATCH", f"/session/{sid}", {"name": "  Final name  "}, status=200, spec_path="/session/{session_id}"
    )
    assert renamed["name"] == "Final name"
    hidden = call(api, "PATCH", f"/session/{sid}", {"hidden": True}, status=200, spec_path="/session/{session_id}")
    assert hidden["hidden"] is True and totals(sid) == before
    assert call(api, "GET", f"/session/{sid}", status=200, spec_path="/session/{session_id}")["hidden"] is True

    listed = call(api, "GET", "/sessions", status=200, spec_path="/sessions")
    assert sid not in [s["session_id"] for s in listed["results"]]
    assert [s["session_id"] for s in call(api, "GET", "/sessions?hidden=only", status=200)["results"]] == [sid]
    assert sid in [s["session_id"] for s in call(api, "GET", "/sessions?hidden=include", status=200)["results"]]
    assert call(api, "GET", "/sessions?hidden=maybe", status=400)["error"]["message"].startswith("'hidden'")
    # Hidden sessions are still chatted in, summarized and billed.
    say(api, sid, "Still here")
    assert call(api, "GET", f"/session/{sid}/summary", status=200)["total_messages"] == 4

    shown = call(api, "PATCH", f"/session/{sid}", {"hidden": False}, status=200)
    assert shown["hidden"] is False
    assert call(api, "PATCH", f"/session/{sid}", {}, status=400)["error"]["message"] == services.UPDATE_NOTHING
    assert (
        call(api, "PATCH", f"/session/{sid}", {"hidden": "yes"}, status=400)["error"]["message"]
        == services.HIDDEN_NOT_BOOL
    )
    assert call(api, "PATCH", f"/session/{sid}", {"name": "x" * 201}, status=400)["error"]["code"] == "bad_request"
    assert call(api, "PUT", f"/session/{sid}", {}, status=405)["error"]["code"] == "method_not_allowed"


# --- edit and regenerate ------------------------------------------------------------------


def test_edit_makes_a_new_version_and_never_rewrites_the_billed_one(api, client_acme, use_simulator):
    sid = start(api, name="Contract")
    say(api, sid, "Summarise clause 4")
    say(api, sid, "Now clause 5")
    before = totals(sid)
    old_messages = list(
        SessionMessage.objects.filter(session_id=sid).order_by("seq").values_list("content", "cost_usd")
    )

    edited = call(
        api,
        "POST",
        f"/session/{sid}/edit",
        {"message": "Now clause 6"},
        status=201,
        spec_path="/session/{session_id}/edit",
    )
    new_sid = edited["session"]["session_id"]
    assert edited["replaces_seq"] == 3 and edited["role"] == "assistant" and edited["status"] == "complete"
    branch = ChatSession.objects.get(pk=new_sid)
    assert (branch.parent_id, branch.branched_at_seq, branch.source) == (ChatSession.objects.get(pk=sid).pk, 2, "edit")
    copies = list(branch.messages.order_by("seq"))
    assert [m.content for m in copies[:3]] == ["Summarise clause 4", old_messages[1][0], "Now clause 6"]
    assert [bool(m.copied_from_id) for m in copies] == [True, True, False, False]
    # The source is untouched and, as the conversation moved on, ended (one timer at a time).
    source = ChatSession.objects.get(pk=sid)
    assert totals(sid) == before and source.status == "ended"
    assert (
        list(SessionMessage.objects.filter(session_id=sid).order_by("seq").values_list("content", "cost_usd"))
        == old_messages
    )
    # The new version bills exactly its own new call.
    usage = LLMUsage.objects.filter(session_id=new_sid).get()
    assert branch.total_tokens == usage.prompt_tokens + usage.completion_tokens == edited["tokens"]

    versions = call(api, "GET", f"/session/{new_sid}/versions", status=200, spec_path="/session/{session_id}/versions")
    [fork] = versions["versions"]
    assert fork["seq"] == 3 and fork["count"] == 2
    assert [(v["session_id"], v["current"], v["preview"]) for v in fork["versions"]] == [
        (sid, False, "Now clause 5"),
        (new_sid, True, "Now clause 6"),
    ]
    assert versions["parent"]["session_id"] == sid
    assert [b["session_id"] for b in call(api, "GET", f"/session/{sid}/versions", status=200)["branches"]] == [new_sid]

    # Only your own messages, only real text.
    assert call(api, "POST", f"/session/{new_sid}/edit", {"message": "x", "seq": 2}, status=400)["error"][
        "message"
    ] == (services.EDIT_NOT_A_QUESTION.format(seq=2))
    assert (
        call(api, "POST", f"/session/{new_sid}/edit", {"message": "   "}, status=400)["error"]["code"] == "bad_request"
    )
    assert call(api, "POST", f"/session/{new_sid}/edit", {"message": "x", "seq": 99}, status=400)["error"][
        "message"
    ] == (services.SEQ_NOT_A_NUMBER.format(last=4))


def test_editing_the_first_message_starts_the_version_from_nothing(api, client_acme, use_simulator):
    sid = start(api)
    say(api, sid, "Helo")
    edited = call(api, "POST", f"/session/{sid}/edit", {"message": "Hello", "seq": 1}, status=201)
    branch = ChatSession.objects.get(pk=edited["session"]["session_id"])
    assert branch.branched_at_seq == 0 and branch.messages.get(seq=1).content == "Hello"
    versions = call(api, "GET", f"/session/{sid}/versions", status=200)
    assert [v["preview"] for v in versions["versions"][0]["versions"]] == ["Helo", "Hello"]


def test_regenerate_asks_the_question_again_as_a_new_billed_call(api, client_acme, use_simulator):
    sid = start(api)
    say(api, sid, "Pick a number")
    before = totals(sid)
    again = call(
        api, "POST", f"/session/{sid}/regenerate", {}, status=201, spec_path="/session/{session_id}/regenerate"
    )
    new_sid = again["session"]["session_id"]
    branch = ChatSession.objects.get(pk=new_sid)
    assert (branch.source, branch.branched_at_seq, again["replaces_seq"]) == ("regenerate", 0, 2)
    assert [m.role for m in branch.messages.order_by("seq")] == ["user", "assistant"]
    assert branch.messages.get(seq=1).content == "Pick a number"
    assert totals(sid) == before and branch.total_tokens == again["tokens"] > 0
    versions = call(api, "GET", f"/session/{new_sid}/versions", status=200)
    # The same question asked twice: the versions are of the answer.
    assert [(v["seq"], v["count"]) for v in versions["versions"]] == [(2, 2)]
    assert [v["role"] for v in versions["versions"][0]["versions"]] == ["assistant", "assistant"]

    # A regeneration of a regeneration is a third version of the same answer.
    third = call(api, "POST", f"/session/{new_sid}/regenerate", {"seq": 2}, status=201)
    versions = call(api, "GET", f"/session/{third['session']['session_id']}/versions", status=200)
    assert versions["versions"][0]["count"] == 3
    assert [v["current"] for v in versions["versions"][0]["versions"]] == [False, False, True]

    assert call(api, "POST", f"/session/{new_sid}/regenerate", {"seq": 1}, status=400)["error"]["message"] == (
        services.REGENERATE_NOT_AN_ANSWER.format(seq=1)
    )
    fresh = start(api)
    assert (
        call(api, "POST", f"/session/{fresh}/regenerate", {}, status=400)["error"]["message"]
        == services.REGENERATE_NOTHING
    )


def test_a_streamed_regeneration_names_the_new_session_first(owner, client_acme, use_simulator):
    _token, raw = ApiToken.issue(user=owner)
    api = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    sid = start(api)
    say(api, sid, "Stream it twice")

    async def go():
        response = await AsyncClient().post(
            f"{API}/session/{sid}/regenerate",
            {"stream": True},
            content_type="application/json",
            headers={"authorization": f"Bearer {raw}"},
        )
        assert response.status_code == 201 and response["Content-Type"] == "application/x-ndjson"
        return response, b"".join([chunk async for chunk in response.streaming_content])

    response, body = async_to_sync(go)()
    lines = [json.loads(line) for line in body.decode().splitlines()]
    assert lines[0]["type"] == "session" and lines[0]["replaces_seq"] == 2
    new_sid = lines[0]["session"]["session_id"]
    assert response["Location"] == f"/api/ollama/session/{new_sid}"
    assert {line["type"] for line in lines[1:-1]} == {"token"}
    assert lines[-1]["type"] == "done" and lines[-1]["session"]["session_id"] == new_sid
    text = "".join(line["text"] for line in lines[1:-1])
    assert text == SessionMessage.objects.get(session_id=new_sid, seq=2).content


def test_a_failed_regeneration_keeps_the_question_and_says_where(api, client_acme, use_simulator):
    sid = start(api)
    say(api, sid, "Hello")
    call(api, "POST", f"/session/{sid}/switch", {"model": "ollama:x-fault-status-500"}, status=200)
    error = call(api, "POST", f"/session/{sid}/regenerate", {}, status=502)
    branch = ChatSession.objects.get(source="regenerate")
    assert str(branch.session_id) in error["error"]["message"]
    assert [(m.role, m.status) for m in branch.messages.order_by("seq")] == [
        ("user", "complete"),
        ("assistant", "error"),
    ]


# --- transcript -----------------------------------------------------------------------------


def test_transcripts_download_as_markdown_and_json_with_a_meaningful_name(api, owner, client_acme, use_simulator):
    sid = start(api, name="Q3 / Budget: review?", system_prompt="Be brief.")
    say(api, sid, "Hello **there**")
    call(api, "POST", f"/session/{sid}/switch", {"model": "ollama:mistral", "reason": "try another"}, status=200)
    say(api, sid, "Second")
    day = timezone.localtime(ChatSession.objects.get(pk=sid).started_at).date().isoformat()

    markdown = api.get(f"{API}/session/{sid}/transcript?format=markdown")
    assert markdown.status_code == 200 and markdown["Content-Type"] == "text/markdown; charset=utf-8"
    assert markdown["Content-Disposition"] == f'attachment; filename="acme-q3-budget-review-{day}.md"'
    text = markdown.content.decode()
    assert text.startswith("# Q3 / Budget: review?\n")
    assert "### olivia · " in text and "Hello **there**" in text and "> Be brief." in text
    assert "switched from Acme Corp · `ollama:llama3.2` to Acme Corp · `ollama:mistral` — try another" in text
    assert text.index("Hello **there**") < text.index("switched from") < text.index("Second")

    document = api.get(f"{API}/session/{sid}/transcript")
    assert document["Content-Disposition"] == f'attachment; filename="acme-q3-budget-review-{day}.json"'
    from sessions_app.tests.schema_check import assert_matches

    payload = document.json()
    assert_matches(payload, "/session/{session_id}/transcript", "GET", 200)
    assert [m["author"] for m in payload["messages"]] == ["olivia", None, "olivia", None]
    assert payload["session"]["participants"][0]["messages"] == 2
    assert call(api, "GET", f"/session/{sid}/transcript?format=pdf", status=400)["error"]["message"].startswith(
        "'format'"
    )


# --- shared sessions ------------------------------------------------------------------------


def test_a_shared_session_bills_its_client_once_and_records_who_typed_what(
    api, colleague_api, owner, colleague, client_acme, client_globex, use_simulator
):
    sid = start(api, name="Pairing")
    invitation = call(
        api,
        "POST",
        f"/session/{sid}/invitations",
        {"user": "colin"},
        status=201,
        spec_path="/session/{session_id}/invitations",
    )
    assert (invitation["user"], invitation["invited_by"], invitation["live"]) == ("colin", "olivia", True)
    assert (
        call(api, "POST", f"/session/{sid}/invitations", {"user": "colin"}, status=200)["invited_at"]
        == invitation["invited_at"]
    )

    # The colleague sees it in their list and chats in it; the owner's totals grow.
    assert sid in [s["session_id"] for s in call(colleague_api, "GET", "/sessions", status=200)["results"]]
    say(api, sid, "Owner asks")
    answer = say(colleague_api, sid, "Colleague asks")
    assert answer["session"]["total_messages"] == 4
    authors = list(
        SessionMessage.objects.filter(session_id=sid).order_by("seq").values_list("author__username", flat=True)
    )
    assert authors == ["olivia", None, "colin", None]
    assert set(LLMUsage.objects.filter(session_id=sid).values_list("user__username", "client__slug")) == {
        ("olivia", "acme"),
        ("colin", "acme"),
    }

    # Only the owner ends it (or renames, hides, shares it); the colleague may switch the model only.
    assert call(colleague_api, "POST", f"/session/{sid}/end", status=403)["error"] == {
        "code": "not_owner",
        "message": NOT_OWNER,
    }
    call(colleague_api, "PATCH", f"/session/{sid}", {"name": "mine now"}, status=403)
    call(colleague_api, "POST", f"/session/{sid}/invitations", {"user": "olivia"}, status=403)
    call(colleague_api, "POST", f"/session/{sid}/switch", {"client": "globex"}, status=403)
    call(colleague_api, "POST", f"/session/{sid}/switch", {"model": "ollama:mistral"}, status=200)

    # Time counts once: a session's seconds are its segments', billed to its owner.
    hour_ago = timezone.now() - timedelta(hours=1)
    first_segment = SessionSegment.objects.filter(session_id=sid).order_by("started_at").first()
    SessionSegment.objects.filter(pk=first_segment.pk).update(started_at=hour_ago)
    ChatSession.objects.filter(pk=sid).update(started_at=hour_ago)
    summary = call(api, "POST", f"/session/{sid}/end", status=200, spec_path="/session/{session_id}/end")
    assert sum(row["seconds"] for row in summary["by_client"]) == summary["duration_seconds"] >= 3600
    people = {p["user"]: p for p in summary["participants"]}
    assert (people["olivia"]["role"], people["olivia"]["messages"]) == ("owner", 1)
    assert (people["colin"]["role"], people["colin"]["messages"]) == ("invited", 1)
    assert sum(Decimal(row["cost_usd"]) for row in summary["by_client"]) == Decimal(summary["total_cost_usd"])
    assert ChatSession.objects.filter(user=colleague).count() == 0
    # The colleague's own statistics do not count the owner's work; the owner's do.
    assert call(colleague_api, "GET", "/stats", status=200, spec_path="/stats")["sessions"] == 0
    assert call(api, "GET", "/stats", status=200)["sessions"] == 1


def test_revoking_ends_access_at_once(api, colleague_api, client_acme, use_simulator):
    sid = start(api)
    call(api, "POST", f"/session/{sid}/invitations", {"user": "colin"}, status=201)
    say(colleague_api, sid, "Hi")
    revoked = call(
        api,
        "DELETE",
        f"/session/{sid}/invitations/colin",
        status=200,
        spec_path="/session/{session_id}/invitations/{username}",
    )
    assert revoked["live"] is False and revoked["revoked_at"]
    call(colleague_api, "POST", f"/session/{sid}/chat", {"message": "Still?"}, status=404)
    call(colleague_api, "GET", f"/session/{sid}/summary", status=404)
    assert call(colleague_api, "GET", "/sessions", status=200)["results"] == []
    call(api, "DELETE", f"/session/{sid}/invitations/colin", status=404)
    listing = call(api, "GET", f"/session/{sid}/invitations", status=200, spec_path="/session/{session_id}/invitations")
    assert [(i["user"], i["live"]) for i in listing["results"]] == [("colin", False)]
    # Invited again, and then leaving by themselves.
    call(api, "POST", f"/session/{sid}/invitations", {"user": "colin"}, status=201)
    call(colleague_api, "DELETE", f"/session/{sid}/invitations/colin", status=200)
    call(colleague_api, "GET", f"/session/{sid}", status=404)


def test_only_consultants_who_may_bill_the_client_can_be_invited(api, owner, colleague, client_acme, use_simulator):
    sid = start(api)
    client_acme.members.add(owner)  # acme is now members-only: colin may not bill it
    error = call(api, "POST", f"/session/{sid}/invitations", {"user": "colin"}, status=400)
    assert error["error"]["message"] == services.INVITE_NOT_ALLOWED.format(name="colin", client="Acme Corp")
    assert (
        call(api, "POST", f"/session/{sid}/invitations", {"user": "olivia"}, status=400)["error"]["message"]
        == services.INVITE_SELF
    )
    assert call(api, "POST", f"/session/{sid}/invitations", {"user": "nobody"}, status=400)["error"]["message"] == (
        services.INVITE_UNKNOWN.format(name="nobody")
    )
    assert (
        call(api, "POST", f"/session/{sid}/invitations", {}, status=400)["error"]["message"]
        == services.INVITE_NAME_REQUIRED
    )
    client_acme.members.add(colleague)
    call(api, "POST", f"/session/{sid}/invitations", {"user": "colin"}, status=201)
    call(api, "POST", f"/session/{sid}/end", status=200)
    assert (
        call(api, "POST", f"/session/{sid}/invitations", {"user": "oscar"}, status=409)["error"]["message"]
        == services.INVITE_ENDED
    )


def test_a_switch_to_a_client_the_guest_may_not_bill_revokes_their_invitation(
    api, colleague_api, owner, colleague, client_acme, client_globex, use_simulator
):
    sid = start(api)
    call(api, "POST", f"/session/{sid}/invitations", {"user": "colin"}, status=201)
    client_globex.members.add(owner)
    call(api, "POST", f"/session/{sid}/switch", {"client": "globex"}, status=200)
    assert not SessionInvitation.objects.live().filter(session_id=sid).exists()
    call(colleague_api, "GET", f"/session/{sid}/summary", status=404)


# --- isolation: the uninvited get 404 everywhere ----------------------------------------------


def _session_routes():
    """Every REST route that names a session, with the methods it answers."""
    from sessions_app.api_urls import urlpatterns

    methods = {
        "session-chat": ["POST"],
        "session-switch": ["POST"],
        "session-end": ["POST"],
        "session-summary": ["GET"],
        "session-export": ["GET"],
        "session-branch": ["POST"],
        "session-continue": ["POST"],
        "session-edit": ["POST"],
        "session-regenerate": ["POST"],
        "session-versions": ["GET"],
        "session-transcript": ["GET"],
        "session-invitations": ["GET", "POST"],
        "session-invitation": ["DELETE"],
        "session-detail": ["GET", "PATCH"],
    }
    named = {p.name: str(p.pattern) for p in urlpatterns if "session_id" in str(p.pattern)}
    assert set(named) == set(methods), "a new session route: say here which methods it answers"
    return [(named[name], method) for name, routes in methods.items() for method in routes]


def test_an_uninvited_consultant_gets_404_on_every_endpoint_of_a_shared_session(
    api, owner, colleague, outsider, client_acme, use_simulator, client
):
    sid = start(api, name="Shared")
    say(api, sid, "Hello")
    call(api, "POST", f"/session/{sid}/invitations", {"user": "colin"}, status=201)
    stranger = bearer(outsider)
    bodies = {
        "POST": {"message": "hi", "user": "colin", "client": "acme", "model": "ollama:mistral"},
        "PATCH": {"name": "x"},
    }
    checked = 0
    for pattern, method in _session_routes():
        path = "/" + pattern.replace("<str:session_id>", sid).replace("<str:username>", "colin")
        error = call(stranger, method, path, bodies.get(method), status=404)
        assert error["error"]["code"] == "not_found", (method, path)
        checked += 1
    assert checked == 16
    assert totals(sid)[0] == 2 and SessionInvitation.objects.live().count() == 1

    # The pages and the WebSocket too.
    client.force_login(outsider)
    for page in ("", "summary/", "messages.json", "continue/", "share/"):
        assert client.get(f"/sessions/{sid}/{page}").status_code == 404, page
    for action in ("rename/", "hide/", "continue/", "share/"):
        assert client.post(f"/sessions/{sid}/{action}", {"name": "x", "user": "oscar"}).status_code == 404, action

    from channels.routing import URLRouter
    from channels.testing import WebsocketCommunicator

    from sessions_app.consumers import CLOSE_NOT_FOUND
    from sessions_app.routing import websocket_urlpatterns

    async def refused_with() -> int:
        # A refused socket is accepted first and then closed, so the page can read the code.
        communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), f"/ws/sessions/{sid}/")
        communicator.scope["user"] = outsider
        assert await communicator.connect(timeout=10) == (True, None)
        closed = await communicator.receive_output(timeout=10)
        assert closed["type"] == "websocket.close"
        return closed["code"]

    assert async_to_sync(refused_with)() == CLOSE_NOT_FOUND


# --- templates over REST, and the one access rule -------------------------------------------


def test_start_from_a_template_over_rest(api, client_acme, client_globex, use_simulator):
    from billing.models import SessionTemplate

    SessionTemplate.objects.create(
        client=client_globex, name="Research", system_prompt="Cite sources.", default_model="ollama:mistral"
    )
    body = {"template": "Research"}
    session = call(api, "POST", "/session/start", body, status=201, spec_path="/session/start")
    stored = ChatSession.objects.get(pk=session["session_id"])
    assert (session["client"], session["model"], session["name"]) == ("globex", "ollama:mistral", "Research")
    assert (stored.system_prompt, stored.template.name) == ("Cite sources.", "Research")
    other = call(api, "POST", "/session/start", {"template": "Research", "client": "acme"}, status=400)
    assert other["error"]["message"] == services.TEMPLATE_OTHER_CLIENT.format(
        template="Research", slug="globex", other="acme"
    )
    unknown = call(api, "POST", "/session/start", {"template": "Nope", "client": "acme"}, status=400)
    assert unknown["error"]["message"] == services.TEMPLATE_UNKNOWN.format(template="Nope")


def test_the_access_rule_lets_in_the_owner_the_invited_and_staff(owner, colleague, outsider, staff, client_acme):
    from sessions_app import selectors
    from sessions_app.errors import NotFound

    session = services.session_start(user=owner, client=client_acme, model="ollama:llama3.2")
    invitation = SessionInvitation.objects.create(session=session, user=colleague, invited_by=owner)
    visible = {
        u.username: ChatSession.objects.for_user(u).filter(pk=session.pk).exists()
        for u in (owner, colleague, outsider, staff)
    }
    assert visible == {"olivia": True, "colin": True, "oscar": False, "stella": True}
    # The live chat socket joins participants only: staff review in the admin.
    for user in (owner, colleague):
        assert selectors.session_get_for_participant(session_id=session.pk, user=user) == session
    for user in (outsider, staff):
        with pytest.raises(NotFound):
            selectors.session_get_for_participant(session_id=session.pk, user=user)
    invitation.revoked_at = timezone.now()
    invitation.save()
    assert not ChatSession.objects.for_user(colleague).filter(pk=session.pk).exists()
    # No duplicates when a session has several invitations.
    SessionInvitation.objects.create(session=session, user=outsider, invited_by=owner)
    SessionInvitation.objects.create(session=session, user=colleague, invited_by=owner)
    assert ChatSession.objects.for_user(owner).count() == 1
