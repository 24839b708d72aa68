"""Full-text search: ranking, snippets, isolation between consultants, the API and the page."""

from __future__ import annotations

import pytest
from django.db import connection

from sessions_app.conversation import SEARCH_EMPTY, messages_search
from sessions_app.errors import BadInput
from sessions_app.models import ApiToken
from sessions_app.tests.schema_check import assert_matches
from tests.factories import MessageFactory, SessionFactory


@pytest.fixture
def library(owner, colleague, client_acme, client_globex):
    """Messages of two consultants; the owner's mention 'invoice' once, three times, or not at all."""
    mine = SessionFactory(user=owner, domain=client_acme, name="Billing questions")
    other = SessionFactory(user=owner, domain=client_globex, name="Globex chat")
    theirs = SessionFactory(user=colleague, domain=client_acme, name="Colin's notes")
    return {
        "once": MessageFactory(session=mine, seq=1, content="Please send the invoice by Friday."),
        "thrice": MessageFactory(
            session=mine,
            seq=2,
            role="assistant",
            content="The invoice lists hours; a second invoice lists LLM cost; the final invoice sums both.",
        ),
        "plural": MessageFactory(session=other, seq=1, content="Globex pays invoices within thirty days."),
        "unrelated": MessageFactory(session=other, seq=2, role="assistant", content="The weather is fine."),
        "theirs": MessageFactory(session=theirs, seq=1, content="My own invoice is private."),
    }


def test_results_are_ranked_by_how_well_they_match(library, owner):
    hits = messages_search(user=owner, query="invoice")
    ids = [hit.message_id for hit in hits]
    assert ids[0] == str(library["thrice"].message_id)
    assert set(ids) == {str(library[k].message_id) for k in ("once", "thrice", "plural")}
    assert hits[0].rank > hits[-1].rank


def test_a_consultant_only_finds_their_own_messages(library, owner, colleague):
    assert str(library["theirs"].message_id) not in {h.message_id for h in messages_search(user=owner, query="invoice")}
    [hit] = messages_search(user=colleague, query="invoice")
    assert hit.message_id == str(library["theirs"].message_id)


def test_staff_search_every_session(library, staff):
    assert len(messages_search(user=staff, query="invoice")) == 4


def test_a_client_filter_narrows_the_results(library, owner):
    hits = messages_search(user=owner, query="invoice", client="globex")
    assert [h.message_id for h in hits] == [str(library["plural"].message_id)]


def test_all_words_must_match(library, owner):
    hits = messages_search(user=owner, query="invoice Friday")
    assert [h.message_id for h in hits] == [str(library["once"].message_id)]


def test_the_snippet_marks_the_matches_and_escapes_everything_else(owner, client_acme):
    session = SessionFactory(user=owner, domain=client_acme)
    MessageFactory(session=session, seq=1, content="<script>alert(1)</script> about the invoice & <b>terms</b>")

    [hit] = messages_search(user=owner, query="invoice")

    html = str(hit.snippet_html())
    assert "<mark>invoice</mark>" in html
    assert "<script>" not in html and "<b>" not in html
    assert "&lt;script&gt;" in html and "&amp;" in html
    assert "invoice" in hit.snippet and "<mark>" not in hit.snippet
    assert hit.snippet_marked("[", "]").count("[invoice]") == 1


def test_a_long_message_gets_a_window_around_the_match(owner, client_acme):
    session = SessionFactory(user=owner, domain=client_acme)
    filler = " ".join(["ledger"] * 200)
    MessageFactory(session=session, seq=1, content=f"{filler} reconciliation {filler}")

    [hit] = messages_search(user=owner, query="reconciliation")

    assert "reconciliation" in hit.snippet
    assert len(hit.snippet) < 400


def test_an_empty_query_is_bad_input(owner):
    with pytest.raises(BadInput, match=SEARCH_EMPTY):
        messages_search(user=owner, query="   ")


def test_postgres_search_uses_the_english_configuration(library, owner):
    if connection.vendor != "postgresql":
        pytest.skip("stemming is PostgreSQL's full-text search")
    hits = messages_search(user=owner, query="invoicing")
    assert str(library["plural"].message_id) in {h.message_id for h in hits}


# --- the API and the page ---------------------------------------------------------------------


def test_the_search_api_answers_ranked_json(library, owner_client):
    response = owner_client.get("/api/ollama/search", {"q": "invoice", "limit": 2})
    assert response.status_code == 200
    body = response.json()
    assert body["query"] == "invoice" and body["count"] == 2
    first = body["results"][0]
    assert first["message_id"] == str(library["thrice"].message_id)
    assert first["client"] == "acme" and first["session_name"] == "Billing questions"
    assert "<mark>" in first["snippet_html"] and "<mark>" not in first["snippet"]
    assert_matches(body, "/search", "GET", 200)


def test_the_search_api_takes_a_bearer_token(library, client, colleague):
    _, raw = ApiToken.issue(user=colleague)
    response = client.get("/api/ollama/search?q=invoice", HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert response.status_code == 200
    assert [r["message_id"] for r in response.json()["results"]] == [str(library["theirs"].message_id)]


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [({"q": ""}, 400, "bad_request"), ({"q": "x", "limit": "many"}, 400, "bad_request")],
)
def test_the_search_api_explains_bad_input(owner_client, query, status, code):
    response = owner_client.get("/api/ollama/search", query)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert_matches(response.json(), "/search", "GET", status)


def test_the_search_api_needs_credentials(client, db):
    response = client.get("/api/ollama/search?q=invoice")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


def test_the_search_api_only_reads(owner_client):
    assert owner_client.post("/api/ollama/search?q=invoice").status_code == 405


def test_the_search_page_shows_ranked_escaped_results(library, owner_client, owner):
    MessageFactory(session=library["once"].session, seq=3, content="<img src=x onerror=alert(1)> invoice")

    response = owner_client.get("/search/", {"q": "invoice"})

    html = response.content.decode()
    assert response.status_code == 200
    assert html.count('class="search-hit"') == 4
    assert "<mark>invoice</mark>" in html
    assert "<img src=x" not in html and "&lt;img src=x" in html
    assert html.index("lists hours") < html.index("Please send")
    assert "My own invoice is private" not in html


def test_the_search_page_escapes_the_query(owner_client):
    html = owner_client.get("/search/", {"q": "<script>x</script>"}).content.decode()
    assert "<script>x</script>" not in html
    assert "No messages match" in html


def test_the_search_page_needs_a_sign_in(client, db):
    response = client.get("/search/?q=invoice")
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_postgres_search_uses_the_gin_index(library, owner):
    if connection.vendor != "postgresql":
        pytest.skip("the GIN index exists on PostgreSQL only")
    from django.contrib.postgres.search import SearchQuery
    from django.db.models import F

    from sessions_app.conversation import _EnglishVector
    from sessions_app.models import SessionMessage

    query = SessionMessage.objects.annotate(vector=_EnglishVector(F("content"))).filter(
        vector=SearchQuery("invoice", config="english", search_type="websearch")
    )
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        plan = query.explain()
    assert "ollama_session_messages_fts_idx" in plan


def test_a_search_result_links_to_the_message_on_the_chat_page(library, owner_client):
    message = library["thrice"]
    html = owner_client.get("/search/", {"q": "invoice"}).content.decode()
    assert f'href="/sessions/{message.session_id}/#message-2"' in html
    page = owner_client.get(f"/sessions/{message.session_id}/").content.decode()
    assert 'id="message-2"' in page
