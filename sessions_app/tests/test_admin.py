"""The work-session admin: staff only, bounded changelists, read-only billed numbers, tokens."""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse
from django.utils import timezone

from sessions_app.models import ApiToken, ChatSession, ContextStream, SessionMessage, SessionSegment
from tests.factories import ClientFactory, MessageFactory, SegmentFactory, SessionFactory, UserFactory
from tests.querycount import assert_bounded_queries

pytestmark = pytest.mark.django_db

MODELS = ["chatsession", "sessionmessage", "sessionsegment", "contextstream", "apitoken"]


def changelist(model: str) -> str:
    return reverse(f"admin:sessions_app_{model}_changelist")


def ended_session(**kwargs) -> ChatSession:
    start = timezone.now() - timedelta(hours=2)
    session = SessionFactory(
        started_at=start,
        ended_at=start + timedelta(minutes=30),
        duration_seconds=1800,
        status="ended",
        total_messages=2,
        total_tokens=30,
        estimated_cost_usd=Decimal("0.000150"),
        **kwargs,
    )
    SegmentFactory(session=session, started_at=start, ended_at=session.ended_at)
    MessageFactory(session=session, seq=1, role="user", content="Draft the quarterly forecast", timestamp=start)
    MessageFactory(
        session=session,
        seq=2,
        role="assistant",
        content="Here is the forecast",
        provider="openai",
        model="openai:gpt-4o",
        tokens=30,
        cost_usd=Decimal("0.000150"),
        timestamp=start + timedelta(minutes=1),
    )
    ContextStream.objects.create(
        session=session,
        source_model="ollama:llama3.2",
        target_model="openai:gpt-4o",
        source_domain=session.domain,
        target_domain=session.domain,
        reason="model_upgrade",
        message_count=1,
        context_snapshot=[{"role": "user", "content": "Draft the quarterly forecast"}],
    )
    return session


def add_sessions(n: int) -> None:
    for i in range(n):
        if i % 2:
            ended_session()
        else:
            session = SessionFactory()
            SegmentFactory(session=session)
            MessageFactory(session=session, seq=1)


def add_tokens(n: int) -> None:
    for _ in range(n):
        ApiToken.issue(user=UserFactory(), client=ClientFactory())


MAKERS = {
    "chatsession": add_sessions,
    "sessionmessage": add_sessions,
    "sessionsegment": add_sessions,
    "contextstream": add_sessions,
    "apitoken": add_tokens,
}


@pytest.mark.parametrize("model", MODELS)
def test_session_changelists_make_the_same_queries_for_2_and_22_rows(
    staff_client, model, django_assert_max_num_queries
):
    assert_bounded_queries(staff_client, changelist(model), MAKERS[model], django_assert_max_num_queries, bound=12)


@pytest.mark.parametrize("model", MODELS)
def test_consultants_cannot_open_the_session_admin(owner_client, model):
    response = owner_client.get(changelist(model))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_session_changelist_shows_the_columns_staff_need(staff_client):
    session = ended_session(name="Forecast review")
    response = staff_client.get(changelist("chatsession"))
    body = response.content.decode()
    for text in ["Forecast review", session.user.username, session.domain.name, "0:30:00", "0.000150", "Ended"]:
        assert text in body
    headers = [str(h["text"]).capitalize() for h in response.context["result_headers"]]
    for header in ["Consultant", "Client", "Model", "Started", "Duration", "Messages", "Cost (usd)", "Status"]:
        assert header in headers
    assert "ollama:llama3.2" in body


def test_session_change_page_shows_messages_segments_and_streams_read_only(staff_client):
    session = ended_session(name="<script>alert(1)</script>")
    response = staff_client.get(reverse("admin:sessions_app_chatsession_change", args=[session.pk]))
    body = response.content.decode()
    assert response.status_code == 200
    assert "Draft the quarterly forecast" in body
    assert "model_upgrade" in body or "Upgrade to a paid model" in body
    assert "<script>alert(1)</script>" not in body
    form = response.context["adminform"].form
    assert "estimated_cost_usd" not in form.fields
    assert "total_tokens" not in form.fields
    assert set(form.fields) <= {"name", "system_prompt"}


def test_staff_cannot_add_a_session_by_hand(staff_client):
    assert staff_client.get(reverse("admin:sessions_app_chatsession_add")).status_code == 403


def test_session_search_reaches_message_text_without_duplicates(staff_client):
    wanted = ended_session(name="Wanted")
    ended_session(name="Other").messages.update(content="nothing to see")
    response = staff_client.get(changelist("chatsession") + "?q=quarterly")
    assert list(response.context["cl"].result_list) == [wanted]
    response = staff_client.get(changelist("chatsession") + "?q=forecast")
    assert list(response.context["cl"].result_list) == [wanted]


def test_session_filters_by_provider_of_its_messages_and_by_billed_client(staff_client):
    paid = ended_session(name="Paid")
    free = SessionFactory(name="Free")
    MessageFactory(session=free, seq=1, provider="ollama")
    response = staff_client.get(changelist("chatsession") + "?provider=openai")
    assert list(response.context["cl"].result_list) == [paid]

    other_client = ClientFactory(name="Switched to")
    SegmentFactory(session=free, domain=other_client)
    response = staff_client.get(changelist("chatsession") + f"?client={other_client.pk}")
    assert list(response.context["cl"].result_list) == [free]


@pytest.mark.parametrize("model", ["sessionmessage", "sessionsegment", "contextstream"])
def test_session_parts_are_viewable_but_not_editable(staff_client, model):
    ended_session()
    obj = {"sessionmessage": SessionMessage, "sessionsegment": SessionSegment, "contextstream": ContextStream}[
        model
    ].objects.first()
    response = staff_client.get(reverse(f"admin:sessions_app_{model}_change", args=[obj.pk]))
    assert response.status_code == 200
    assert not response.context["adminform"].form.fields
    assert staff_client.get(reverse(f"admin:sessions_app_{model}_add")).status_code == 403


def test_creating_a_token_in_the_admin_shows_the_raw_token_once(staff_client, owner, client_acme):
    response = staff_client.post(
        reverse("admin:sessions_app_apitoken_add"),
        {"user": str(owner.pk), "client": str(client_acme.pk), "name": "laptop"},
    )
    assert response.status_code == 302
    shown = " ".join(str(m) for m in get_messages(response.wsgi_request))
    raw = re.search(r"(bws_[A-Za-z0-9_-]{20,})", shown).group(1)

    token = ApiToken.objects.get()
    assert token.token_hash == ApiToken.hash_token(raw)
    assert raw not in (token.token_hash, token.hint, token.name)
    assert ApiToken.authenticate(raw) == token

    # The page the add redirects to shows it (once); no page shows it after that.
    assert raw in staff_client.get(response["Location"]).content.decode()
    for url in (changelist("apitoken"), reverse("admin:sessions_app_apitoken_change", args=[token.pk])):
        body = staff_client.get(url).content.decode()
        assert raw not in body
        assert token.token_hash not in body
        assert token.hint in body


def test_revoke_action_stops_a_token_working(staff_client, owner):
    token, raw = ApiToken.issue(user=owner)
    staff_client.post(changelist("apitoken"), {"action": "revoke", "_selected_action": [str(token.pk)]})
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert ApiToken.authenticate(raw) is None


def test_user_changelist_is_bounded_too(staff_client, django_assert_max_num_queries):
    def add_users(n: int) -> None:
        for _ in range(n):
            UserFactory()

    assert_bounded_queries(
        staff_client, reverse("admin:auth_user_changelist"), add_users, django_assert_max_num_queries, bound=12
    )


def test_tokens_filter_by_live_or_revoked(staff_client):
    ApiToken.issue(user=UserFactory(), client=ClientFactory(), name="still in use")
    revoked, _ = ApiToken.issue(user=UserFactory(), client=ClientFactory(), name="left the team")
    ApiToken.objects.filter(pk=revoked.pk).update(revoked_at=timezone.now())
    url = reverse("admin:sessions_app_apitoken_changelist")
    shown = {state: staff_client.get(f"{url}?state={state}").content.decode() for state in ("live", "revoked")}
    assert "still in use" in shown["live"] and "left the team" not in shown["live"]
    assert "left the team" in shown["revoked"] and "still in use" not in shown["revoked"]
