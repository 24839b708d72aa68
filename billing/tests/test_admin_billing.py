"""The admin's side of issue 14: read-only issued invoices, guarded rates and terms, flags, per-part invoices."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.utils import timezone

from billing.models import ClientBudget, ClientTerms, ExchangeRate
from billing.services import invoice_create_draft, invoice_issue
from billing.tests.helpers import at, work
from sessions_app.models import SessionSegment
from tests.factories import ClientFactory, MessageFactory

MARCH = {"period_start": dt.date(2026, 3, 1), "period_end": dt.date(2026, 3, 31)}


@pytest.mark.django_db
def test_an_issued_invoice_shows_no_save_buttons(staff_client, staff, owner, client_acme):
    work(user=owner, client=client_acme, start=at(2), seconds=600)
    invoice = invoice_issue(invoice=invoice_create_draft(client=client_acme, user=staff, **MARCH), user=staff)
    page = staff_client.get(f"/admin/billing/invoice/{invoice.pk}/change/").content.decode()
    assert invoice.number in page and 'name="_save"' not in page
    assert f"/reports/invoices/{invoice.pk}/" in page  # open it at the billing desk


@pytest.mark.django_db
def test_a_rate_an_issued_invoice_used_cannot_be_edited_in_the_admin(staff_client, staff, owner):
    euro = ClientFactory(slug="eu", name="EU", currency="EUR")
    rate = ExchangeRate.objects.create(currency="EUR", usd_rate=Decimal("0.9"), effective_from=at(1, 0))
    work(user=owner, client=euro, start=at(2), seconds=60, costs=["1"])
    invoice = invoice_issue(invoice=invoice_create_draft(client=euro, user=staff, **MARCH), user=staff)
    response = staff_client.post(
        f"/admin/billing/exchangerate/{rate.pk}/change/",
        {"currency": "EUR", "usd_rate": "0.5", "effective_from_0": "2026-03-01", "effective_from_1": "00:00:00"},
    )
    assert response.status_code == 200
    assert f"used by issued invoice {invoice.number}" in response.content.decode()
    assert ExchangeRate.objects.get(pk=rate.pk).usd_rate == Decimal("0.9")


@pytest.mark.django_db
def test_a_missing_rate_is_flagged_on_the_client_list(staff_client):
    ClientFactory(slug="yen", name="Yen KK", currency="JPY")
    page = staff_client.get("/admin/billing/clientdomain/", follow=True).content.decode()
    assert "No exchange rate in force for: Yen KK (JPY)" in page
    assert "JPY rate missing" in page


@pytest.mark.django_db
def test_past_terms_cannot_be_scheduled_in_the_admin(staff_client, client_acme):
    response = staff_client.post(
        "/admin/billing/clientterms/add/",
        {
            "client": str(client_acme.pk),
            "effective_from_0": "2026-03-01",
            "effective_from_1": "00:00:00",
            "hourly_rate": "10",
            "llm_markup_percent": "0",
            "billing_increment_minutes": "6",
        },
    )
    assert "Terms take effect now or later" in response.content.decode()
    assert not ClientTerms.objects.exists()


@pytest.mark.django_db
def test_the_session_list_names_each_clients_invoice_and_flags_unknown_prices(
    staff_client, staff, owner, client_acme, client_globex
):
    session = work(user=owner, client=client_acme, start=at(4), seconds=600, costs=["1.00", None])
    SessionSegment.objects.filter(session=session).update(ended_at=at(4, 10, 5))
    SessionSegment.objects.create(
        session=session, domain=client_globex, model="openai:gpt-4o", started_at=at(4, 10, 5), ended_at=at(4, 10, 10)
    )
    MessageFactory(
        session=session, seq=9, role="assistant", domain=client_globex, cost_usd=Decimal("0.5"), timestamp=at(4, 10, 6)
    )
    globex = invoice_issue(invoice=invoice_create_draft(client=client_globex, user=staff, **MARCH), user=staff)
    acme = invoice_issue(invoice=invoice_create_draft(client=client_acme, user=staff, **MARCH), user=staff)
    page = staff_client.get("/admin/sessions_app/chatsession/").content.decode()
    assert f"🔒 {acme.number} (Acme Corp)" in page and f"🔒 {globex.number} (Globex)" in page
    assert "+ price unknown" in page


@pytest.mark.django_db
def test_the_budget_admin_shows_use_this_month(staff_client, client_acme):
    month = timezone.now().date().replace(day=1)
    ClientBudget.objects.create(client=client_acme, month=month, llm_limit=Decimal("25"))
    page = staff_client.get("/admin/billing/clientbudget/").content.decode()
    assert "0.00 USD (0%)" in page and "25.00 USD" in page
