"""The gateway, driven by the official `ollama` and `openai` clients over loopback.

The ASGI app runs under daphne in a background thread (one per test process: Twisted's
reactor cannot restart); upstream is the provider simulator.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import httpx
import ollama
import openai
import pytest
from django.db import connection
from django.utils import timezone

from sessions_app.models import ApiToken, ChatSession, ContextStream, SessionMessage

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="session")
def gateway_url():
    """The project's ASGI application served by daphne on a free loopback port."""
    from daphne.endpoints import build_endpoint_description_strings
    from daphne.server import Server

    from config.asgi import application

    server = Server(
        application=application,
        endpoints=build_endpoint_description_strings(host="127.0.0.1", port=0),
        signal_handlers=False,
    )
    threading.Thread(target=server.run, name="gateway-daphne", daemon=True).start()
    deadline = time.monotonic() + 10
    while not getattr(server, "listening_addresses", None):
        assert time.monotonic() < deadline, "daphne did not start"
        time.sleep(0.01)
    return f"http://127.0.0.1:{server.listening_addresses[0][1]}"


@pytest.fixture(autouse=True)
def reads_never_lock_the_server_out(transactional_db):
    """On SQLite, the test database is one in-memory database shared between this thread and the
    server's (shared cache), where a table lock cannot be waited for: a read while the server
    writes fails at once with "database table is locked", and a write while this thread reads
    fails the same way in the server. Reading uncommitted takes no table locks at all. Files (what
    the product runs on) have no table locks: the busy timeout makes either side wait instead."""
    if connection.vendor == "sqlite":
        connection.ensure_connection()
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA read_uncommitted = 1")


@pytest.fixture
def acme_token(owner, client_acme):
    return ApiToken.issue(user=owner, client=client_acme, name="Editor")


@pytest.fixture
def globex_token(owner, client_globex):
    return ApiToken.issue(user=owner, client=client_globex, name="Notebook")


@pytest.fixture
def ollama_client(gateway_url, acme_token, use_simulator):
    return ollama.Client(host=gateway_url, headers={"Authorization": f"Bearer {acme_token[1]}"})


@pytest.fixture
def openai_client(gateway_url, acme_token, use_simulator):
    return openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=acme_token[1], max_retries=0)


def gateway_sessions(token: ApiToken):
    return ChatSession.objects.filter(api_token=token).order_by("started_at")


def wait_for_answer(token: ApiToken) -> SessionMessage:
    """The token's first assistant message, once stored (after a hang-up the server stores it a moment later)."""
    for _ in range(600):
        answer = SessionMessage.objects.filter(session__api_token=token, role="assistant").first()
        if answer is not None:
            return answer
        time.sleep(0.05)
    raise AssertionError("no answer was stored")


def stored(session: ChatSession) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in SessionMessage.objects.filter(session=session).order_by("seq")]


# --- Discovery -------------------------------------------------------------------------------------


def test_version_answers_without_a_token(gateway_url, acme_token):
    assert httpx.get(f"{gateway_url}/api/version").json()["version"]
    assert httpx.head(f"{gateway_url}/api/version").status_code == 200
    assert httpx.get(f"{gateway_url}/t/{acme_token[1]}/api/version").status_code == 200


def test_ollama_client_lists_ollama_models_by_their_bare_names(ollama_client, acme_token):
    names = [m.model for m in ollama_client.list().models]
    assert "llama3.2:latest" in names
    first_use = ApiToken.objects.get(pk=acme_token[0].pk).last_used_at
    assert first_use is not None
    ollama_client.list()
    assert ApiToken.objects.get(pk=acme_token[0].pk).last_used_at == first_use  # at most one write a minute
    assert all(":" not in n or not n.startswith(("openai:", "anthropic:", "ollama:")) for n in names)


def test_openai_sdk_lists_every_model_as_provider_and_model(openai_client):
    ids = [m.id for m in openai_client.models.list()]
    assert "ollama:llama3.2:latest" in ids
    assert all(i.split(":", 1)[0] in ("ollama", "openai", "anthropic") for i in ids)
    assert openai_client.models.retrieve("ollama:llama3.2:latest").id == "ollama:llama3.2:latest"


# --- Chatting through the Ollama API ----------------------------------------------------------------


def test_ollama_chat_streams_the_answer_and_ends_with_the_providers_counts(ollama_client, acme_token, client_acme):
    chunks = list(
        ollama_client.chat(model="llama3.2", messages=[{"role": "user", "content": "Hello there"}], stream=True)
    )
    assert all(not c.done for c in chunks[:-1]) and chunks[-1].done
    text = "".join(c.message.content for c in chunks)
    assert text.startswith("Simulated answer to")
    session = gateway_sessions(acme_token[0]).get()
    assert session.domain == client_acme and session.source == "gateway" and session.is_active
    answer = SessionMessage.objects.get(session=session, role="assistant")
    assert answer.content == text
    final = chunks[-1]
    assert final.eval_count == answer.completion_tokens > 0
    assert final.prompt_eval_count == answer.prompt_tokens > 0
    assert final.total_duration >= final.eval_duration > 0
    assert final.model == "llama3.2" and final.done_reason == "stop"


def test_ollama_chat_without_streaming_answers_one_object(ollama_client, acme_token):
    response = ollama_client.chat(model="llama3.2:latest", messages=[{"role": "user", "content": "Hi"}], stream=False)
    assert response.done and response.message.role == "assistant"
    answer = SessionMessage.objects.get(session__api_token=acme_token[0], role="assistant")
    assert response.message.content == answer.content
    assert response.eval_count == answer.completion_tokens


def test_ollama_generate_is_a_one_turn_conversation(ollama_client, acme_token):
    chunks = list(
        ollama_client.generate(model="llama3.2", prompt="Why is the sky blue?", system="Be brief.", stream=True)
    )
    assert chunks[-1].done and chunks[-1].eval_count
    session = gateway_sessions(acme_token[0]).get()
    assert session.system_prompt == "Be brief."
    assert stored(session) == [("user", "Why is the sky blue?"), ("assistant", "".join(c.response for c in chunks))]
    single = ollama_client.generate(model="llama3.2", prompt="Why is the sky blue?", system="Be brief.", stream=False)
    assert single.response == stored(session)[1][1]


def test_loading_a_model_answers_without_a_session(ollama_client, acme_token):
    response = ollama_client.chat(model="llama3.2", messages=[])
    assert response.done and response.done_reason == "load"
    assert not gateway_sessions(acme_token[0]).exists()


# --- Chatting through the OpenAI API -----------------------------------------------------------------


def test_openai_stream_starts_with_the_role_and_ends_with_usage(openai_client, acme_token):
    chunks = list(
        openai_client.chat.completions.create(
            model="ollama:llama3.2",
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    finish = chunks[-2]
    assert finish.choices[0].finish_reason == "stop" and finish.choices[0].delta.content is None
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    session = gateway_sessions(acme_token[0]).get()
    assert session.system_prompt == "Be brief."
    answer = SessionMessage.objects.get(session=session, role="assistant")
    assert answer.content == text
    assert usage_chunk.usage.prompt_tokens == answer.prompt_tokens
    assert usage_chunk.usage.completion_tokens == answer.completion_tokens
    assert usage_chunk.usage.total_tokens == answer.prompt_tokens + answer.completion_tokens


def test_openai_completion_without_streaming_reports_usage(openai_client, acme_token):
    completion = openai_client.chat.completions.create(
        model="ollama:llama3.2", messages=[{"role": "user", "content": "Hello"}]
    )
    answer = SessionMessage.objects.get(session__api_token=acme_token[0], role="assistant")
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == answer.content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == answer.completion_tokens
    assert completion.usage.prompt_tokens == answer.prompt_tokens


# --- Joining the automatic session ---------------------------------------------------------------------


def test_a_second_call_extends_the_same_session_without_duplicating_history(openai_client, acme_token):
    history = [{"role": "user", "content": "First question"}]
    first = openai_client.chat.completions.create(model="llama3.2", messages=history)
    history += [{"role": "assistant", "content": first.choices[0].message.content}]
    history += [{"role": "user", "content": "Second question"}]
    second = openai_client.chat.completions.create(model="llama3.2", messages=history)
    session = gateway_sessions(acme_token[0]).get()
    assert stored(session) == [
        ("user", "First question"),
        ("assistant", first.choices[0].message.content),
        ("user", "Second question"),
        ("assistant", second.choices[0].message.content),
    ]
    assert "with 2 earlier messages" in second.choices[0].message.content  # the provider saw the history


def test_turns_the_client_made_up_are_stored_once_as_history(ollama_client, acme_token):
    messages = [
        {"role": "user", "content": "Pretend question"},
        {"role": "assistant", "content": "A reply the client wrote itself"},
        {"role": "user", "content": "Real question"},
    ]
    response = ollama_client.chat(model="llama3.2", messages=messages, stream=False)
    session = gateway_sessions(acme_token[0]).get()
    assert stored(session) == [
        ("user", "Pretend question"),
        ("assistant", "A reply the client wrote itself"),
        ("user", "Real question"),
        ("assistant", response.message.content),
    ]


def test_an_edited_history_branches_instead_of_duplicating(ollama_client, acme_token):
    history = [{"role": "user", "content": "Question one"}]
    one = ollama_client.chat(model="llama3.2", messages=history, stream=False).message.content
    history += [{"role": "assistant", "content": one}, {"role": "user", "content": "Question two"}]
    two = ollama_client.chat(model="llama3.2", messages=history, stream=False).message.content
    edited = [*history[:2], {"role": "user", "content": "Question two, rephrased"}]
    three = ollama_client.chat(model="llama3.2", messages=edited, stream=False).message.content

    original, branch = gateway_sessions(acme_token[0])
    assert stored(original) == [
        ("user", "Question one"),
        ("assistant", one),
        ("user", "Question two"),
        ("assistant", two),
    ]
    assert branch.parent_id == original.pk and branch.is_active
    assert stored(branch) == [
        ("user", "Question one"),
        ("assistant", one),
        ("user", "Question two, rephrased"),
        ("assistant", three),
    ]
    copies = SessionMessage.objects.filter(session=branch, copied_from__isnull=False)
    assert copies.count() == 2  # the shared turns are copies, not billed again
    original.refresh_from_db()
    assert not original.is_active  # the abandoned line of the conversation stopped its clock


def test_a_side_request_between_turns_does_not_disturb_the_chat(ollama_client, acme_token):
    history = [{"role": "user", "content": "Plan the Acme migration"}]
    answer = ollama_client.chat(model="llama3.2", messages=history, stream=False).message.content
    # What chat front-ends do after an answer: a one-off request of their own (a title, tags).
    ollama_client.chat(model="llama3.2", messages=[{"role": "user", "content": "Title for: Plan the Acme migration"}])
    history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Next step?"}]
    ollama_client.chat(model="llama3.2", messages=history, stream=False)

    chat, aside = gateway_sessions(acme_token[0])
    assert [role for role, _ in stored(chat)] == ["user", "assistant", "user", "assistant"]
    assert chat.is_active and chat.parent_id is None  # continued, not branched
    assert stored(aside)[0] == ("user", "Title for: Plan the Acme migration")
    assert not ChatSession.objects.filter(parent__in=[chat, aside]).exists()


def test_a_token_for_one_client_never_lands_in_another_clients_session(
    gateway_url, acme_token, globex_token, use_simulator, client_acme, client_globex
):
    acme = ollama.Client(host=gateway_url, headers={"Authorization": f"Bearer {acme_token[1]}"})
    globex = ollama.Client(host=gateway_url, headers={"Authorization": f"Bearer {globex_token[1]}"})
    history = [{"role": "user", "content": "Same words for both"}]
    answer = acme.chat(model="llama3.2", messages=history, stream=False).message.content
    history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Continue"}]
    globex.chat(model="llama3.2", messages=history, stream=False)

    acme_session = gateway_sessions(acme_token[0]).get()
    globex_session = gateway_sessions(globex_token[0]).get()
    assert acme_session.domain == client_acme and globex_session.domain == client_globex
    assert len(stored(acme_session)) == 2
    assert [role for role, _ in stored(globex_session)] == ["user", "assistant", "user", "assistant"]
    assert set(SessionMessage.objects.filter(session=globex_session).values_list("domain", flat=True)) == {
        client_globex.pk
    }


def test_a_new_model_in_the_same_conversation_switches_the_session(ollama_client, acme_token):
    history = [{"role": "user", "content": "Start"}]
    first = ollama_client.chat(model="llama3.2", messages=history, stream=False).message.content
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "Go on"}]
    ollama_client.chat(model="qwen2.5:7b", messages=history, stream=False)
    session = gateway_sessions(acme_token[0]).get()
    assert session.current_model == "ollama:qwen2.5:7b" and session.primary_model == "ollama:llama3.2"
    assert ContextStream.objects.filter(session=session, target_model="ollama:qwen2.5:7b").exists()


def test_an_idle_session_is_not_joined(ollama_client, acme_token, settings):
    ollama_client.chat(model="llama3.2", messages=[{"role": "user", "content": "Before lunch"}], stream=False)
    stale = timezone.now() - timedelta(seconds=settings.SESSION_IDLE_TIMEOUT + 60)
    ChatSession.objects.filter(api_token=acme_token[0]).update(last_activity_at=stale, started_at=stale)
    ollama_client.chat(model="llama3.2", messages=[{"role": "user", "content": "After lunch"}], stream=False)
    sessions = list(gateway_sessions(acme_token[0]))
    assert len(sessions) == 2
    assert stored(sessions[1])[0] == ("user", "After lunch")


def test_the_token_prefix_serves_clients_that_cannot_set_headers(gateway_url, acme_token, use_simulator):
    prefixed = f"{gateway_url}/t/{acme_token[1]}"
    assert httpx.get(prefixed + "/").text == "Ollama is running"
    history = [{"role": "user", "content": "Hi"}]
    answer = ollama.Client(host=prefixed).chat(model="llama3.2", messages=history)
    assert answer.done
    history += [{"role": "assistant", "content": answer.message.content}, {"role": "user", "content": "And?"}]
    sdk = openai.OpenAI(base_url=f"{prefixed}/v1", api_key="ignored", max_retries=0)
    assert sdk.chat.completions.create(model="llama3.2", messages=history).usage.completion_tokens
    assert [role for role, _ in stored(gateway_sessions(acme_token[0]).get())] == ["user", "assistant"] * 2


def test_a_missing_bad_or_revoked_token_is_401_in_each_protocol(gateway_url, acme_token, use_simulator):
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=gateway_url, headers={"Authorization": "Bearer bws_wrong"}).chat(
            model="llama3.2", messages=[{"role": "user", "content": "Hi"}]
        )
    assert caught.value.status_code == 401 and "invalid" in caught.value.error
    with pytest.raises(openai.AuthenticationError) as denied:
        openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="bws_wrong", max_retries=0).chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "Hi"}]
        )
    assert denied.value.body["code"] == "invalid_api_key"
    anonymous = httpx.get(f"{gateway_url}/v1/models")
    assert anonymous.status_code == 401 and "Authorization: Bearer" in anonymous.json()["error"]["message"]

    ApiToken.objects.filter(pk=acme_token[0].pk).update(revoked_at=timezone.now())
    revoked = ollama.Client(host=gateway_url, headers={"Authorization": f"Bearer {acme_token[1]}"})
    with pytest.raises(ollama.ResponseError) as caught:
        revoked.list()
    assert caught.value.status_code == 401
    assert httpx.get(f"{gateway_url}/t/{acme_token[1]}/api/tags").status_code == 401


def test_an_unknown_model_is_404(ollama_client, openai_client):
    with pytest.raises(ollama.ResponseError) as caught:
        ollama_client.chat(model="missing-model", messages=[{"role": "user", "content": "Hi"}], stream=False)
    assert caught.value.status_code == 404 and "not found" in caught.value.error
    with pytest.raises(openai.NotFoundError) as missing:
        openai_client.chat.completions.create(
            model="openai:no-such-model", messages=[{"role": "user", "content": "Hi"}]
        )
    assert missing.value.body["code"] == "model_not_found"


def test_an_upstream_fault_is_a_5xx(ollama_client, openai_client):
    with pytest.raises(ollama.ResponseError) as caught:
        list(
            ollama_client.chat(
                model="llama3.2-fault-status-500", messages=[{"role": "user", "content": "Hi"}], stream=True
            )
        )
    assert caught.value.status_code == 502
    with pytest.raises(openai.InternalServerError) as failed:
        openai_client.chat.completions.create(
            model="llama3.2-fault-status-500", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
    assert failed.value.status_code == 502
    assert failed.value.body["type"] == "server_error"


def test_a_midstream_failure_arrives_the_way_each_protocol_sends_it(ollama_client, openai_client, acme_token):
    received = []
    with pytest.raises(ollama.ResponseError):
        for chunk in ollama_client.chat(
            model="llama3.2-fault-midstream", messages=[{"role": "user", "content": "Hi"}], stream=True
        ):
            received.append(chunk.message.content)
    assert received  # the tokens that arrived before the failure were forwarded
    with pytest.raises(openai.APIError):
        for _chunk in openai_client.chat.completions.create(
            model="llama3.2-fault-midstream", messages=[{"role": "user", "content": "Hi again"}], stream=True
        ):
            pass
    partial = SessionMessage.objects.filter(session__api_token=acme_token[0], role="assistant").first()
    assert partial.status in ("partial", "error")


def test_bad_requests_are_400_in_each_protocols_shape(gateway_url, acme_token, use_simulator):
    auth = {"Authorization": f"Bearer {acme_token[1]}"}
    response = httpx.post(f"{gateway_url}/api/chat", content=b"{not json", headers=auth)
    assert response.status_code == 400 and "invalid JSON" in response.json()["error"]
    response = httpx.post(f"{gateway_url}/api/chat", json={"messages": []}, headers=auth)
    assert response.status_code == 400 and response.json()["error"] == "model is required"
    response = httpx.post(f"{gateway_url}/v1/chat/completions", json={"model": "llama3.2"}, headers=auth)
    body = response.json()["error"]
    assert (
        response.status_code == 400
        and body["type"] == "invalid_request_error"
        and set(body)
        == {
            "message",
            "type",
            "param",
            "code",
        }
    )
    response = httpx.post(
        f"{gateway_url}/v1/chat/completions",
        json={"model": "llama3.2", "messages": [{"role": "assistant", "content": "no question"}]},
        headers=auth,
    )
    assert response.status_code == 400 and "last message" in response.json()["error"]["message"]
    assert httpx.get(f"{gateway_url}/api/chat", headers=auth).status_code == 405
    blank = {"model": "llama3.2", "messages": [{"role": "user", "content": "   "}], "stream": False}
    response = httpx.post(f"{gateway_url}/api/chat", json=blank, headers=auth)
    assert response.status_code == 400 and response.json()["error"] == "The message is empty."
    assert not gateway_sessions(acme_token[0]).exists()  # refused before anything was stored


def test_a_token_bound_to_no_client_is_refused_with_a_clear_message(gateway_url, owner, use_simulator):
    _token, raw = ApiToken.issue(user=owner, client=None)
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=gateway_url, headers={"Authorization": f"Bearer {raw}"}).chat(
            model="llama3.2", messages=[{"role": "user", "content": "Hi"}]
        )
    assert caught.value.status_code == 400 and "--client" in caught.value.error
    assert not ChatSession.objects.filter(user=owner).exists()


# --- The bytes on the wire ------------------------------------------------------------------------------


def test_ollama_streams_ndjson_by_default(gateway_url, acme_token, use_simulator):
    auth = {"Authorization": f"Bearer {acme_token[1]}"}
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "Hi"}]}
    with httpx.stream("POST", f"{gateway_url}/api/chat", json=body, headers=auth) as response:
        assert response.headers["content-type"] == "application/x-ndjson"
        assert response.headers["x-session-id"]
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    assert set(lines[0]) == {"model", "created_at", "message", "done"}
    assert lines[-1]["message"] == {"role": "assistant", "content": ""}
    assert lines[-1]["created_at"].endswith("Z")
    single = httpx.post(f"{gateway_url}/api/chat", json={**body, "stream": False}, headers=auth)
    assert single.headers["content-type"].startswith("application/json") and single.json()["done"] is True


def test_openai_streams_data_only_server_sent_events_ending_in_done(gateway_url, acme_token, use_simulator):
    auth = {"Authorization": f"Bearer {acme_token[1]}"}
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    with httpx.stream("POST", f"{gateway_url}/v1/chat/completions", json=body, headers=auth) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(event.startswith("data: ") for event in events[:-1])
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert all("usage" not in chunk for chunk in chunks)
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}


def test_a_client_that_hangs_up_leaves_the_partial_answer_stored(gateway_url, acme_token, use_simulator):
    auth = {"Authorization": f"Bearer {acme_token[1]}"}
    body = {"model": "llama3.2-fault-slow-words-200", "messages": [{"role": "user", "content": "Long one"}]}
    with httpx.stream("POST", f"{gateway_url}/api/chat", json=body, headers=auth) as response:
        first = json.loads(next(response.iter_lines()))
    assert first["done"] is False
    answer = wait_for_answer(acme_token[0])
    assert answer.status == "partial"
    assert answer.content.startswith(first["message"]["content"])
    assert len(answer.content.split()) < 200


def test_failures_under_the_token_prefix_are_logged_without_the_token(gateway_url, acme_token, use_simulator, caplog):
    prefixed = ollama.Client(host=f"{gateway_url}/t/{acme_token[1]}")
    with caplog.at_level("INFO"), pytest.raises(ollama.ResponseError):
        prefixed.chat(model="missing-model", messages=[{"role": "user", "content": "Hi"}], stream=False)
    assert "/t/bws_" in caplog.text and "-> 404" in caplog.text
    assert acme_token[1] not in caplog.text


def test_a_session_ended_in_the_web_app_is_continued_in_a_branch(ollama_client, acme_token, owner):
    from sessions_app import services

    history = [{"role": "user", "content": "Before the end"}]
    answer = ollama_client.chat(model="llama3.2", messages=history, stream=False).message.content
    ended = gateway_sessions(acme_token[0]).get()
    services.session_end(session_id=ended.pk, user=owner)
    history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "After the end"}]
    ollama_client.chat(model="llama3.2", messages=history, stream=False)
    successor = gateway_sessions(acme_token[0]).exclude(pk=ended.pk).get()
    assert successor.is_active and successor.parent_id == ended.pk
    assert [content for _, content in stored(successor)][:3] == ["Before the end", answer, "After the end"]


def test_a_session_ended_between_the_join_and_the_turn_is_joined_again(ollama_client, acme_token, owner, monkeypatch):
    """The guardian or the web app may end the session in the moment between the two."""
    from sessions_app import services
    from sessions_app.gateway import ollama_wire, views

    history = [{"role": "user", "content": "Before the race"}]
    answer = ollama_client.chat(model="llama3.2", messages=history, stream=False).message.content
    first = gateway_sessions(acme_token[0]).get()
    join = views.gateway_join

    def join_then_end(**kwargs):
        session, known = join(**kwargs)
        if session.pk == first.pk:
            services.session_end(session_id=session.pk, user=owner)
        return session, known

    monkeypatch.setattr(views, "gateway_join", join_then_end)
    monkeypatch.setattr(views, "recollections", lambda token, chat: iter(()))  # the call is planned
    history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "After the race"}]
    body = json.dumps({"model": "llama3.2", "messages": history}).encode()
    _token, _data, _chat, session, start = views._prepare(acme_token[1], body, ollama_wire.parse_chat)
    services._release_claim(session.pk, start.claim)  # the turn is not run here

    assert session.pk != first.pk and session.parent_id == first.pk
    assert start.user_message.content == "After the race" and start.session.pk == session.pk
    assert [content for _, content in stored(session)] == ["Before the race", answer, "After the race"]


def _prepare_only(token_raw: str, history: list[dict]):
    """Run a call up to its first write (the user message stored) on this thread, then give the claim back."""
    from sessions_app.gateway import ollama_wire, views
    from sessions_app.services.turns import _abandon_start

    body = json.dumps({"model": "llama3.2", "messages": history}).encode()
    _token, _data, _chat, session, start = views._prepare(token_raw, body, ollama_wire.parse_chat)
    _abandon_start(start)
    return session, start


def test_a_call_continuing_the_conversation_this_process_answered_reads_no_other_session(ollama_client, acme_token):
    """The process remembers where each token's last call was answered: the usual next call is
    placed without reading the token's sessions or their messages (the claim proves them current)."""
    from django.test.utils import CaptureQueriesContext

    history = [{"role": "user", "content": "Remember me"}]
    answer = ollama_client.chat(model="llama3.2", messages=history, stream=False).message.content
    first = gateway_sessions(acme_token[0]).get()
    history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And now?"}]

    with CaptureQueriesContext(connection) as queries:
        session, start = _prepare_only(acme_token[1], history)

    assert session.pk == first.pk and start.user_message.seq == 3
    reads = [q["sql"] for q in queries.captured_queries if q["sql"].lstrip().upper().startswith("SELECT")]
    assert not any("ollama_session_messages" in sql for sql in reads), reads
    assert not any('"ollama_streaming_sessions"."api_token_id"' in sql for sql in reads), reads
    # One read in all: the token, its user and the catalogue's version, in one statement.
    assert len(reads) == 1 and '"api_tokens"' in reads[0] and "model_catalogue_version" in reads[0], reads


def test_a_call_continuing_a_conversation_another_process_answered_reads_two_rows_sets(ollama_client, acme_token):
    """This process does not remember the token (another answered its last call, or it restarted):
    the token's last session and its messages are read in two statements, and the call continues
    it without the plan's reads of the token's recent sessions."""
    from django.test.utils import CaptureQueriesContext

    from sessions_app.gateway.joining import remembered

    history = [{"role": "user", "content": "Remember me"}]
    answer = ollama_client.chat(model="llama3.2", messages=history, stream=False).message.content
    first = gateway_sessions(acme_token[0]).get()
    history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And now?"}]
    remembered.clear()

    with CaptureQueriesContext(connection) as queries:
        session, start = _prepare_only(acme_token[1], history)

    assert session.pk == first.pk and start.user_message.seq == 3
    reads = [q["sql"] for q in queries.captured_queries if q["sql"].lstrip().upper().startswith("SELECT")]
    assert len(reads) == 3, reads  # the token; its last session (LIMIT 1); that session's messages
    assert "LIMIT 1" in reads[1] and "ollama_session_messages" in reads[2], reads
    assert not any("FOR UPDATE" in q["sql"] for q in queries.captured_queries), queries.captured_queries


def test_a_stale_memory_falls_back_to_the_stored_conversation(ollama_client, acme_token):
    """The remembered session moved on in another process, and the call continues what is stored
    now: it is placed from the stored conversation, not planned, and nothing is branched."""
    from sessions_app.gateway.joining import remembered

    history = [{"role": "user", "content": "First question"}]
    answer = ollama_client.chat(model="llama3.2", messages=history, stream=False).message.content
    memory = dict(remembered._entries)
    remembered.clear()  # the second call is answered "elsewhere"
    history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Second question"}]
    second = ollama_client.chat(model="llama3.2", messages=history, stream=False).message.content
    remembered._entries.update(memory)  # this process still remembers the session after the first call

    history += [{"role": "assistant", "content": second}, {"role": "user", "content": "Third question"}]
    session, start = _prepare_only(acme_token[1], history)

    assert gateway_sessions(acme_token[0]).count() == 1 and session == gateway_sessions(acme_token[0]).get()
    assert start.user_message.seq == 5
    assert [content for _, content in stored(session)] == [
        "First question",
        answer,
        "Second question",
        second,
        "Third question",
    ]


def test_a_first_message_starts_its_session_without_reading_the_tokens_others(ollama_client, acme_token):
    """No stored conversation can match a call with no earlier turns: nothing is read to find one."""
    from django.test.utils import CaptureQueriesContext

    ollama_client.chat(model="llama3.2", messages=[{"role": "user", "content": "An earlier chat"}], stream=False)
    with CaptureQueriesContext(connection) as queries:
        _session, start = _prepare_only(acme_token[1], [{"role": "user", "content": "A new chat"}])

    assert start.user_message.seq == 1 and gateway_sessions(acme_token[0]).count() == 2
    sql = [q["sql"] for q in queries.captured_queries]
    assert not any('"ollama_streaming_sessions"."api_token_id" =' in q and q.startswith("SELECT") for q in sql), sql
    assert not any("FOR UPDATE" in q and '"api_tokens"' in q for q in sql), sql  # no lock on the token
    # The turn claims the session it has just started without reading it or its (no) messages again.
    selects = [q for q in sql if q.startswith("SELECT")]
    assert not any("ollama_session_messages" in q or "ollama_streaming_sessions" in q for q in selects), selects


def test_a_remembered_session_that_moved_on_elsewhere_is_planned_afresh(ollama_client, acme_token, owner):
    """Another process answered in the session since this one remembered it: a client coming back
    to the older point branches (as it would in any process), never appends after the other turn."""
    from sessions_app.gateway.joining import remembered

    history = [{"role": "user", "content": "First question"}]
    answer = ollama_client.chat(model="llama3.2", messages=history, stream=False).message.content
    first = gateway_sessions(acme_token[0]).get()
    memory = dict(remembered._entries)  # this process's memory after the first call
    remembered.clear()  # the second call is answered "elsewhere"
    ongoing = [*history, {"role": "assistant", "content": answer}]
    ollama_client.chat(model="llama3.2", messages=[*ongoing, {"role": "user", "content": "Elsewhere"}], stream=False)
    assert len(stored(first)) == 4
    remembered._entries.update(memory)

    session, _start = _prepare_only(acme_token[1], [*ongoing, {"role": "user", "content": "An edited second question"}])

    assert session.pk != first.pk and session.parent_id == first.pk
    assert [content for _, content in stored(session)] == ["First question", answer, "An edited second question"]
    assert len(stored(first)) == 4


def test_a_long_conversation_larger_than_djangos_upload_limit_is_accepted(ollama_client, acme_token, settings):
    chunk = "word " * (settings.CHAT_MAX_MESSAGE_CHARS // 5)
    history = []
    while sum(len(m["content"]) for m in history) <= settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
        history += [{"role": "user", "content": chunk}, {"role": "assistant", "content": chunk}]
    response = ollama_client.chat(model="llama3.2", messages=[*history, {"role": "user", "content": "Sum up"}])
    assert response.done
    assert len(stored(gateway_sessions(acme_token[0]).get())) == len(history) + 2


def test_a_second_call_while_an_answer_streams_is_a_409_in_each_protocol(gateway_url, acme_token, openai_client):
    auth = {"Authorization": f"Bearer {acme_token[1]}"}
    # A stalled upstream keeps the first answer streaming for as long as this test needs.
    stalled = {"model": "llama3.2-fault-stall", "messages": [{"role": "user", "content": "Slow one"}]}
    with httpx.stream("POST", f"{gateway_url}/api/chat", json=stalled, headers=auth) as streaming:
        lines = streaming.iter_lines()  # kept: dropping the iterator would hang up
        assert json.loads(next(lines))["done"] is False  # the turn holds the session now
        messages = [*stalled["messages"], {"role": "user", "content": "And another"}]
        busy = httpx.post(f"{gateway_url}/api/chat", json={**stalled, "messages": messages}, headers=auth)
        assert busy.status_code == 409 and "already streaming" in busy.json()["error"]
        with pytest.raises(openai.ConflictError) as conflict:
            openai_client.chat.completions.create(model=stalled["model"], messages=messages)
        assert conflict.value.body["code"] == "session_busy"
        assert not SessionMessage.objects.filter(role="assistant").exists()  # the first answer still streams
    assert wait_for_answer(acme_token[0]).status == "partial"  # and is kept when its client hangs up
    assert gateway_sessions(acme_token[0]).count() == 1


def test_a_paid_model_through_the_gateway_is_billed_to_the_tokens_client(openai_client, acme_token, client_acme):
    completion = openai_client.chat.completions.create(
        model="openai:gpt-4o", messages=[{"role": "user", "content": "Estimate the Acme budget"}]
    )
    answer = SessionMessage.objects.get(session__api_token=acme_token[0], role="assistant")
    assert answer.provider == "openai" and answer.domain == client_acme
    assert answer.cost_usd > 0
    assert completion.usage.completion_tokens == answer.completion_tokens
    assert completion.model == "openai:gpt-4o"  # the name the client asked for, echoed


def test_what_the_ollama_cli_asks_before_chatting_is_answered(gateway_url, acme_token, use_simulator):
    prefixed = f"{gateway_url}/t/{acme_token[1]}"
    assert httpx.head(prefixed + "/").status_code == 200  # the CLI's heartbeat
    shown = httpx.post(f"{prefixed}/api/show", json={"model": "llama3.2"})
    assert shown.status_code == 200 and "completion" in shown.json()["capabilities"]
    assert httpx.post(f"{prefixed}/api/show", json={"model": "missing-model"}).status_code == 404
    assert httpx.get(f"{prefixed}/api/ps").json() == {"models": []}
    unload = httpx.post(f"{prefixed}/api/generate", json={"model": "llama3.2", "keep_alive": 0, "stream": False})
    assert unload.json()["done_reason"] == "unload"
    assert not gateway_sessions(acme_token[0]).exists()


def test_endpoints_the_gateway_does_not_offer_say_so_in_the_protocols_shape(gateway_url, acme_token):
    auth = {"Authorization": f"Bearer {acme_token[1]}"}
    embed = httpx.post(f"{gateway_url}/api/embed", json={"model": "llama3.2", "input": "x"}, headers=auth)
    assert embed.status_code == 404 and "embed is not supported" in embed.json()["error"]
    pull = httpx.post(f"{gateway_url}/t/{acme_token[1]}/api/pull", json={"model": "llama3.2"})
    assert pull.status_code == 404 and acme_token[1] not in pull.text
    legacy = httpx.post(f"{gateway_url}/v1/completions", json={"model": "llama3.2", "prompt": "x"}, headers=auth)
    assert legacy.status_code == 404 and legacy.json()["error"]["code"] == "unsupported_endpoint"


# --- Conversations told apart (issue 18, item 4) ------------------------------------------------


def test_a_new_conversation_never_joins_a_session_whose_first_turn_is_not_stored_yet(acme_token, use_simulator):
    """The race behind the 409s: call A has started its session but not yet stored its message."""
    from sessions_app.gateway import ollama_wire
    from sessions_app.gateway.joining import gateway_join

    token = acme_token[0]

    def join(content: str):
        body = json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": content}]}).encode()
        return gateway_join(token=token, chat=ollama_wire.parse_chat(json.loads(body)))[0]

    first = join("Draft a title for this chat")  # its turn has not begun: no stored message yet
    second = join("Suggest three tags")
    assert second.pk != first.pk
    assert {s.pk for s in gateway_sessions(token)} == {first.pk, second.pk}


@pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="concurrent writers need PostgreSQL: SQLite's shared in-memory test database cannot wait for a table lock",
)
def test_unrelated_conversations_on_one_token_run_concurrently_in_sessions_of_their_own(
    gateway_url, acme_token, client_acme, use_simulator
):
    """Tools send side requests (titles, tags, autocomplete) in parallel: none may collide."""
    import asyncio

    auth = {"Authorization": f"Bearer {acme_token[1]}"}
    stalled = {"model": "llama3.2-fault-stall", "messages": [{"role": "user", "content": "A long one"}]}

    async def round_of(calls: int, label: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{gateway_url}/api/chat",
                        json={
                            "model": "llama3.2",
                            "stream": False,
                            "messages": [{"role": "user", "content": f"{label} conversation {index}"}],
                        },
                        headers=auth,
                    )
                    for index in range(calls)
                )
            )

    # One conversation is still answering while the others start: they must not join it either.
    with httpx.stream("POST", f"{gateway_url}/api/chat", json=stalled, headers=auth) as streaming:
        lines = streaming.iter_lines()
        assert json.loads(next(lines))["done"] is False
        for label in ("first", "second", "third"):
            responses = asyncio.run(round_of(6, label))
            assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses]
            assert len({r.headers["X-Session-Id"] for r in responses}) == 6
    sessions = list(gateway_sessions(acme_token[0]))
    assert len(sessions) == 1 + 18 and {s.domain_id for s in sessions} == {client_acme.pk}
    for session in sessions[1:]:
        assert [role for role, _ in stored(session)] == ["user", "assistant"]


# --- Non-streaming calls ask upstream for one response -------------------------------------------------


@pytest.mark.parametrize(
    ("model", "upstream_path"),
    [
        ("ollama:llama3.2", "/api/chat"),
        ("openai:gpt-4o", "/v1/chat/completions"),
        ("anthropic:claude-sonnet-4", "/v1/messages"),
    ],
)
def test_a_call_without_streaming_asks_each_provider_for_one_response(
    openai_client, acme_token, use_simulator, model, upstream_path
):
    completion = openai_client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}])
    upstream = use_simulator.last_request(path=upstream_path)
    assert upstream is not None and not upstream["body"].get("stream")  # no per-token relay upstream
    session = gateway_sessions(acme_token[0]).get()
    (user, answer) = SessionMessage.objects.filter(session=session).order_by("seq")
    assert (user.role, user.content) == ("user", "Hello")
    assert answer.status == "complete" and answer.content == completion.choices[0].message.content
    # The provider's own counts, as a streamed call reports them, billed the same way.
    assert answer.token_source == "provider"
    assert (answer.prompt_tokens, answer.completion_tokens) == (
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
    )
    assert answer.completion_tokens == upstream["tokens_sent"]
    usage = answer.usage.get()
    assert usage.status == "ok" and usage.cost == answer.cost_usd
    assert answer.cost_usd is not None and (answer.cost_usd > 0) == (not model.startswith("ollama:"))
    session.refresh_from_db()
    assert session.total_messages == 2 and session.total_tokens == answer.tokens
    assert session.estimated_cost_usd == answer.cost_usd
    if model.startswith("anthropic:"):
        assert usage.provider_model == "claude-sonnet-4-20250514"


def test_ollama_calls_without_streaming_ask_ollama_for_one_object(ollama_client, acme_token, use_simulator):
    chat = ollama_client.chat(model="llama3.2", messages=[{"role": "user", "content": "Hi"}], stream=False)
    assert use_simulator.last_request(path="/api/chat")["body"]["stream"] is False
    generated = ollama_client.generate(model="qwen2.5:7b", prompt="Why?", stream=False)
    assert use_simulator.last_request(path="/api/chat")["body"]["stream"] is False
    answers = SessionMessage.objects.filter(session__api_token=acme_token[0], role="assistant").order_by("timestamp")
    assert [a.content for a in answers] == [chat.message.content, generated.response]
    assert [a.completion_tokens for a in answers] == [chat.eval_count, generated.eval_count]


def test_a_provider_failure_without_streaming_keeps_the_message_and_answers_in_each_shape(
    ollama_client, openai_client, acme_token
):
    with pytest.raises(ollama.ResponseError) as caught:
        ollama_client.chat(
            model="llama3.2-fault-status-500", messages=[{"role": "user", "content": "Hi"}], stream=False
        )
    assert caught.value.status_code == 502
    with pytest.raises(openai.InternalServerError) as failed:
        openai_client.chat.completions.create(
            model="llama3.2-fault-status-500", messages=[{"role": "user", "content": "Hi again"}]
        )
    body = failed.value.body
    assert failed.value.status_code == 502 and isinstance(body, dict) and body["type"] == "server_error"
    messages = SessionMessage.objects.filter(session__api_token=acme_token[0]).order_by("timestamp", "seq")
    assert [(m.role, m.status) for m in messages if m.role == "user"] == [("user", "complete")] * 2
    assert {m.status for m in messages if m.role == "assistant"} == {"error"}


def test_a_whole_answer_that_never_comes_is_a_504(ollama_client, acme_token, settings):
    settings.PROVIDER_FIRST_TOKEN_TIMEOUT = 0.3
    settings.PROVIDER_IDLE_TIMEOUT = 0.2
    with pytest.raises(ollama.ResponseError) as caught:
        ollama_client.chat(
            model="llama3.2-fault-stall-first", messages=[{"role": "user", "content": "Hi"}], stream=False
        )
    assert caught.value.status_code == 504 and "no answer within 0.5s" in caught.value.error
    answer = wait_for_answer(acme_token[0])
    assert answer.status == "error" and answer.usage.get().status == "error"


def test_a_caller_that_hangs_up_before_the_whole_answer_leaves_its_message_stored(
    gateway_url, acme_token, use_simulator
):
    auth = {"Authorization": f"Bearer {acme_token[1]}"}
    body = {"model": "llama3.2-ttft-3000", "messages": [{"role": "user", "content": "Take your time"}], "stream": False}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway_url}/api/chat", json=body, headers=auth, timeout=httpx.Timeout(5, read=0.5))
    answer = wait_for_answer(acme_token[0])
    assert answer.status == "error" and answer.content == ""
    assert answer.usage.get().status == "cancelled"
    user = SessionMessage.objects.get(session__api_token=acme_token[0], role="user")
    assert user.content == "Take your time" and user.seq < answer.seq
