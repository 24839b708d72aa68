"""Export and import: the versioned JSON document, the round trip, and refusing bad files."""

from __future__ import annotations

import base64
import copy
import json
from decimal import Decimal

import pytest

from billing.models import LLMUsage
from sessions_app import integrity, selectors, services
from sessions_app.invariants import check_session
from sessions_app.models import ApiToken, ChatSession, SessionMessage
from sessions_app.tests.schema_check import assert_matches
from sessions_app.toolkit import SessionManager
from sessions_app.transfer import (
    FORMAT_NAME,
    ImportInvalid,
    session_export,
    session_import,
)

# Fields an import necessarily changes: new ids, the new session's own chain, the imported mark.
RENEWED = {"message_id", "hash", "is_imported"}


@pytest.fixture
def sealed(owner, client_acme, client_globex, use_simulator):
    """An ended, sealed session on a paid model that switched client once."""
    sm = SessionManager(owner, client="acme", model="openai:gpt-4o")
    sm.create_session(name="Quarter close", system_prompt="Answer as an accountant.")
    sm.chat("How do I close the quarter?")
    services.session_switch(session_id=sm.session.pk, user=owner, client="globex", reason="Globex asked")
    sm.chat("And for Globex?")
    sm.end()
    session = ChatSession.objects.get(pk=sm.session.pk)
    assert session.status == "ended" and session.soulfra_hash
    return session


@pytest.fixture
def document(owner, client_acme, client_globex):
    """The export of a sealed session with a switch, built without a provider call (fast)."""
    session = services.session_start(user=owner, client="acme", model="ollama:llama3.2", name="Quick")
    history = [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "One."}]
    services.session_append_history(session_id=session.pk, user=owner, messages=history)
    services.session_switch(session_id=session.pk, user=owner, client="globex")
    services.session_append_history(session_id=session.pk, user=owner, messages=history)
    services.session_end(session_id=session.pk, user=owner)
    return session_export(session=ChatSession.objects.get(pk=session.pk))


def test_the_export_holds_every_field_segments_streams_and_the_seal(sealed):
    document = session_export(session=sealed)

    assert document["format"] == FORMAT_NAME and document["version"] == 1
    assert document["session"]["session_id"] == str(sealed.pk)
    assert document["session"]["system_prompt"] == "Answer as an accountant."
    assert document["session"]["estimated_cost_usd"] == f"{sealed.estimated_cost_usd:.6f}"
    assert document["seal"] == sealed.soulfra_hash
    assert document["signing_key"]["key_id"] == integrity.key_id()
    assert [m["seq"] for m in document["messages"]] == [1, 2, 3, 4]
    stored = sealed.messages.get(seq=2)
    exported = document["messages"][1]
    assert exported["hash"] == stored.hash
    assert exported["cost_usd"] == f"{stored.cost_usd:.6f}"
    assert exported["prompt_tokens"] == stored.prompt_tokens
    assert exported["client"] == "acme"
    assert set(exported) >= {"timestamp", "token_source", "status", "shared_to_domains", "shared_to_models"}
    assert [s["client"] for s in document["segments"]] == ["acme", "globex"]
    [stream] = document["context_streams"]
    assert stream["target_client"] == "globex" and stream["note"] == "Globex asked"
    assert stream["context_snapshot"]
    json.dumps(document)  # JSON-able as it stands


def test_round_trip_preserves_every_field_and_the_seal(sealed, owner):
    before = LLMUsage.objects.count()
    document = session_export(session=sealed)

    result = session_import(user=owner, data=json.dumps(document))

    assert result.valid and result.trusted
    assert "seal signature valid" in result.detail
    imported = result.session
    assert imported.source == "import" and imported.pk != sealed.pk
    again = session_export(session=imported)
    for original, copied in zip(document["messages"], again["messages"], strict=True):
        assert {k: v for k, v in copied.items() if k not in RENEWED} == {
            k: v for k, v in original.items() if k not in RENEWED
        }
        assert copied["is_imported"] is True
    assert again["imported"]["seal"] == document["seal"]
    assert [m["hash"] for m in again["imported"]["message_hashes"]] == [m["hash"] for m in document["messages"]]
    assert again["imported"]["segments"] == document["segments"]
    assert again["imported"]["context_streams"] == document["context_streams"]
    assert again["imported"]["source"] == document["session"]
    assert again["session"]["system_prompt"] == document["session"]["system_prompt"]
    # Never billed again: no usage rows, no tokens or cost in the totals, no time.
    assert LLMUsage.objects.count() == before
    assert imported.total_messages == 4
    assert imported.total_tokens == 0 and imported.estimated_cost_usd == Decimal(0)
    assert imported.duration_seconds == 0
    assert check_session(imported) == []


def test_an_export_of_an_import_imports_again(sealed, owner):
    first = session_import(user=owner, data=session_export(session=sealed)).session
    second = session_import(user=owner, data=session_export(session=first))
    assert second.valid and second.trusted
    assert second.session.imported_seal["source"]["session_id"] == str(first.pk)


def test_an_active_session_imports_with_its_chain_checked_but_unverified(owner, client_acme, use_simulator):
    # Issue 18: anyone can recompute a chain, so an unsealed file is never "valid" (it was before).
    sm = SessionManager(owner, client="acme", model="ollama:llama3.2")
    sm.chat("Hello")
    result = session_import(user=owner, data=session_export(session=sm.session))
    assert not result.valid and not result.trusted
    assert (
        result.detail.startswith(integrity.UNTRUSTED_IMPORT) and "hash chain of 2 messages is intact" in result.detail
    )


def test_a_seal_from_another_server_is_unverified_unless_its_key_is_trusted(sealed, owner, settings):
    document = session_export(session=sealed)
    original_public_key = document["signing_key"]["public_key"]
    settings.SESSION_SIGNING_KEY = base64.b64encode(b"another-server-key-32-bytes-long").decode()

    result = session_import(user=owner, data=document)

    # Issue 18: checked against the key in the file, but that key vouches for nothing (it was "valid").
    assert not result.valid and not result.trusted
    assert result.detail.startswith(integrity.UNTRUSTED_IMPORT) and "does not trust" in result.detail

    settings.SESSION_TRUSTED_KEYS = [original_public_key]
    result = session_import(user=owner, data=document)
    assert result.valid and result.trusted
    assert f"trusted key {document['seal']['key_id']}" in result.detail


def _refused(owner, document, expected: str) -> None:
    sessions, messages = ChatSession.objects.count(), SessionMessage.objects.count()
    with pytest.raises(ImportInvalid) as caught:
        session_import(user=owner, data=document if isinstance(document, str | bytes) else json.dumps(document))
    assert expected in caught.value.message
    assert (ChatSession.objects.count(), SessionMessage.objects.count()) == (sessions, messages)


def _edit(document: dict, change) -> dict:
    edited = copy.deepcopy(document)
    change(edited)
    return edited


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda d: d["messages"][1].update(content="A different answer"),
            "messages[1] (seq 2): its hash does not match",
        ),
        (lambda d: d["messages"][3].update(cost_usd="0.000001"), "messages[3] (seq 4): its hash does not match"),
        (lambda d: d["messages"][0].update(timestamp="2020-01-01T00:00:00.000000Z"), "messages[0] (seq 1)"),
        (lambda d: d["session"].update(total_tokens=1), "session.total_tokens does not match the seal"),
        (lambda d: d["segments"][0].update(model="ollama:edited"), "session.segments does not match the seal"),
        (lambda d: d["messages"].pop(), "the last message's hash does not match the seal"),
        (lambda d: d["messages"][2].update(hash=""), "messages[2] (seq 3) has no hash"),
        (lambda d: d.update(seal={**d["seal"], "signature": base64.b64encode(b"x" * 64).decode()}), "signature"),
    ],
)
def test_a_tampered_file_is_refused_naming_what_is_wrong(document, owner, change, expected):
    _refused(owner, _edit(document, change), expected)


def _rechain(document: dict) -> str:
    """Recompute the public hash chain over the document's messages, as a forger can."""
    from django.utils.dateparse import parse_datetime

    previous = integrity.GENESIS
    for m in document["messages"]:
        row = SessionMessage(
            message_id=m["message_id"],
            seq=m["seq"],
            role=m["role"],
            content=m["content"],
            timestamp=m["timestamp"],
            model=m["model"],
            provider=m["provider"],
            domain_id=m["client_id"],
            prompt_tokens=m["prompt_tokens"],
            completion_tokens=m["completion_tokens"],
            tokens=m["tokens"],
            token_source=m["token_source"],
            cost_usd=Decimal(m["cost_usd"]),
            status=m["status"],
            is_imported=m["is_imported"],
        )
        row.timestamp = parse_datetime(m["timestamp"])
        m["hash"] = previous = integrity.link_hash(previous, row)
    return previous


def test_a_forger_who_recomputes_the_chain_still_fails_the_signature(sealed, owner):
    document = session_export(session=sealed)
    document["messages"][1]["content"] = "Forged"
    document["seal"]["signed"]["chain_head"] = _rechain(document)
    _refused(owner, document, "the seal's signature is invalid")


def _forged(document: dict) -> dict:
    forged = copy.deepcopy(document)
    forged["messages"][1]["content"] = "Forged"
    _rechain(forged)
    return forged


def _resealed_with_own_key(document: dict) -> dict:
    """The forged document sealed by the forger's own key, its public key in the file."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    document["seal"]["signed"]["chain_head"] = document["messages"][-1]["hash"]
    document["seal"]["key_id"] = integrity.key_id(public)
    document["seal"]["signature"] = base64.b64encode(key.sign(integrity.canonical_json(document["seal"]["signed"])))
    document["seal"]["signature"] = document["seal"]["signature"].decode()
    document["signing_key"] = {"algorithm": "Ed25519", "key_id": integrity.key_id(public)}
    document["signing_key"]["public_key"] = base64.b64encode(public).decode()
    return document


@pytest.mark.parametrize(
    ("forge", "why"),
    [
        (lambda d: {**d, "seal": None, "session": {**d["session"], "status": "active"}}, "carries no seal"),
        (_resealed_with_own_key, "does not trust"),
        (lambda d: {**d, "seal": None, "messages": [{**m, "hash": ""} for m in d["messages"]]}, "nothing in the file"),
    ],
    ids=["unsealed-and-active", "sealed-by-the-forger", "stripped"],
)
def test_a_forged_file_is_stored_as_unverified_never_valid(document, owner, forge, why):
    result = session_import(user=owner, data=json.dumps(forge(_forged(document))))

    assert not result.valid and not result.trusted
    assert result.detail.startswith(integrity.UNTRUSTED_IMPORT) and why in result.detail
    summary = selectors.session_summary(session=result.session)
    assert summary["integrity"]["valid"] is False
    assert summary["integrity"]["detail"].startswith(integrity.UNTRUSTED_IMPORT)
    assert check_session(result.session) == []  # this server's record of what it stored is sound


def test_an_untrusted_import_cannot_be_laundered_through_an_export(document, owner):
    first = session_import(user=owner, data=json.dumps(_resealed_with_own_key(_forged(document))))
    exported = session_export(session=first.session)  # sealed by this server, over the copy

    again = session_import(user=owner, data=json.dumps(exported))
    assert not again.valid and "an export of an import that no trusted key sealed" in again.detail

    exported["imported"]["integrity"].update(valid=True, trusted=True)  # not signed: the seal says otherwise
    _refused(owner, exported, "session.import_untrusted does not match the seal")


@pytest.mark.parametrize(
    ("mangle", "expected"),
    [
        (lambda text: text[:-20], "The file is not JSON"),
        (lambda text: "[1, 2]", "expected a JSON object"),
        (lambda text: text.replace(FORMAT_NAME, "something-else"), "'format' is 'something-else'"),
        (lambda text: text.replace('"version": 1', '"version": 2', 1), "format version 2; this server reads version 1"),
    ],
)
def test_a_malformed_file_is_refused_with_a_clear_error(document, owner, mangle, expected):
    text = json.dumps(document, indent=2)
    _refused(owner, mangle(text), expected)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d["messages"][0].pop("role"), "messages[0].role: missing"),
        (lambda d: d["messages"][0].update(role="wizard"), "messages[0].role: 'wizard' is not one of"),
        (lambda d: d["messages"][1].update(timestamp="yesterday"), "messages[1].timestamp: expected an ISO 8601 time"),
        (lambda d: d["messages"][1].update(tokens=-3), "messages[1].tokens: expected a whole number"),
        (lambda d: d["messages"][1].update(cost_usd="lots"), "messages[1].cost_usd: expected an amount"),
        (lambda d: d["messages"][2].update(seq=1), "messages[2].seq: 1 is zero or repeated"),
        (lambda d: d.pop("segments"), "segments: missing"),
        (lambda d: d["session"].update(started_at=None), "session.started_at: must not be null"),
    ],
)
def test_a_file_with_a_bad_field_is_refused_naming_the_field(document, owner, change, expected):
    _refused(owner, _edit(document, change), expected)


def test_an_unknown_client_is_named_and_can_be_overridden(sealed, owner, client_globex):
    document = session_export(session=sealed)
    document["session"]["client"] = "initech"
    with pytest.raises(ImportInvalid, match="'initech' does not exist here"):
        session_import(user=owner, data=document)
    # The session's client is not part of what the seal signs by slug: the id still matches.
    result = session_import(user=owner, data=document, client="globex")
    assert result.session.domain == client_globex


def test_an_import_belongs_to_the_importer_and_stays_out_of_billing(sealed, colleague):
    result = session_import(user=colleague, data=session_export(session=sealed))
    assert result.session.user == colleague
    assert SessionMessage.objects.billable().filter(session=result.session).count() == 0
    assert check_session(result.session) == []


# --- over the REST API --------------------------------------------------------------------------


@pytest.fixture
def api(owner):
    from django.test import Client

    _, raw = ApiToken.issue(user=owner)
    return Client(HTTP_AUTHORIZATION=f"Bearer {raw}")


def test_the_api_exports_a_session_as_a_download(document, api):
    session_id = document["session"]["session_id"]
    response = api.get(f"/api/ollama/session/{session_id}/export")
    assert response.status_code == 200
    assert response["Content-Disposition"] == f'attachment; filename="session-{session_id}.json"'
    body = response.json()
    assert body["messages"] == document["messages"] and body["seal"] == document["seal"]
    assert_matches(body, "/session/{session_id}/export", "GET", 200)


def test_the_api_hides_another_consultants_session(document, colleague, client):
    _, raw = ApiToken.issue(user=colleague)
    response = client.get(
        f"/api/ollama/session/{document['session']['session_id']}/export", HTTP_AUTHORIZATION=f"Bearer {raw}"
    )
    assert response.status_code == 404


def test_the_api_imports_a_document(document, api):
    response = api.post("/api/ollama/session/import", data=json.dumps(document), content_type="application/json")
    assert response.status_code == 201
    body = response.json()
    assert body["integrity"] == {"valid": True, "trusted": True, "detail": body["integrity"]["detail"]}
    assert ChatSession.objects.get(pk=body["session"]["session_id"]).source == "import"
    assert_matches(body, "/session/import", "POST", 201)


def test_the_api_refuses_a_tampered_document_naming_the_fault(document, api):
    document["messages"][0]["content"] = "edited"
    response = api.post("/api/ollama/session/import", data=json.dumps(document), content_type="application/json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_import" and "messages[0] (seq 1)" in error["message"]
    assert_matches(response.json(), "/session/import", "POST", 400)


def test_the_api_import_needs_csrf_for_a_cookie_sign_in(document, client, owner):
    from django.test import Client

    browser = Client(enforce_csrf_checks=True)
    browser.force_login(owner)
    response = browser.post("/api/ollama/session/import", data=json.dumps(document), content_type="application/json")
    assert response.status_code == 403


def test_the_summary_page_offers_the_session_export(document, owner_client):
    session_id = document["session"]["session_id"]
    page = owner_client.get(f"/sessions/{session_id}/summary/").content.decode()
    assert f'href="/api/ollama/session/{session_id}/export"' in page
    assert owner_client.get(f"/api/ollama/session/{session_id}/export").status_code == 200


def test_a_client_bound_token_imports_into_its_client_only(document, owner, client_globex, client):
    _, raw = ApiToken.issue(user=owner, client=client_globex)
    body = json.dumps(document)
    headers = {"HTTP_AUTHORIZATION": f"Bearer {raw}"}
    refused = client.post(
        "/api/ollama/session/import?client=acme", data=body, content_type="application/json", **headers
    )
    assert refused.status_code == 400 and "bound to client 'globex'" in refused.json()["error"]["message"]
    done = client.post("/api/ollama/session/import", data=body, content_type="application/json", **headers)
    assert done.status_code == 201 and done.json()["session"]["client"] == "globex"
