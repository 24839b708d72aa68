"""The chat pages: session list, new session, chat, summary, and the chat page's JSON."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from django.core.cache import cache
from django.utils import timezone

from sessions_app import services
from sessions_app.forms import BRAND_NOT_OF_CLIENT
from sessions_app.models import ChatSession
from tests.factories import BrandFactory, ClientFactory, MessageFactory, SessionFactory


@pytest.fixture(autouse=True)
def _fresh_model_list():
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def acme_session(owner, client_acme, use_simulator):
    return services.session_start(user=owner, client=client_acme, model="ollama:llama3.2", name="Contract review")


def config_of(response) -> dict:
    html = response.content.decode()
    start = html.index('<script id="chat-config" type="application/json">') + len(
        '<script id="chat-config" type="application/json">'
    )
    return json.loads(html[start : html.index("</script>", start)])


# --- List --------------------------------------------------------------------------------------


def test_session_list_needs_a_sign_in(client):
    response = client.get("/sessions/")
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_session_list_shows_only_my_sessions_with_live_timers(owner_client, owner, colleague, client_acme):
    mine = SessionFactory(user=owner, domain=client_acme, name="Mine, running")
    SessionFactory(user=colleague, domain=client_acme, name="Colin's")
    response = owner_client.get("/sessions/")
    html = response.content.decode()
    assert response.status_code == 200
    assert "Mine, running" in html
    assert "Colin&#x27;s" not in html and "Colin's" not in html
    assert mine.is_active and 'class="live-timer" data-timer-start=' in html


def test_session_list_filters_by_client_status_and_date(owner_client, owner, client_acme, client_globex):
    now = timezone.now()
    SessionFactory(user=owner, domain=client_acme, name="Acme today")
    SessionFactory(user=owner, domain=client_globex, name="Globex today")
    SessionFactory(
        user=owner,
        domain=client_acme,
        name="Acme last year",
        started_at=now - dt.timedelta(days=400),
        status="ended",
        ended_at=now - dt.timedelta(days=400) + dt.timedelta(hours=1),
        duration_seconds=3600,
    )

    html = owner_client.get("/sessions/", {"client": "globex"}).content.decode()
    assert "Globex today" in html and "Acme today" not in html

    html = owner_client.get("/sessions/", {"status": "ended"}).content.decode()
    assert "Acme last year" in html and "Acme today" not in html

    since = (now - dt.timedelta(days=30)).date().isoformat()
    html = owner_client.get("/sessions/", {"client": "acme", "start": since}).content.decode()
    assert "Acme today" in html and "Acme last year" not in html


def test_session_list_rejects_a_reversed_date_range(owner_client):
    response = owner_client.get("/sessions/", {"start": "2026-02-01", "end": "2026-01-01"})
    assert response.status_code == 400
    assert "The end date is before the start date." in response.content.decode()


# --- New session -------------------------------------------------------------------------------


def test_new_session_offers_only_clients_i_may_bill_and_the_live_models(
    owner_client, owner, colleague, client_acme, use_simulator
):
    private = ClientFactory(name="Initech", slug="initech")
    private.members.add(colleague)
    html = owner_client.get("/sessions/new/").content.decode()
    assert '<option value="acme"' in html
    assert "initech" not in html
    assert "ollama:llama3.2:latest" in html


def test_starting_a_session_redirects_to_its_chat_page(owner_client, owner, client_acme, use_simulator):
    brand = client_acme.brands.get()
    response = owner_client.post(
        "/sessions/new/",
        {
            "client": "acme",
            "model": "ollama:llama3.2:latest",
            "brand": str(brand.pk),
            "name": "Kick-off",
            "system_prompt": "Be brief.",
        },
    )
    session = ChatSession.objects.get(user=owner)
    assert response.status_code == 302
    assert response["Location"] == f"/sessions/{session.pk}/"
    assert (session.domain, session.brand, session.name, session.system_prompt) == (
        client_acme,
        brand,
        "Kick-off",
        "Be brief.",
    )


def test_a_brand_of_another_client_is_refused(owner_client, client_acme, client_globex, use_simulator):
    response = owner_client.post(
        "/sessions/new/",
        {"client": "acme", "model": "ollama:llama3.2:latest", "brand": str(client_globex.brands.get().pk)},
    )
    assert response.status_code == 400
    assert BRAND_NOT_OF_CLIENT in response.content.decode()
    assert not ChatSession.objects.exists()


def test_a_members_only_client_cannot_be_posted(owner_client, colleague, use_simulator):
    private = ClientFactory(name="Initech", slug="initech")
    private.members.add(colleague)
    response = owner_client.post("/sessions/new/", {"client": "initech", "model": "ollama:llama3.2:latest"})
    assert response.status_code == 400
    assert not ChatSession.objects.exists()


# --- Chat page ---------------------------------------------------------------------------------


def test_chat_page_wears_the_sessions_brand_and_carries_its_config(owner_client, acme_session):
    response = owner_client.get(f"/sessions/{acme_session.pk}/")
    html = response.content.decode()
    assert response.status_code == 200
    assert "--brand-primary: #0b7285;" in html
    config = config_of(response)
    assert config["ws_path"] == f"/ws/sessions/{acme_session.pk}/"
    assert config["session"]["client"] == "acme"
    assert config["brand"]["name"] == "Acme"
    assert config["can_chat"] is True
    assert config["client_names"]["acme"] == "Acme Corp"
    assert 'role="log" aria-live="polite"' in html
    assert "/static/js/chat.js" in html


def test_chat_page_escapes_untrusted_text(owner_client, owner, client_acme):
    BrandFactory(client=client_acme, name='<img src=x onerror="alert(1)">', is_default=False)
    brand = client_acme.brands.get(is_default=False)
    session = SessionFactory(user=owner, domain=client_acme, brand=brand, name="<b>bold</b>")
    MessageFactory(session=session, seq=1, role="assistant", content="<script>alert('x')</script>")
    html = owner_client.get(f"/sessions/{session.pk}/").content.decode()
    assert "<script>alert(" not in html
    assert "&lt;script&gt;alert(" in html
    assert '<img src=x onerror="alert(1)">' not in html
    assert "<b>bold</b>" not in html


def test_another_consultants_chat_page_is_not_found(client, outsider, acme_session):
    client.force_login(outsider)
    assert client.get(f"/sessions/{acme_session.pk}/").status_code == 404
    assert client.get(f"/sessions/{acme_session.pk}/summary/").status_code == 404
    assert client.get(f"/sessions/{acme_session.pk}/messages.json").status_code == 404


def test_an_ended_session_shows_its_history_without_a_composer(owner_client, owner, acme_session):
    services.session_end(session_id=acme_session.pk, user=owner)
    html = owner_client.get(f"/sessions/{acme_session.pk}/").content.decode()
    assert "data-composer" not in html
    assert "This session has ended." in html


# --- Summary -----------------------------------------------------------------------------------


def test_summary_shows_time_and_cost_per_client_and_the_integrity_badge(
    owner_client, owner, acme_session, client_globex
):
    services.session_switch(session_id=acme_session.pk, user=owner, client="globex")
    services.session_end(session_id=acme_session.pk, user=owner)
    response = owner_client.get(f"/sessions/{acme_session.pk}/summary/")
    html = response.content.decode()
    assert response.status_code == 200
    assert '<tr data-client="acme">' in html
    assert '<tr data-client="globex">' in html
    assert "Integrity verified" in html
    # The JSON export is the transcript under a meaningful name now, not the bare summary.json (issue 15).
    assert f'href="/api/ollama/session/{acme_session.pk}/transcript"' in html
    assert "Context carried at switches" in html
    assert "Client switch" in html
    assert "--brand-primary: #c92a2a;" in html  # the session now wears Globex's brand


# --- JSON for the chat page --------------------------------------------------------------------


def test_messages_json_returns_the_stored_history(owner_client, owner, acme_session, chat):
    chat(acme_session, owner, "hello there")
    data = owner_client.get(f"/sessions/{acme_session.pk}/messages.json").json()
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]
    assert data["messages"][0]["content"] == "hello there"
    assert data["session"]["total_messages"] == 2
    assert data["streaming"] is False
    assert data["context_streams"] == []


def test_messages_json_answers_401_json_without_a_sign_in(client, acme_session):
    response = client.get(f"/sessions/{acme_session.pk}/messages.json")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"


def test_models_json_lists_the_routers_live_models(owner_client, use_simulator):
    data = owner_client.get("/sessions/models.json").json()
    names = [m["name"] for m in data["models"]]
    assert "ollama:llama3.2:latest" in names
    assert data["error"] == ""


def test_the_model_list_is_cached_per_provider_configuration(settings):
    """Two deployments sharing one Redis (the browser tests' servers do) never read each other's list."""
    from sessions_app.forms import models_cache_key

    settings.OPENAI_API_KEY = "sk-one"
    keyed = models_cache_key()
    assert models_cache_key() == keyed
    settings.OPENAI_API_KEY = ""
    assert models_cache_key() != keyed
    settings.OPENAI_API_KEY = "sk-two"  # another key, same providers: the same list
    assert models_cache_key() == keyed
