"""The SessionManager facade, short ids, and stats (CLI shape, API)."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from sessions_app.conversation import session_resolve, sessions_stats
from sessions_app.errors import BadInput, NotFound, ProviderFailed
from sessions_app.invariants import check_session
from sessions_app.models import ApiToken, ChatSession
from sessions_app.tests.schema_check import assert_matches
from sessions_app.toolkit import NO_SESSION, SessionManager
from tests.factories import MessageFactory, SessionFactory


@pytest.fixture
def manager(owner, client_acme, use_simulator):
    return SessionManager("olivia", client="acme", model="ollama:llama3.2")


def test_chat_starts_a_session_streams_tokens_and_returns_the_stored_answer(manager, owner):
    tokens: list[str] = []

    answer = manager.chat("What is double entry?", on_token=tokens.append)

    assert len(tokens) > 1
    assert answer.content == "".join(tokens)
    assert answer.role == "assistant" and answer.status == "complete"
    session = ChatSession.objects.get(pk=manager.session.pk)
    assert session.user == owner and session.source == "cli"
    assert manager.session.total_messages == 2
    assert check_session(session) == []


# The call runs on a worker thread with its own connection, which must see committed data.
@pytest.mark.django_db(transaction=True)
def test_chat_works_under_a_running_event_loop_like_a_notebook(manager):
    async def notebook_cell():
        return manager.chat("Hello from Jupyter")

    answer = asyncio.run(notebook_cell())
    assert answer.content.startswith("Simulated answer")


def test_history_branch_search_export_import_and_stats(manager, owner):
    manager.create_session(name="Audit prep", system_prompt="Be precise.")
    manager.chat("List the audit steps.")
    manager.chat("Which step is first?")
    original = manager.session

    history = manager.history()
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[0]["content"] == "List the audit steps."

    branch = manager.branch(original, at=2, name="Other path")
    assert branch.parent_id == original.pk and branch.total_messages == 2
    assert manager.session == branch
    assert branch.total_tokens == 0 and branch.estimated_cost_usd == Decimal(0)

    hits = manager.search("audit")
    assert {h.session_id for h in hits} == {str(original.pk), str(branch.pk)}

    manager.end(original)
    document = manager.export(original)
    assert document["session"]["name"] == "Audit prep"
    result = manager.import_(document)
    assert result.valid and manager.session == result.session

    stats = manager.stats()
    assert stats["sessions"] == 3
    assert stats["by_client"][0]["client"] == "acme"


def test_export_and_import_through_a_file(manager, tmp_path):
    manager.chat("Save me")
    path = tmp_path / "out.json"
    manager.export(path=path)
    result = manager.import_(str(path))
    assert result.session.total_messages == 2


def test_a_manager_without_a_session_says_what_to_do(manager):
    with pytest.raises(BadInput, match=re.escape(NO_SESSION)):
        manager.history()


def test_a_manager_needs_a_client_and_model_to_start(owner, client_acme):
    with pytest.raises(BadInput, match="Name the client"):
        SessionManager(owner).create_session()


def test_an_unknown_user_is_not_found(db):
    with pytest.raises(NotFound):
        SessionManager("nobody")


def test_a_manager_cannot_reach_another_consultants_session(manager, colleague):
    manager.chat("Mine")
    other = SessionManager(colleague, client="acme", model="ollama:llama3.2")
    with pytest.raises(NotFound):
        other.history(manager.session.pk)
    with pytest.raises(NotFound):
        other.use(str(manager.session.pk)[:8])


def test_a_provider_failure_raises_after_storing_the_turn(owner, client_acme, use_simulator):
    manager = SessionManager(owner, client="acme", model="ollama:x-fault-midstream")
    with pytest.raises(ProviderFailed):
        manager.chat("Break")
    session = ChatSession.objects.get(user=owner)
    assert [m.status for m in session.messages.order_by("seq")] == ["complete", "partial"]


# --- short ids ------------------------------------------------------------------------------


def test_a_prefix_with_or_without_dashes_finds_the_session(owner):
    session = SessionFactory(user=owner)
    text = str(session.pk)
    for ident in (text, text[:8], text[:13], text.replace("-", "")[:12], text.upper()[:10]):
        assert session_resolve(ident=ident, user=owner) == session


def test_an_ambiguous_prefix_is_refused(owner):
    SessionFactory(user=owner, session_id=uuid.UUID("12345678-aaaa-4aaa-8aaa-aaaaaaaaaaaa"))
    SessionFactory(user=owner, session_id=uuid.UUID("12345678-bbbb-4bbb-8bbb-bbbbbbbbbbbb"))
    with pytest.raises(BadInput, match="matches 2 sessions"):
        session_resolve(ident="12345678", user=owner)
    assert session_resolve(ident="12345678-b", user=owner).session_id.hex.startswith("12345678bbbb")


# --- stats ----------------------------------------------------------------------------------


@pytest.fixture
def history(owner, colleague, client_acme, client_globex):
    now = timezone.now()
    oldest = SessionFactory(user=owner, domain=client_acme, started_at=now - timedelta(days=30), name="First")
    busiest = SessionFactory(
        user=owner, domain=client_globex, started_at=now - timedelta(days=2), total_messages=6, total_tokens=900
    )
    SessionFactory(user=owner, domain=client_acme, started_at=now - timedelta(days=1), total_messages=1)
    SessionFactory(user=colleague, domain=client_acme, total_messages=50)
    for seq in range(1, 7):
        MessageFactory(session=busiest, seq=seq)
    return oldest, busiest


def test_stats_count_sessions_messages_averages_oldest_busiest_and_clients(history, owner):
    oldest, busiest = history
    stats = sessions_stats(user=owner)
    assert stats["sessions"] == 3 and stats["messages"] == 7
    assert stats["average_messages_per_session"] == pytest.approx(7 / 3, abs=0.01)
    assert stats["oldest_session"]["session_id"] == str(oldest.pk)
    assert stats["most_active_session"]["session_id"] == str(busiest.pk)
    rows = {row["client"]: row for row in stats["by_client"]}
    assert rows["acme"]["sessions"] == 2 and rows["acme"]["messages"] == 1
    assert rows["globex"]["tokens"] == 900 and rows["globex"]["cost_usd"] == "0.000000"


def test_staff_stats_cover_everyone(history, staff):
    assert sessions_stats(user=staff)["sessions"] == 4


def test_the_stats_api_answers_json_for_the_caller(history, owner_client):
    response = owner_client.get("/api/ollama/stats")
    assert response.status_code == 200
    body = response.json()
    assert body["sessions"] == 3 and body["messages"] == 7
    assert_matches(body, "/stats", "GET", 200)
    assert {row["client"] for row in body["by_client"]} == {"acme", "globex"}


def test_the_stats_api_filters_by_client_and_takes_a_bearer_token(history, client, owner):
    _, raw = ApiToken.issue(user=owner)
    response = client.get("/api/ollama/stats?client=globex", HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert response.status_code == 200
    assert response.json()["sessions"] == 1


def test_the_stats_api_needs_credentials_and_a_known_client(history, owner_client):
    from django.test import Client

    assert Client().get("/api/ollama/stats").status_code == 401
    response = owner_client.get("/api/ollama/stats?client=initech")
    assert response.status_code == 404
    assert_matches(response.json(), "/stats", "GET", 404)
    assert response.json()["error"]["code"] == "not_found"


# --- branches in the admin and on the summary page ---------------------------------------------


@pytest.fixture
def family(owner, client_acme):
    parent = SessionFactory(user=owner, domain=client_acme, name="Original plan")
    MessageFactory(session=parent, seq=1, content="Plan A")
    MessageFactory(session=parent, seq=2, role="assistant", content="Fine")
    from sessions_app import services

    branch = services.session_branch(session_id=parent.pk, user=owner, at_seq=1, name="Plan B")
    return parent, branch


def test_the_admin_links_a_branch_to_its_parent_and_lists_branches(family, staff_client):
    from django.urls import reverse

    parent, branch = family
    changelist = staff_client.get(reverse("admin:sessions_app_chatsession_changelist") + "?lineage=branch")
    html = changelist.content.decode()
    assert changelist.status_code == 200
    assert "Plan B" in html and reverse("admin:sessions_app_chatsession_change", args=[parent.pk]) in html
    assert "Original plan</a> at #1" in html

    detail = staff_client.get(reverse("admin:sessions_app_chatsession_change", args=[parent.pk])).content.decode()
    assert reverse("admin:sessions_app_chatsession_change", args=[branch.pk]) in detail
    assert "(from message #1)" in detail

    originals = staff_client.get(reverse("admin:sessions_app_chatsession_changelist") + "?lineage=branched")
    assert "Original plan" in originals.content.decode() and "Plan B" not in originals.content.decode()


def test_the_summary_page_shows_parent_and_branches(family, owner_client):
    parent, branch = family
    branch_page = owner_client.get(f"/sessions/{branch.pk}/summary/").content.decode()
    assert f'href="/sessions/{parent.pk}/summary/"' in branch_page and "at message #1" in branch_page
    parent_page = owner_client.get(f"/sessions/{parent.pk}/summary/").content.decode()
    assert f'href="/sessions/{branch.pk}/summary/"' in parent_page and "Plan B" in parent_page


def test_stats_of_a_consultant_without_sessions_match_the_schema(owner, owner_client):
    body = owner_client.get("/api/ollama/stats").json()
    assert body["sessions"] == 0 and body["oldest_session"] is None and body["by_client"] == []
    assert_matches(body, "/stats", "GET", 200)
