"""The pages of the conversation tools: the new-session form (hostname, templates, model picker),
continue, rename, hide, share, and what shared sessions look like to each consultant.
"""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from django.core.cache import cache

from billing.models import SessionTemplate
from sessions_app import services
from sessions_app.conversation_views import HIDDEN, INVITED, RENAMED
from sessions_app.forms import TEMPLATE_NOT_OF_CLIENT
from sessions_app.model_picker import model_options, per_million
from sessions_app.models import ChatSession, SessionInvitation
from tests.factories import ClientFactory

pytestmark = pytest.mark.usefixtures("sound_sessions")


@pytest.fixture(autouse=True)
def _fresh_model_list():
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def northwind(db):
    return ClientFactory(name="Northwind", slug="northwind", hostname="northwind.localhost")


def option_groups(html: str) -> dict[str, list[tuple[str, str]]]:
    select = html[html.index('<select name="model"') : html.index("</select>", html.index('<select name="model"'))]
    groups = {}
    for label, body in re.findall(r'<optgroup label="([^"]+)">(.*?)</optgroup>', select, re.S):
        groups[label] = re.findall(r'<option value="([^"]+)"[^>]*>([^<]+)</option>', body)
    return groups


# --- the new-session form -------------------------------------------------------------------


def test_the_form_preselects_the_client_of_the_hostname(owner_client, client_acme, northwind, use_simulator):
    html = owner_client.get("/sessions/new/", HTTP_HOST="northwind.localhost").content.decode()
    assert '<option value="northwind" selected>Northwind</option>' in html
    html = owner_client.get("/sessions/new/", HTTP_HOST="localhost").content.decode()
    assert '<option value="northwind" selected>' not in html
    # An explicit ?client= wins over the hostname.
    html = owner_client.get("/sessions/new/?client=acme", HTTP_HOST="northwind.localhost").content.decode()
    assert '<option value="acme" selected>Acme Corp</option>' in html


def test_a_members_only_hostname_preselects_nothing_for_others(owner_client, colleague, northwind, use_simulator):
    northwind.members.add(colleague)
    html = owner_client.get("/sessions/new/", HTTP_HOST="northwind.localhost").content.decode()
    assert "northwind" not in html.split('<select name="client"')[1].split("</select>")[0]


def test_the_model_picker_groups_by_provider_folds_aliases_and_shows_prices(owner_client, client_acme, use_simulator):
    html = owner_client.get("/sessions/new/").content.decode()
    groups = option_groups(html)
    assert list(groups) == ["Ollama", "OpenAI", "Anthropic"]
    anthropic = dict(groups["Anthropic"])
    # Eight aliases and four ids are four options, each under its shortest (friendly) name.
    assert set(anthropic) == {
        "anthropic:claude-opus-4",
        "anthropic:claude-sonnet-4",
        "anthropic:claude-3-5-haiku-latest",
        "anthropic:claude-3-5-sonnet-latest",
    }
    assert anthropic["anthropic:claude-sonnet-4"] == "claude-sonnet-4 · 3.00 USD in / 15.00 USD out per 1M tokens"
    assert dict(groups["OpenAI"])["openai:gpt-4o-mini"] == "gpt-4o-mini · 0.15 USD in / 0.60 USD out per 1M tokens"
    assert all(label.endswith("free, runs locally") for _, label in groups["Ollama"])
    assert "Openai" not in html
    # CHAT_MODEL (ollama:llama3.2, which Ollama reads as llama3.2:latest) is preselected.
    assert '<option value="ollama:llama3.2:latest" selected>' in html


def test_the_default_model_follows_chat_model(owner_client, client_acme, use_simulator, settings):
    settings.CHAT_MODEL = "anthropic:claude-4-sonnet-20250514"  # an alias: its folded option is picked
    html = owner_client.get("/sessions/new/").content.decode()
    assert '<option value="anthropic:claude-sonnet-4" selected>' in html


def test_prices_keep_every_significant_digit():
    assert per_million(Decimal("3.000000")) == "3.00 USD"
    assert per_million(Decimal("0.075000")) == "0.075 USD"
    assert per_million(Decimal("1250")) == "1,250.00 USD"


def test_picking_a_folded_alias_is_the_same_model(use_simulator):
    from asgiref.sync import async_to_sync

    from providers import router

    options = model_options(async_to_sync(router.available_models)())
    sonnet = next(o for o in options if o.name == "anthropic:claude-sonnet-4")
    assert sonnet.target == "claude-sonnet-4-20250514"
    assert set(sonnet.also) == {
        "anthropic:claude-sonnet-4-0",
        "anthropic:claude-4-sonnet-20250514",
        "anthropic:claude-sonnet-4-20250514",
    }


def test_a_template_fills_the_session_and_offers_its_first_message(owner_client, owner, client_acme, use_simulator):
    template = SessionTemplate.objects.create(
        client=client_acme,
        name="Contract review",
        system_prompt="You review contracts for Acme.",
        default_model="ollama:mistral",
        first_message="Here is the contract: ",
    )
    SessionTemplate.objects.create(client=ClientFactory(slug="other"), name="Not mine")
    html = owner_client.get("/sessions/new/").content.decode()
    assert f'<option value="{template.pk}">Contract review</option>' in html
    assert '"system_prompt": "You review contracts for Acme."' in html
    assert '"model": "ollama:mistral:latest"' in html  # the picker's option for it
    assert "<script>" not in html.replace('<script id="session-templates" type="application/json">', "")

    response = owner_client.post(
        "/sessions/new/", {"template": str(template.pk), "client": "acme", "model": "ollama:mistral:latest"}
    )
    session = ChatSession.objects.get(user=owner)
    assert response.status_code == 302
    assert (session.name, session.system_prompt, session.template) == (
        "Contract review",
        "You review contracts for Acme.",
        template,
    )
    chat = owner_client.get(f"/sessions/{session.pk}/").content.decode()
    assert "Here is the contract: </textarea>" in chat


def test_a_template_of_another_client_is_refused(owner_client, client_acme, client_globex, use_simulator):
    template = SessionTemplate.objects.create(client=client_globex, name="Globex only")
    response = owner_client.post(
        "/sessions/new/", {"template": str(template.pk), "client": "acme", "model": "ollama:mistral:latest"}
    )
    assert response.status_code == 400
    assert TEMPLATE_NOT_OF_CLIENT.format(client="Globex") in response.content.decode()


# --- continue, rename, hide -----------------------------------------------------------------


@pytest.fixture
def ended(owner, client_acme, use_simulator, chat):
    session = services.session_start(user=owner, client=client_acme, model="ollama:llama3.2", name="Audit")
    chat(session, owner, "Remember: Bluebird.")
    services.session_end(session_id=session.pk, user=owner)
    return ChatSession.objects.get(pk=session.pk)


def test_an_ended_session_continues_from_its_summary_on_the_old_client(owner_client, owner, ended, client_globex):
    html = owner_client.get(f"/sessions/{ended.pk}/summary/").content.decode()
    assert '<option value="acme" selected>Acme Corp</option>' in html
    assert f'action="/sessions/{ended.pk}/continue/"' in html

    response = owner_client.post(f"/sessions/{ended.pk}/continue/", {"client": "acme"})
    new = ChatSession.objects.get(continued_from=ended)
    assert response.status_code == 302 and response["Location"] == f"/sessions/{new.pk}/"
    assert (new.domain.slug, new.current_model, new.total_messages) == ("acme", "ollama:llama3.2", 2)

    # The full form: another client and model; the old client starts selected.
    page = owner_client.get(f"/sessions/{ended.pk}/continue/").content.decode()
    assert '<option value="acme" selected>Acme Corp</option>' in page
    assert '<option value="ollama:llama3.2:latest" selected>' in page
    owner_client.post(
        f"/sessions/{ended.pk}/continue/", {"client": "globex", "model": "ollama:mistral:latest", "name": "Part 2"}
    )
    part2 = ChatSession.objects.get(name="Part 2")
    assert (part2.domain.slug, part2.current_model, part2.continued_from_id) == (
        "globex",
        "ollama:mistral:latest",
        ended.pk,
    )

    summary = owner_client.get(f"/sessions/{ended.pk}/summary/").content.decode()
    assert "Continued in:" in summary and str(part2.pk) in summary


def test_the_session_list_offers_continue_on_ended_sessions(owner_client, ended):
    html = owner_client.get("/sessions/").content.decode()
    assert f'href="/sessions/{ended.pk}/continue/" data-continue-link' in html


def test_rename_and_hide_from_the_summary_page(owner_client, owner, ended):
    response = owner_client.post(f"/sessions/{ended.pk}/rename/", {"name": "Audit 2024"}, follow=True)
    assert RENAMED.format(name="Audit 2024") in response.content.decode()
    assert ChatSession.objects.get(pk=ended.pk).name == "Audit 2024"

    response = owner_client.post(f"/sessions/{ended.pk}/hide/", {"hidden": "1", "next": "/"}, follow=True)
    html = response.content.decode()
    assert HIDDEN.format(name="Audit 2024") in html
    assert f'href="/sessions/{ended.pk}/summary/"' not in html  # home leaves it out
    listing = owner_client.get("/sessions/").content.decode()
    assert "Show hidden (1)" in listing and "Audit 2024" not in listing
    hidden = owner_client.get("/sessions/?hidden=only").content.decode()
    assert "Audit 2024" in hidden and "data-unhide" in hidden
    owner_client.post(f"/sessions/{ended.pk}/hide/", {"hidden": "0"})
    assert "Audit 2024" in owner_client.get("/").content.decode()
    assert ChatSession.objects.get(pk=ended.pk).total_messages == 2  # nothing billed was touched


# --- shared sessions ------------------------------------------------------------------------


def test_the_owner_shares_and_the_colleague_sees_who_typed_what(
    client, owner, colleague, outsider, client_acme, use_simulator, chat
):
    session = services.session_start(user=owner, client=client_acme, model="ollama:llama3.2", name="Pairing")
    client.force_login(owner)
    page = client.get(f"/sessions/{session.pk}/share/").content.decode()
    assert '<option value="colin">colin</option>' in page and 'value="olivia"' not in page
    response = client.post(f"/sessions/{session.pk}/share/", {"user": "colin"}, follow=True)
    assert INVITED.format(user="colin") in response.content.decode()
    chat(session, owner, "From Olivia")
    chat(session, colleague, "From Colin")

    client.force_login(colleague)
    home = client.get("/").content.decode()
    assert "Pairing" in home and 'data-shared-by="olivia"' in home
    page = client.get(f"/sessions/{session.pk}/").content.decode()
    who = re.findall(r'<div class="msg__who">([^<]+)</div>', page)
    assert who[0] == "olivia" and who[2] == "You"
    assert "data-shared-notice" in page
    summary = client.get(f"/sessions/{session.pk}/summary/").content.decode()
    assert "olivia (started it), colin" in summary
    assert "data-hide" not in summary  # only the owner hides or renames
    assert client.post(f"/sessions/{session.pk}/share/", {"user": "oscar"}).status_code == 403
    # Time is counted once: on the owner's report, not on the guest's.
    assert "Acme Corp" not in client.get("/reports/mine/?preset=this_month").content.decode()
    client.force_login(owner)
    assert "Acme Corp" in client.get("/reports/mine/?preset=this_month").content.decode()
    client.force_login(colleague)

    client.force_login(owner)
    client.post(f"/sessions/{session.pk}/share/colin/revoke/")
    assert not SessionInvitation.objects.live().exists()
    client.force_login(colleague)
    assert client.get(f"/sessions/{session.pk}/").status_code == 404
    assert "Pairing" not in client.get("/").content.decode()


def test_the_home_page_stays_bounded_with_shared_sessions(
    owner_client, owner, colleague, client_acme, django_assert_max_num_queries
):
    from tests.querycount import assert_bounded_queries

    def make(n):
        for i in range(n):
            session = services.session_start(user=colleague, client=client_acme, model="ollama:llama3.2", name=f"S{i}")
            SessionInvitation.objects.create(session=session, user=owner, invited_by=colleague)

    assert_bounded_queries(owner_client, "/", make, django_assert_max_num_queries, bound=6)


# --- conversation templates in the admin ------------------------------------------------------


def test_staff_manage_templates_in_the_admin(staff_client, client_acme):
    from billing.admin import TEMPLATE_MODEL_INVALID

    url = "/admin/billing/sessiontemplate/add/"
    response = staff_client.post(
        url,
        {
            "name": "Lease",
            "client": str(client_acme.pk),
            "default_model": "llama 3",
            "system_prompt": "",
            "is_active": "on",
        },
    )
    assert response.status_code == 200
    assert TEMPLATE_MODEL_INVALID.format(name="llama 3").replace("'", "&#x27;") in response.content.decode()
    response = staff_client.post(
        url,
        {
            "name": "Lease",
            "client": str(client_acme.pk),
            "default_model": "openai:gpt-4o",
            "system_prompt": "Review leases.",
            "first_message": "Here is the lease:",
            "is_active": "on",
        },
    )
    assert response.status_code == 302
    template = SessionTemplate.objects.get(name="Lease")
    assert (template.client, template.default_model) == (client_acme, "openai:gpt-4o")
    listing = staff_client.get("/admin/billing/sessiontemplate/").content.decode()
    assert "Lease" in listing and "Here is the lease:" in listing


def test_the_summary_lists_each_messages_versions(owner_client, owner, client_acme, use_simulator, chat):
    session = services.session_start(user=owner, client=client_acme, model="ollama:llama3.2", name="Draft")
    chat(session, owner, "Write the intro")
    version = services.session_regenerate(session_id=session.pk, user=owner)
    chat(version.session, owner, version.message)
    html = owner_client.get(f"/sessions/{version.session.pk}/summary/").content.decode()
    assert 'data-versions="2"' in html and "Message #2 has 2 versions" in html
    assert "<strong>2 (this one)</strong>" in html and f'href="/sessions/{session.pk}/summary/"' in html
    assert "A regenerated answer of" in html
    original = owner_client.get(f"/sessions/{session.pk}/summary/").content.decode()
    assert "<strong>1 (this one)</strong>" in original
    assert ChatSession.objects.get(pk=session.pk).status == "ended"  # the conversation moved on
