"""The home page: the signed-in consultant's own sessions, branded, escaped."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.cache import cache
from django.test import Client
from django.utils import timezone

from tests.factories import BrandFactory, ClientFactory, SessionFactory
from tests.querycount import assert_bounded_queries

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def clean_cache():
    cache.clear()
    yield
    cache.clear()


def test_home_requires_sign_in(client):
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/?next=/"


def test_home_lists_only_the_consultants_own_sessions(owner_client, owner, colleague, client_acme):
    mine = SessionFactory(user=owner, domain=client_acme, name="Acme roadmap", estimated_cost_usd=Decimal("0.0125"))
    SessionFactory(user=colleague, domain=client_acme, name="Colleague secret plan")
    response = owner_client.get("/")
    body = response.content.decode()
    assert response.status_code == 200
    assert list(response.context["sessions"]) == [mine]
    assert "Acme roadmap" in body
    assert "Colleague secret plan" not in body
    assert "Acme Corp" in body
    assert "0.01 USD" in body  # a total, in cents with its currency (billing.money)
    assert 'href="/sessions/new/"' in body


def test_staff_home_also_lists_only_their_own_sessions(staff_client, staff, owner):
    SessionFactory(user=owner, name="Owner work")
    response = staff_client.get("/")
    assert list(response.context["sessions"]) == []
    assert "Owner work" not in response.content.decode()
    assert 'href="/admin/"' in response.content.decode()


def test_home_shows_duration_of_ended_and_running_sessions(owner_client, owner):
    start = timezone.now() - timedelta(hours=1)
    SessionFactory(
        user=owner, started_at=start, ended_at=start + timedelta(seconds=3723), duration_seconds=3723, status="ended"
    )
    SessionFactory(user=owner, started_at=timezone.now() - timedelta(minutes=5))
    body = owner_client.get("/").content.decode()
    assert "1:02:03" in body
    assert "so far" in body


def test_home_escapes_session_and_client_names(owner_client, owner):
    client = ClientFactory(name="<img src=x onerror=alert(1)>")
    SessionFactory(user=owner, domain=client, name="<script>alert('x')</script>")
    body = owner_client.get("/").content.decode()
    assert "<script>alert('x')</script>" not in body
    assert "&lt;script&gt;" in body
    assert "<img src=x" not in body


def test_empty_home_invites_a_first_session(owner_client):
    body = owner_client.get("/").content.decode()
    assert "No sessions yet" in body


def test_home_query_count_does_not_grow_with_sessions(owner_client, owner, django_assert_max_num_queries):
    def make(n):
        for _ in range(n):
            SessionFactory(user=owner, domain=ClientFactory())

    assert_bounded_queries(owner_client, "/", make, django_assert_max_num_queries, bound=6)


def test_every_page_carries_the_brand_as_css_custom_properties(client):
    body = client.get("/accounts/login/").content.decode()
    assert "--brand-primary: #1f6feb;" in body
    assert "--brand-font:" in body


def test_login_page_wears_the_brand_of_the_client_host(client):
    acme = ClientFactory(slug="acme", name="Acme Corp", hostname="acme.localhost")
    BrandFactory(client=acme, name="Acme Portal", primary_color="#0B7285", welcome_text="Welcome <b>team</b>")
    body = client.get("/accounts/login/", HTTP_HOST="acme.localhost").content.decode()
    assert "--brand-primary: #0b7285;" in body
    assert "Sign in to Acme Portal" in body
    assert "Welcome &lt;b&gt;team&lt;/b&gt;" in body


def test_simulator_banner_shows_on_every_page_when_the_simulator_is_in_use(settings, client, owner_client):
    settings.PROVIDER_SIMULATOR = True
    assert "simulator" in client.get("/accounts/login/").content.decode().lower()
    assert "simulator" in owner_client.get("/").content.decode().lower()
    settings.PROVIDER_SIMULATOR = False
    assert "simulator" not in client.get("/accounts/login/").content.decode().lower()


def test_sign_in_and_sign_out(client, owner):
    response = client.post("/accounts/login/", {"username": owner.username, "password": "pw-for-tests-1"})
    assert response.status_code == 302
    assert response["Location"] == "/"
    body = client.get("/").content.decode()
    assert 'action="/accounts/logout/"' in body
    assert 'method="post"' in body

    response = client.post("/accounts/logout/", follow=True)
    assert response.redirect_chain[-1][0] == "/accounts/login/"
    assert "You are signed out." in response.content.decode()
    assert client.get("/").status_code == 302


def test_wrong_password_shows_a_form_error(client, owner):
    response = client.post("/accounts/login/", {"username": owner.username, "password": "nope"})
    assert response.status_code == 200
    assert "form-error" in response.content.decode()


def test_unknown_pages_get_a_branded_404(owner_client):
    response = owner_client.get("/no-such-page/")
    assert response.status_code == 404
    body = response.content.decode()
    assert "Page not found" in body
    assert "--brand-primary:" in body


def test_an_expired_form_explains_itself(owner):
    browser = Client(enforce_csrf_checks=True)
    response = browser.post("/accounts/login/", {"username": owner.username, "password": "pw-for-tests-1"})
    assert response.status_code == 403
    assert "That form has expired" in response.content.decode()
