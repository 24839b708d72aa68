"""`seed_demo` and `create_api_token`: idempotent demo data, tokens printed once and stored hashed."""

from __future__ import annotations

import io
import re

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command, get_commands
from django.utils import timezone

from billing.branding import brand_for_host
from billing.models import Brand, ClientDomain, LLMUsage, ModelPrice
from sessions_app import integrity
from sessions_app.demo import DEMO_SESSIONS
from sessions_app.invariants import check_session
from sessions_app.management.commands.create_api_token import NOT_A_MEMBER, UNKNOWN_CLIENT, UNKNOWN_USER
from sessions_app.management.commands.seed_demo import DEMO_CLIENTS, REFUSE_IN_PRODUCTION
from sessions_app.models import ApiToken, ChatSession, SessionMessage

pytestmark = pytest.mark.django_db

LOGIN_LINE = re.compile(r"^login: (\S+) / (\S+)$", re.MULTILINE)


def run(*args, **kwargs) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO(), **kwargs)
    return out.getvalue()


def counts() -> dict:
    return {
        "clients": ClientDomain.objects.count(),
        "brands": Brand.objects.count(),
        "users": get_user_model().objects.count(),
        "prices": ModelPrice.objects.count(),
        "sessions": ChatSession.objects.count(),
        "messages": SessionMessage.objects.count(),
        "usage": LLMUsage.objects.count(),
    }


def test_seed_demo_is_idempotent_and_prints_working_logins(settings, client):
    settings.DEBUG = True
    first_output = run("seed_demo")
    first = counts()
    second_output = run("seed_demo")
    assert counts() == first
    assert first["clients"] == 12 and first["brands"] == 12 and first["users"] == 2

    logins = LOGIN_LINE.findall(second_output)
    assert LOGIN_LINE.findall(first_output) == logins
    assert len(logins) == 2
    for username, password in logins:
        assert client.login(username=username, password=password)
    assert get_user_model().objects.get(username="staff").is_staff
    assert not get_user_model().objects.get(username="consultant").is_staff


def test_seed_demo_clients_have_distinct_valid_brands_and_hostnames(settings):
    settings.DEBUG = True
    run("seed_demo", "--no-prices")
    clients = list(ClientDomain.objects.prefetch_related("brands"))
    assert len({c.slug for c in clients}) == 12
    assert {c.currency for c in clients} == {"USD"}
    assert {c.billing_increment_minutes for c in clients} == {6, 15}
    assert len({c.hourly_rate for c in clients}) > 6
    primaries = set()
    for c in clients:
        (brand,) = c.brands.all()
        brand.full_clean()
        assert brand.is_default
        primaries.add(brand.primary_color)
        assert c.hostname == f"{c.slug}.localhost"
        assert brand_for_host(c.hostname).primary_color == brand.primary_color.lower()
    assert len(primaries) == len(DEMO_CLIENTS)


def test_seed_demo_loads_prices_when_the_command_exists(settings):
    settings.DEBUG = True
    output = run("seed_demo")
    if "load_prices" in get_commands():
        assert ModelPrice.objects.filter(provider="openai").exists()
        assert ModelPrice.objects.filter(provider="anthropic").exists()
    else:
        assert "login:" in output


def test_seed_demo_sessions_satisfy_every_invariant_and_verify(settings, client):
    settings.DEBUG = True
    run("seed_demo")
    sessions = list(ChatSession.objects.filter(user__username="consultant"))
    expected = len(DEMO_SESSIONS) if "load_prices" in get_commands() else len(DEMO_SESSIONS) - 1
    assert len(sessions) == expected
    for session in sessions:
        assert session.status == "ended"
        assert check_session(session) == [], session.name
        valid, detail = integrity.verify_session(session)
        assert valid, detail
    assert {s.domain.slug for s in sessions} >= {"acme", "fabrikam"}

    client.login(username="consultant", password="demo-consultant-pass")
    body = client.get("/").content.decode()
    assert "Supplier risk memo, Q3" in body
    assert "0:38:00" in body


def test_seed_demo_refuses_to_publish_passwords_when_debug_is_off(settings):
    settings.DEBUG = False
    with pytest.raises(CommandError, match=re.escape(REFUSE_IN_PRODUCTION)):
        run("seed_demo")
    assert not ClientDomain.objects.exists()
    run("seed_demo", "--force", "--no-prices")
    assert ClientDomain.objects.count() == 12


def test_seed_demo_keeps_a_default_brand_chosen_by_staff(settings):
    settings.DEBUG = True
    run("seed_demo", "--no-prices")
    acme = ClientDomain.objects.get(slug="acme")
    acme.brands.update(is_default=False)
    chosen = Brand.objects.create(client=acme, name="Acme dark", primary_color="#000000", is_default=True)
    run("seed_demo", "--no-prices")
    assert list(acme.brands.filter(is_default=True)) == [chosen]


def test_create_api_token_prints_the_token_alone_on_the_last_line_and_stores_its_hash(owner, client_acme):
    output = run("create_api_token", owner.username, "--client", "acme", "--name", "laptop")
    raw = output.rstrip("\n").splitlines()[-1]
    assert re.fullmatch(r"bws_[A-Za-z0-9_-]{40,}", raw)

    token = ApiToken.objects.get()
    assert (token.user, token.client, token.name) == (owner, client_acme, "laptop")
    assert token.token_hash == ApiToken.hash_token(raw)
    stored = [str(v) for v in ApiToken.objects.values_list(named=True).get()]
    assert raw not in stored
    assert output.count(raw) == 1

    assert ApiToken.authenticate(raw) == token
    assert ApiToken.authenticate(raw + "x") is None


def test_a_revoked_or_deactivated_token_no_longer_authenticates(owner):
    raw = run("create_api_token", owner.username).rstrip("\n").splitlines()[-1]
    token = ApiToken.objects.get()
    assert ApiToken.authenticate(raw) == token
    owner.is_active = False
    owner.save()
    assert ApiToken.authenticate(raw) is None
    owner.is_active = True
    owner.save()
    ApiToken.objects.update(revoked_at=timezone.now())
    assert ApiToken.authenticate(raw) is None


def test_create_api_token_rejects_unknown_users_and_clients(owner):
    with pytest.raises(CommandError, match=re.escape(UNKNOWN_USER.format(username="ghost"))):
        run("create_api_token", "ghost")
    with pytest.raises(CommandError, match="No client with slug 'nope'"):
        run("create_api_token", owner.username, "--client", "nope")
    assert UNKNOWN_CLIENT.startswith("No client with slug")
    assert not ApiToken.objects.exists()


def test_create_api_token_respects_client_membership(owner, colleague, client_acme):
    client_acme.members.add(colleague)
    with pytest.raises(CommandError, match=re.escape(NOT_A_MEMBER.format(username=owner.username, slug="acme"))):
        run("create_api_token", owner.username, "--client", "acme")
    run("create_api_token", colleague.username, "--client", "acme")
    assert ApiToken.objects.get().user == colleague


def test_seed_demo_leaves_an_unchanged_demo_password_alone_so_nobody_is_signed_out(settings, client):
    settings.DEBUG = True
    run("seed_demo", "--no-prices")
    user = get_user_model().objects.get(username="consultant")
    client.force_login(user)
    assert client.get("/").status_code == 200
    run("seed_demo", "--no-prices")  # `make run` again
    assert get_user_model().objects.get(pk=user.pk).password == user.password
    assert client.get("/").status_code == 200  # still signed in, not sent to the sign-in page
