"""The REST API under /api/ollama/: every endpoint, its errors, and every answer held to openapi.json."""

from __future__ import annotations

import base64
import json
import re
from datetime import timedelta
from decimal import Decimal

import pytest
from asgiref.sync import async_to_sync
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.db import connection
from django.test import AsyncClient, Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from sessions_app import boundary
from sessions_app.api_urls import urlpatterns
from sessions_app.integrity import canonical_json
from sessions_app.models import ApiToken, ChatSession, ContextStream, SessionMessage, SessionSegment
from sessions_app.tests.schema_check import OPENAPI_FILE, assert_matches

pytestmark = pytest.mark.usefixtures("sound_sessions")

API = "/api/ollama"


@pytest.fixture
def token(owner):
    _token, raw = ApiToken.issue(user=owner, name="tests")
    return raw


@pytest.fixture
def api(token):
    return Client(HTTP_AUTHORIZATION=f"Bearer {token}")


def call(
    client, method: str, url: str, body=None, *, status: int, spec_path: str | None = None, raw: bytes | None = None
):
    """Make a request, check its status and, when `spec_path` is given, its shape against openapi.json."""
    data = raw if raw is not None else (json.dumps(body) if body is not None else "")
    response = getattr(client, method.lower())(f"{API}{url}", data=data, content_type="application/json")
    assert response.status_code == status, response.content[:500]
    payload = response.json()
    if status >= 400:
        assert set(payload) == {"error"} and {"code", "message"} <= set(payload["error"])
    if spec_path is not None:
        assert_matches(payload, spec_path, method, status)
    return payload


def start(api, client="acme", model="ollama:llama3.2", **extra):
    return call(
        api,
        "POST",
        "/session/start",
        {"client": client, "model": model, **extra},
        status=201,
        spec_path="/session/start",
    )


def test_done_when_a_session_bills_two_clients_and_its_seal_catches_any_edit(
    api, owner, client_acme, client_globex, use_simulator
):
    session = start(api, name="Quarterly review")
    sid = session["session_id"]
    # Pretend the session started an hour ago so the time split is visible.
    hour_ago = timezone.now() - timedelta(seconds=3600, milliseconds=700)
    ChatSession.objects.filter(pk=sid).update(started_at=hour_ago, last_activity_at=hour_ago)
    SessionSegment.objects.filter(session_id=sid).update(started_at=hour_ago)

    answer = call(
        api,
        "POST",
        f"/session/{sid}/chat",
        {"message": "Our codename is Bluebird."},
        status=200,
        spec_path="/session/{session_id}/chat",
    )
    assert answer["status"] == "complete" and answer["provider"] == "ollama"

    stream = call(
        api,
        "POST",
        f"/session/{sid}/switch",
        {"client": "globex", "model": "openai:gpt-4o", "reason": "needs GPT-4o"},
        status=200,
        spec_path="/session/{session_id}/switch",
    )
    assert stream["reason"] == "domain_switch" and stream["target_client"] == "globex" and stream["message_count"] == 2
    # Move the switch to half an hour ago: acme gets ~30 minutes, globex ~30 minutes.
    half = timezone.now() - timedelta(seconds=1800, milliseconds=300)
    SessionSegment.objects.filter(session_id=sid, ended_at__isnull=False).update(ended_at=half)
    SessionSegment.objects.filter(session_id=sid, ended_at__isnull=True).update(started_at=half)
    ContextStream.objects.filter(pk=stream["stream_id"]).update(streamed_at=half)

    use_simulator.clear_requests()
    paid = call(
        api,
        "POST",
        f"/session/{sid}/chat",
        {"message": "What is our codename?"},
        status=200,
        spec_path="/session/{session_id}/chat",
    )
    assert paid["provider"] == "openai" and paid["client"] == "globex" and Decimal(paid["cost_usd"]) > 0
    openai_request = use_simulator.last_request(path="/v1/chat/completions")
    assert "Our codename is Bluebird." in [m["content"] for m in openai_request["body"]["messages"]]
    assert not openai_request["body"].get("stream")  # a JSON answer: one response upstream, no relay

    summary = call(api, "POST", f"/session/{sid}/end", status=200, spec_path="/session/{session_id}/end")
    assert summary == call(api, "POST", f"/session/{sid}/end", status=200)
    assert summary == call(api, "GET", f"/session/{sid}/summary", status=200, spec_path="/session/{session_id}/summary")
    by_client = {row["client"]: row for row in summary["by_client"]}
    assert set(by_client) == {"acme", "globex"}
    assert sum(row["seconds"] for row in summary["by_client"]) == summary["duration_seconds"] >= 3600
    assert 1790 <= by_client["acme"]["seconds"] <= 1810 and 1790 <= by_client["globex"]["seconds"] <= 1810
    assert sum(Decimal(row["cost_usd"]) for row in summary["by_client"]) == Decimal(summary["total_cost_usd"])
    assert Decimal(by_client["globex"]["cost_usd"]) == Decimal(paid["cost_usd"])
    assert sum(row["tokens"] for row in summary["by_client"]) == summary["total_tokens"]
    assert summary["context_streams"][0]["settled"] is True
    assert Decimal(summary["context_streams"][0]["cost_usd"]) <= Decimal(paid["cost_usd"])
    assert summary["integrity"]["valid"] is True

    # The seal verifies offline with the served public key.
    key = call(Client(), "GET", "/signing-key", status=200, spec_path="/signing-key")
    seal = ChatSession.objects.get(pk=sid).soulfra_hash
    public = Ed25519PublicKey.from_public_bytes(base64.b64decode(key["public_key"]))
    public.verify(base64.b64decode(seal["signature"]), canonical_json(seal["signed"]))

    # Any edited stored field fails verification, naming what fails; restoring it passes again.
    first = SessionMessage.objects.get(session_id=sid, seq=1)
    answer_row = SessionMessage.objects.get(session_id=sid, seq=4)
    edits = [
        (
            SessionMessage.objects.filter(pk=first.pk),
            {"content": "Our codename is Redbird."},
            {"content": first.content},
            "message #1",
        ),
        (
            SessionMessage.objects.filter(pk=answer_row.pk),
            {"cost_usd": Decimal("0")},
            {"cost_usd": answer_row.cost_usd},
            "message #4",
        ),
        (
            SessionMessage.objects.filter(pk=answer_row.pk),
            {"prompt_tokens": 1},
            {"prompt_tokens": answer_row.prompt_tokens},
            "message #4",
        ),
        (
            SessionMessage.objects.filter(pk=first.pk),
            {"timestamp": first.timestamp + timedelta(seconds=1)},
            {"timestamp": first.timestamp},
            "message #1",
        ),
        (
            ChatSession.objects.filter(pk=sid),
            {"total_tokens": 1},
            {"total_tokens": summary["total_tokens"]},
            "total_tokens",
        ),
        (
            ChatSession.objects.filter(pk=sid),
            {"duration_seconds": 1},
            {"duration_seconds": summary["duration_seconds"]},
            "duration_seconds",
        ),
        (
            ContextStream.objects.filter(pk=stream["stream_id"]),
            {"total_tokens": 0},
            {"total_tokens": summary["context_streams"][0]["total_tokens"]},
            "context_streams",
        ),
    ]
    for queryset, change, restore, named in edits:
        queryset.update(**change)
        broken = call(api, "GET", f"/session/{sid}/summary", status=200)["integrity"]
        assert broken["valid"] is False and named in broken["detail"], (change, broken)
        queryset.update(**restore)
        assert call(api, "GET", f"/session/{sid}/summary", status=200)["integrity"]["valid"] is True


def test_chat_streams_ndjson_deltas_then_the_final_message(token, owner, client_acme, use_simulator):
    api = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
    sid = start(api)["session_id"]

    async def go():
        response = await AsyncClient().post(
            f"{API}/session/{sid}/chat",
            {"message": "Stream please", "stream": True},
            content_type="application/json",
            headers={"authorization": f"Bearer {token}"},
        )
        assert response.status_code == 200 and response["Content-Type"] == "application/x-ndjson"
        return b"".join([chunk async for chunk in response.streaming_content])

    body = async_to_sync(go)()
    lines = [json.loads(line) for line in body.decode().splitlines()]
    assert [line["type"] for line in lines[:-1]] == ["token"] * (len(lines) - 1) and len(lines) > 2
    assert lines[-1]["type"] == "done" and lines[-1]["content"] == "".join(line["text"] for line in lines[:-1])
    for line in lines:
        assert_matches(line, "/session/{session_id}/chat", "POST", 200, "application/x-ndjson")


def test_streamed_chat_that_fails_before_any_token_answers_502(token, owner, client_acme, use_simulator):
    api = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
    sid = start(api, model="ollama:llama3.2-fault-status-500")["session_id"]

    async def go():
        response = await AsyncClient().post(
            f"{API}/session/{sid}/chat",
            {"message": "hi", "stream": True},
            content_type="application/json",
            headers={"authorization": f"Bearer {token}"},
        )
        return response.status_code, json.loads(response.content)

    status, payload = async_to_sync(go)()
    assert status == 502 and payload["error"]["code"] == "provider_error"
    assert SessionMessage.objects.filter(session_id=sid, role="user", content="hi").exists()


def test_streamed_chat_that_fails_midstream_ends_with_an_error_line(token, owner, client_acme, use_simulator):
    api = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
    sid = start(api, model="ollama:llama3.2-fault-midstream")["session_id"]

    async def go():
        response = await AsyncClient().post(
            f"{API}/session/{sid}/chat",
            {"message": "hi", "stream": True},
            content_type="application/json",
            headers={"authorization": f"Bearer {token}"},
        )
        return b"".join([chunk async for chunk in response.streaming_content])

    lines = [json.loads(line) for line in async_to_sync(go)().decode().splitlines()]
    assert lines[0]["type"] == "token" and lines[-1]["type"] == "error"
    assert lines[-1]["error"]["code"] == "provider_error"
    for line in lines:
        assert_matches(line, "/session/{session_id}/chat", "POST", 200, "application/x-ndjson")
    partial = SessionMessage.objects.get(session_id=sid, role="assistant")
    assert partial.status == "partial" and partial.content == "".join(line.get("text", "") for line in lines)


def test_provider_failure_answers_502_and_timeout_504(api, owner, client_acme, use_simulator, settings):
    sid = start(api, model="ollama:llama3.2-fault-status-500")["session_id"]
    error = call(
        api, "POST", f"/session/{sid}/chat", {"message": "hi"}, status=502, spec_path="/session/{session_id}/chat"
    )
    assert error["error"]["code"] == "provider_error"
    settings.PROVIDER_FIRST_TOKEN_TIMEOUT = 0.3
    sid = start(api, model="ollama:llama3.2-fault-stall-first")["session_id"]
    error = call(
        api, "POST", f"/session/{sid}/chat", {"message": "hi"}, status=504, spec_path="/session/{session_id}/chat"
    )
    assert error["error"]["code"] == "provider_timeout"
    assert SessionMessage.objects.filter(session_id=sid, role="assistant", status="error").count() == 1


def test_bad_input_is_400_naming_what_is_wrong(api, owner, client_acme, use_simulator):
    assert (
        "'nope'"
        in call(api, "POST", "/session/start", {"client": "nope", "model": "ollama:llama3.2"}, status=400)["error"][
            "message"
        ]
    )
    message = call(
        api,
        "POST",
        "/session/start",
        {"client": "acme", "model": "openai:gpt-zz"},
        status=400,
        spec_path="/session/start",
    )
    assert "'openai:gpt-zz'" in message["error"]["message"]
    assert (
        call(api, "POST", "/session/start", raw=b"{not json", status=400)["error"]["message"]
        == "The body is not valid JSON."
    )
    call(api, "POST", "/session/start", raw=b"[1, 2]", status=400)
    call(api, "POST", "/session/start", {"client": 5, "model": ["x"]}, status=400)
    sid = start(api)["session_id"]
    call(api, "POST", f"/session/{sid}/chat", {"message": 42}, status=400)
    call(api, "POST", f"/session/{sid}/chat", {"message": "hi", "stream": "yes"}, status=400)
    call(api, "POST", f"/session/{sid}/switch", {}, status=400, spec_path="/session/{session_id}/switch")
    call(api, "GET", "/sessions?status=maybe", status=400)
    call(api, "GET", "/sessions?from=yesterday", status=400)
    call(api, "GET", "/sessions?limit=0", status=400)


def test_huge_message_is_413_with_the_limit(api, owner, client_acme, use_simulator, settings):
    settings.CHAT_MAX_MESSAGE_CHARS = 100
    sid = start(api)["session_id"]
    error = call(
        api, "POST", f"/session/{sid}/chat", {"message": "x" * 101}, status=413, spec_path="/session/{session_id}/chat"
    )
    assert "limit is 100" in error["error"]["message"]


def test_unknown_malformed_and_foreign_sessions_are_404(api, owner, outsider, client_acme, use_simulator):
    sid = start(api)["session_id"]
    _t, other = ApiToken.issue(user=outsider)
    outsider_api = Client(HTTP_AUTHORIZATION=f"Bearer {other}")
    for path in ("/summary",):
        call(outsider_api, "GET", f"/session/{sid}{path}", status=404, spec_path="/session/{session_id}/summary")
    for action in ("chat", "switch", "end"):
        call(outsider_api, "POST", f"/session/{sid}/{action}", {"message": "hi", "model": "ollama:x"}, status=404)
    call(api, "GET", "/session/not-a-uuid/summary", status=404)
    call(api, "GET", "/session/00000000-0000-0000-0000-000000000000/summary", status=404)
    call(api, "GET", "/nowhere", status=404)


def test_ended_session_refuses_chat_and_switch_with_409(api, owner, client_acme, use_simulator):
    sid = start(api)["session_id"]
    call(api, "POST", f"/session/{sid}/end", status=200)
    assert call(api, "POST", f"/session/{sid}/chat", {"message": "hi"}, status=409)["error"]["code"] == "session_ended"
    call(
        api,
        "POST",
        f"/session/{sid}/switch",
        {"model": "ollama:mistral"},
        status=409,
        spec_path="/session/{session_id}/switch",
    )


def test_credentials_missing_or_bad_are_401(owner, client_acme):
    assert call(Client(), "GET", "/sessions", status=401)["error"]["code"] == "unauthorized"
    call(Client(HTTP_AUTHORIZATION="Bearer bws_nope"), "GET", "/sessions", status=401, spec_path="/sessions")
    call(Client(HTTP_AUTHORIZATION="Basic abc"), "GET", "/sessions", status=401)
    token, raw = ApiToken.issue(user=owner)
    token.revoked_at = timezone.now()
    token.save()
    call(Client(HTTP_AUTHORIZATION=f"Bearer {raw}"), "GET", "/sessions", status=401)


def test_a_tokens_use_is_recorded_at_most_once_a_minute(owner, client_acme):
    token, raw = ApiToken.issue(user=owner)
    api = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    call(api, "GET", "/sessions", status=200)
    first = ApiToken.objects.get(pk=token.pk).last_used_at
    assert first is not None
    with CaptureQueriesContext(connection) as queries:
        call(api, "GET", "/sessions", status=200)
    assert ApiToken.objects.get(pk=token.pk).last_used_at == first
    assert not [q for q in queries.captured_queries if q["sql"].startswith("UPDATE") and "api_tokens" in q["sql"]]
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=first - timedelta(minutes=2))
    call(api, "GET", "/sessions", status=200)
    later = ApiToken.objects.get(pk=token.pk).last_used_at
    assert later is not None and later > first


def test_cookie_sign_in_needs_csrf_but_bearer_does_not(owner, token, client_acme, use_simulator):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(owner)
    assert (
        call(browser, "POST", "/session/start", {"client": "acme", "model": "ollama:llama3.2"}, status=403)["error"][
            "code"
        ]
        == "csrf_failed"
    )
    browser.get("/api/ollama/sessions")  # any page; the CSRF cookie is set below
    from django.middleware.csrf import _get_new_csrf_string

    secret = _get_new_csrf_string()
    browser.cookies["csrftoken"] = secret
    response = browser.post(
        f"{API}/session/start",
        data=json.dumps({"client": "acme", "model": "ollama:llama3.2"}),
        content_type="application/json",
        HTTP_X_CSRFTOKEN=secret,
    )
    assert response.status_code == 201
    assert call(browser, "GET", "/sessions", status=200)["results"][0]["client"] == "acme"
    bearer = Client(enforce_csrf_checks=True, HTTP_AUTHORIZATION=f"Bearer {token}")
    start(bearer)


def test_list_filters_by_client_billed_and_status_and_pages(
    api, owner, colleague, client_acme, client_globex, use_simulator
):
    first = start(api)["session_id"]
    call(api, "POST", f"/session/{first}/switch", {"client": "globex"}, status=200)
    second = start(api, client="globex")["session_id"]
    third = start(api)["session_id"]
    call(api, "POST", f"/session/{third}/end", status=200)
    _t, raw = ApiToken.issue(user=colleague)
    start(Client(HTTP_AUTHORIZATION=f"Bearer {raw}"))

    everything = call(api, "GET", "/sessions", status=200, spec_path="/sessions")
    assert [s["session_id"] for s in everything["results"]] == [third, second, first] and everything["next"] is None
    globex = call(api, "GET", "/sessions?client=globex", status=200)["results"]
    assert {s["session_id"] for s in globex} == {first, second}
    assert [s["session_id"] for s in call(api, "GET", "/sessions?status=ended", status=200)["results"]] == [third]
    page = call(api, "GET", "/sessions?limit=2", status=200, spec_path="/sessions")
    assert len(page["results"]) == 2 and page["next"].startswith("http://testserver/api/ollama/sessions?")
    rest = call(api, "GET", page["next"].removeprefix("http://testserver/api/ollama"), status=200)
    assert [s["session_id"] for s in rest["results"]] == [first] and rest["next"] is None
    today = timezone.now().date().isoformat()
    assert len(call(api, "GET", f"/sessions?from={today}&to={today}", status=200)["results"]) == 3
    assert call(api, "GET", "/sessions?to=2000-01-01", status=200)["results"] == []
    assert call(api, "GET", "/sessions?client=unknown-client", status=200)["results"] == []


def test_wrong_method_is_405_json(api):
    response = api.get(f"{API}/session/start")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


def test_openapi_document_is_served_and_covers_every_route(client):
    response = client.get(f"{API}/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.1") and document == json.loads(OPENAPI_FILE.read_text())
    routes = {
        "/" + re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", str(pattern.pattern))
        for pattern in urlpatterns
        if "^" not in str(pattern.pattern)  # the catch-all that answers unknown paths with a JSON 404
    }
    assert set(document["paths"]) == routes


def test_control_characters_and_nul_bytes_are_bad_input_not_a_crash(api, owner, client_acme, use_simulator):
    call(api, "POST", "/session/start", {"client": "ac\u0000me", "model": "ollama:llama3.2"}, status=400)
    call(api, "POST", "/session/start", {"client": "acme", "model": "llama\u00003.2"}, status=400)
    # Issue 18: the input boundary refuses NUL in any string, naming the field (free text used to
    # be stored with the NUL stripped); nothing is stored.
    error = call(
        api, "POST", "/session/start", {"client": "acme", "model": "ollama:llama3.2", "name": "na\u0000me"}, status=400
    )
    assert error["error"]["message"] == boundary.NUL_CHARACTER.format(where="body.name")
    session = start(api, name="name", system_prompt="system")
    sid = session["session_id"]
    error = call(api, "POST", f"/session/{sid}/chat", {"message": "he\u0000llo"}, status=400)
    assert error["error"]["message"] == boundary.NUL_CHARACTER.format(where="body.message")
    assert not SessionMessage.objects.filter(session_id=sid).exists()
    answer = call(api, "POST", f"/session/{sid}/chat", {"message": "hello"}, status=200)
    assert answer["status"] == "complete"
    call(api, "GET", "/sessions?client=%00", status=400)
    call(api, "GET", "/session/%00/summary", status=404)


def test_a_client_bound_token_cannot_switch_to_another_client(owner, client_acme, client_globex, use_simulator):
    _token, raw = ApiToken.issue(user=owner, client=client_acme)
    bound = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    sid = start(bound)["session_id"]
    error = call(bound, "POST", f"/session/{sid}/switch", {"client": "globex"}, status=400)
    assert "only bill client 'acme'" in error["error"]["message"]
    call(bound, "POST", f"/session/{sid}/switch", {"model": "ollama:mistral"}, status=200)


def test_a_client_bound_token_acts_only_on_sessions_of_its_client(owner, client_acme, client_globex, use_simulator):
    """Issue 18, item 5: as for another consultant's session, everything else is a 404."""
    _token, raw = ApiToken.issue(user=owner, client=client_acme)
    bound = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    _token, raw_free = ApiToken.issue(user=owner)
    free = Client(HTTP_AUTHORIZATION=f"Bearer {raw_free}")
    mine = start(bound)["session_id"]
    other = start(free, client="globex")["session_id"]  # the same consultant's, for another client

    for method, url, body in [
        ("POST", f"/session/{other}/chat", {"message": "Bill this to acme's token?"}),
        ("POST", f"/session/{other}/switch", {"model": "ollama:mistral"}),
        ("POST", f"/session/{other}/end", None),
        ("GET", f"/session/{other}/summary", None),
        ("GET", f"/session/{other}/export", None),
    ]:
        error = call(bound, method, url, body, status=404)
        assert error == {"error": {"code": "not_found", "message": "No such session."}}
    assert not SessionMessage.objects.filter(session_id=other).exists()
    assert ChatSession.objects.get(pk=other).status == "active"

    listed = call(bound, "GET", "/sessions", status=200)
    assert [s["session_id"] for s in listed["results"]] == [mine]
    assert call(bound, "GET", "/sessions?client=globex", status=200)["results"] == []
    assert call(bound, "GET", "/stats", status=200)["sessions"] == 1
    error = call(bound, "GET", "/stats?client=globex", status=400)
    assert "only bill client 'acme'" in error["error"]["message"]
    call(bound, "GET", "/search?q=anything&client=globex", status=400)
    call(bound, "GET", f"/session/{mine}/summary", status=200)
    call(free, "GET", f"/session/{other}/summary", status=200)
