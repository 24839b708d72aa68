"""The billing admin: staff only, bounded changelists, and forms that refuse bad input."""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal

import pytest
from django.core.cache import cache
from django.urls import reverse
from django.utils import timezone

from billing.admin import DUPLICATE_SLUG
from billing.branding import brand_for_host
from billing.models import Brand, ClientDomain, Invoice, InvoiceLine, LLMUsage, ModelAlias, ModelPrice
from tests.factories import BrandFactory, ClientFactory, PriceFactory, UsageFactory, UserFactory
from tests.querycount import assert_bounded_queries

pytestmark = pytest.mark.django_db

CHANGELISTS = ["clientdomain", "brand", "modelprice", "modelalias", "llmusage", "invoice"]


def changelist(model: str) -> str:
    return reverse(f"admin:billing_{model}_changelist")


def add_clients(n: int) -> None:
    for _ in range(n):
        client = ClientFactory()
        client.members.add(UserFactory())
        BrandFactory(client=client)
        BrandFactory(client=client, is_default=False)


def add_prices(n: int) -> None:
    start = ModelPrice.objects.count()
    for i in range(start, start + n):
        PriceFactory(model=f"gpt-test-{i}")


def add_aliases(n: int) -> None:
    start = ModelAlias.objects.count()
    for i in range(start, start + n):
        ModelAlias.objects.create(provider="anthropic", alias=f"claude-{i}", target=f"claude-{i}-20250101")


def add_usage(n: int) -> None:
    for i in range(n):
        UsageFactory(client=ClientFactory(), cost=None if i % 2 else Decimal("0.01"))


def add_invoices(n: int) -> None:
    for _ in range(n):
        invoice = Invoice.objects.create(
            client=ClientFactory(), period_start=date(2026, 1, 1), period_end=date(2026, 1, 31)
        )
        InvoiceLine.objects.create(invoice=invoice, kind="time", description="Time", amount=Decimal("10"))


MAKERS = {
    "clientdomain": add_clients,
    "brand": add_clients,
    "modelprice": add_prices,
    "modelalias": add_aliases,
    "llmusage": add_usage,
    "invoice": add_invoices,
}


@pytest.mark.parametrize("model", CHANGELISTS)
def test_billing_changelists_make_the_same_queries_for_2_and_22_rows(
    staff_client, model, django_assert_max_num_queries
):
    assert_bounded_queries(staff_client, changelist(model), MAKERS[model], django_assert_max_num_queries, bound=12)


@pytest.mark.parametrize("model", CHANGELISTS)
def test_consultants_cannot_open_the_billing_admin(owner_client, model):
    response = owner_client.get(changelist(model))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_anonymous_visitors_are_sent_to_the_admin_login(client):
    response = client.get(changelist("clientdomain"))
    assert response.status_code == 302


@pytest.mark.parametrize("model", CHANGELISTS)
def test_change_pages_render_for_staff(staff_client, model):
    MAKERS[model](1)
    obj = {
        "clientdomain": ClientDomain,
        "brand": Brand,
        "modelprice": ModelPrice,
        "modelalias": ModelAlias,
        "llmusage": LLMUsage,
        "invoice": Invoice,
    }[model].objects.first()
    response = staff_client.get(reverse(f"admin:billing_{model}_change", args=[obj.pk]))
    assert response.status_code == 200


def client_form(**overrides) -> dict:
    data = {
        "name": "Initech",
        "slug": "initech",
        "hostname": "",
        "is_active": "on",
        "hourly_rate": "150.00",
        "currency": "USD",
        "llm_markup_percent": "10",
        "billing_increment_minutes": "6",
        "brands-TOTAL_FORMS": "0",
        "brands-INITIAL_FORMS": "0",
        "brands-MIN_NUM_FORMS": "0",
        "brands-MAX_NUM_FORMS": "1000",
    }
    data.update(overrides)
    return data


def test_staff_can_add_a_client_through_the_admin(staff_client):
    response = staff_client.post(
        reverse("admin:billing_clientdomain_add"), client_form(hostname="Initech.Example.com", currency="usd")
    )
    assert response.status_code == 302, response.context["adminform"].form.errors
    client = ClientDomain.objects.get(slug="initech")
    assert client.hostname == "initech.example.com"
    assert client.currency == "USD"


@pytest.mark.parametrize("slug", ["acme", "ACME"])
def test_admin_refuses_a_duplicate_slug_with_a_form_error(staff_client, client_acme, slug):
    response = staff_client.post(reverse("admin:billing_clientdomain_add"), client_form(slug=slug))
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert errors["slug"] == [DUPLICATE_SLUG % {"slug": "acme"}]
    assert ClientDomain.objects.filter(slug__iexact="acme").count() == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hourly_rate", "-1"),
        ("llm_markup_percent", "-5"),
        ("billing_increment_minutes", "0"),
        ("currency", "dollars"),
        ("hostname", "https://acme.example.com/"),
    ],
)
def test_admin_refuses_bad_client_values(staff_client, field, value):
    response = staff_client.post(reverse("admin:billing_clientdomain_add"), client_form(**{field: value}))
    assert response.status_code == 200
    assert field in response.context["adminform"].form.errors
    assert not ClientDomain.objects.exists()


def brand_form(client: ClientDomain, **overrides) -> dict:
    data = {
        "client": str(client.pk),
        "name": "Acme night",
        "owner": "",
        "primary_color": "#112233",
        "accent_color": "#445566",
        "background_color": "#ffffff",
        "font": "serif",
        "logo": "",
        "welcome_text": "Hello",
    }
    data.update(overrides)
    return data


def test_staff_can_add_a_brand(staff_client, client_globex):
    response = staff_client.post(reverse("admin:billing_brand_add"), brand_form(client_globex))
    assert response.status_code == 302
    assert Brand.objects.filter(client=client_globex, name="Acme night", is_default=False).exists()


@pytest.mark.parametrize("field", ["primary_color", "accent_color", "background_color"])
@pytest.mark.parametrize("value", ["red", "#12345", "#12345g", '#fff"><script>alert(1)</script>', "112233"])
def test_admin_refuses_a_colour_that_is_not_rrggbb(staff_client, client_acme, field, value):
    response = staff_client.post(reverse("admin:billing_brand_add"), brand_form(client_acme, **{field: value}))
    assert response.status_code == 200
    assert field in response.context["adminform"].form.errors
    assert not Brand.objects.filter(name="Acme night").exists()


def test_admin_refuses_a_second_default_brand_with_a_readable_error(staff_client, client_acme):
    response = staff_client.post(reverse("admin:billing_brand_add"), brand_form(client_acme, is_default="on"))
    assert response.status_code == 200
    form = response.context["adminform"].form
    assert "already has a default brand" in str(form.errors["is_default"])
    assert not form.non_field_errors()


def test_make_default_action_moves_the_default(staff_client, client_acme):
    other = BrandFactory(client=client_acme, name="Other", is_default=False)
    response = staff_client.post(
        changelist("brand"), {"action": "make_default", "_selected_action": [str(other.pk)]}, follow=True
    )
    assert response.status_code == 200
    assert list(Brand.objects.filter(client=client_acme, is_default=True)) == [other]


def test_brand_swatches_escape_and_revalidate(staff_client, client_acme):
    Brand.objects.filter(client=client_acme).update(name="<b>Acme</b>")
    response = staff_client.get(changelist("brand"))
    body = response.content.decode()
    assert "&lt;b&gt;Acme&lt;/b&gt;" in body
    assert "<b>Acme</b>" not in body
    assert "background:#0b7285" in body


def price_form(**overrides) -> dict:
    data = {
        "provider": "openai",
        "model": "gpt-4o",
        "effective_from_0": "2026-01-01",
        "effective_from_1": "00:00:00",
        "input_per_mtok": "2.50",
        "output_per_mtok": "10.00",
        "context_window": "128000",
        "source": "list price",
    }
    data.update(overrides)
    return data


def test_staff_can_add_a_price(staff_client):
    response = staff_client.post(reverse("admin:billing_modelprice_add"), price_form())
    assert response.status_code == 302
    assert ModelPrice.objects.get().input_per_mtok == Decimal("2.50")


@pytest.mark.parametrize("field", ["input_per_mtok", "output_per_mtok"])
def test_admin_refuses_a_negative_price(staff_client, field):
    response = staff_client.post(reverse("admin:billing_modelprice_add"), price_form(**{field: "-0.01"}))
    assert response.status_code == 200
    assert field in response.context["adminform"].form.errors
    assert not ModelPrice.objects.exists()


def test_price_list_says_which_row_is_in_force(staff_client):
    old = PriceFactory(effective_from=timezone.now() - timedelta(days=400), input_per_mtok=Decimal("5"))
    current = PriceFactory(effective_from=timezone.now() - timedelta(days=10))
    future = PriceFactory(effective_from=timezone.now() + timedelta(days=10))
    response = staff_client.get(changelist("modelprice") + "?in_force=yes")
    assert list(response.context["cl"].result_list) == [current]
    response = staff_client.get(changelist("modelprice") + "?in_force=superseded")
    assert list(response.context["cl"].result_list) == [old]
    response = staff_client.get(changelist("modelprice") + "?in_force=future")
    assert list(response.context["cl"].result_list) == [future]


def test_usage_ledger_filters_unknown_prices_and_is_read_only(staff_client):
    priced = UsageFactory(cost=Decimal("0.5"))
    unknown = UsageFactory(provider="openai", model="gpt-unpriced", cost=None)
    response = staff_client.get(changelist("llmusage") + "?price=unknown")
    assert list(response.context["cl"].result_list) == [unknown]
    assert "price unknown" in response.content.decode()
    response = staff_client.get(changelist("llmusage") + "?price=known")
    assert list(response.context["cl"].result_list) == [priced]
    assert staff_client.get(reverse("admin:billing_llmusage_add")).status_code == 403


def test_saving_a_client_in_the_admin_forgets_its_cached_brand(staff_client):
    cache.clear()
    client = ClientFactory(slug="initech", name="Initech", hostname="initech.localhost")
    BrandFactory(client=client)
    assert brand_for_host("initech.localhost") is not None
    response = staff_client.post(
        reverse("admin:billing_clientdomain_change", args=[client.pk]),
        client_form(
            hostname="initech2.localhost",
            **{"brands-TOTAL_FORMS": "0", "brands-INITIAL_FORMS": "0"},
        ),
    )
    assert response.status_code == 302, response.context["adminform"].form.errors
    assert brand_for_host("initech.localhost") is None
    assert brand_for_host("initech2.localhost") is not None
