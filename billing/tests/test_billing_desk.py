"""The admin as the billing desk: draft, issue, export, verify; locked sessions refuse edits."""

from __future__ import annotations

import csv
import datetime as dt
import io

import pytest
from django.utils import timezone

from billing.models import Invoice, InvoiceStatus
from billing.services import invoice_create_draft, invoice_issue, last_month
from billing.tests.helpers import at, work
from sessions_app.admin_actions import SESSION_HEADER
from tests.factories import PriceFactory


def _post_action(client, url, action, pks):
    return client.post(url, {"action": action, "_selected_action": [str(pk) for pk in pks]}, follow=True)


@pytest.mark.django_db
def test_draft_action_drafts_last_month_for_each_selected_client(staff_client, owner, client_acme, client_globex):
    start, _ = last_month()
    middle = timezone.make_aware(dt.datetime.combine(start + dt.timedelta(days=10), dt.time(10)))
    work(user=owner, client=client_acme, start=middle, seconds=600, costs=["1.00"])
    response = _post_action(
        staff_client, "/admin/billing/clientdomain/", "draft_last_month", [client_acme.pk, client_globex.pk]
    )
    page = response.content.decode()
    assert "Drafted an invoice for Acme Corp" in page
    assert "Globex: No unbilled, ended sessions" in page
    invoice = Invoice.objects.get()
    assert (invoice.client, invoice.period_start, invoice.status) == (client_acme, start, InvoiceStatus.DRAFT)


@pytest.mark.django_db
def test_issue_action_numbers_drafts_and_the_change_page_links_the_csv(staff_client, staff, owner, client_acme):
    work(user=owner, client=client_acme, start=at(2), seconds=600, costs=["1.00"])
    draft = invoice_create_draft(client=client_acme, period_start=at(1).date(), period_end=at(31).date(), user=staff)
    _post_action(staff_client, "/admin/billing/invoice/", "issue_invoices", [draft.pk])
    draft.refresh_from_db()
    assert draft.status == InvoiceStatus.ISSUED and draft.number.startswith("INV-")
    page = staff_client.get(f"/admin/billing/invoice/{draft.pk}/change/").content.decode()
    assert f"/reports/invoices/{draft.pk}.csv" in page


@pytest.mark.django_db
def test_a_locked_session_is_shown_locked_and_refuses_edits_in_the_admin(staff_client, staff, owner, client_acme):
    session = work(user=owner, client=client_acme, start=at(2), seconds=600, costs=["1.00"], name="Before")
    invoice = invoice_issue(
        invoice=invoice_create_draft(
            client=client_acme, period_start=at(1).date(), period_end=at(31).date(), user=staff
        ),
        user=staff,
    )
    changelist = staff_client.get("/admin/sessions_app/chatsession/").content.decode()
    assert f"🔒 {invoice.number}" in changelist
    url = f"/admin/sessions_app/chatsession/{session.pk}/change/"
    staff_client.post(url, {"name": "After", "system_prompt": "changed"})
    session.refresh_from_db()
    assert session.name == "Before"
    assert (
        staff_client.post(f"/admin/sessions_app/chatsession/{session.pk}/delete/", {"post": "yes"}).status_code == 403
    )


@pytest.mark.django_db
def test_sessions_export_as_csv_from_the_admin(staff_client, owner, client_acme):
    session = work(user=owner, client=client_acme, start=at(2, 9), seconds=600, costs=["1.005"], name="@risky")
    response = _post_action(staff_client, "/admin/sessions_app/chatsession/", "export_sessions_csv", [session.pk])
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert rows[0] == SESSION_HEADER
    row = dict(zip(SESSION_HEADER, rows[1], strict=True))
    assert row["name"] == "'@risky"
    assert row["started_at"] == "2026-03-02T09:00:00-05:00"


@pytest.mark.django_db
def test_verify_action_runs_the_integrity_check_on_each_session(staff_client, owner, client_acme):
    unsealed = work(user=owner, client=client_acme, start=at(2), seconds=60)
    active = work(user=owner, client=client_acme, start=at(3), ended=False)
    response = _post_action(
        staff_client, "/admin/sessions_app/chatsession/", "verify_integrity", [unsealed.pk, active.pk]
    )
    page = response.content.decode()
    assert "1 session(s) verified" in page
    assert f"FAILED {unsealed}" in page and "has ended but has no seal" in page


@pytest.mark.django_db
def test_a_new_price_is_entered_with_its_effective_date(staff_client):
    PriceFactory(provider="openai", model="gpt-4o", effective_from=at(1, 0))
    response = staff_client.post(
        "/admin/billing/modelprice/add/",
        {
            "provider": "openai",
            "model": "gpt-4o",
            "effective_from_0": "2026-03-15",
            "effective_from_1": "00:00:00",
            "input_per_mtok": "5.00",
            "output_per_mtok": "20.00",
        },
    )
    assert response.status_code == 302
    pricing = pytest.importorskip("billing.pricing")
    assert pricing.price_for("openai", "gpt-4o", at(10)).input_per_mtok == 2.5
    assert pricing.price_for("openai", "gpt-4o", at(20)).input_per_mtok == 5


@pytest.mark.django_db
def test_issuing_an_invoice_with_unknown_prices_warns(staff_client, staff, owner, client_acme):
    work(user=owner, client=client_acme, start=at(2), seconds=600, costs=["1.00", None, None])
    draft = invoice_create_draft(client=client_acme, period_start=at(1).date(), period_end=at(31).date(), user=staff)
    page = _post_action(staff_client, "/admin/billing/invoice/", "issue_invoices", [draft.pk]).content.decode()
    assert "covers 2 call(s) with unknown price" in page


@pytest.mark.django_db
def test_drafting_with_bad_dates_explains_and_creates_nothing(staff_client, client_acme):
    response = staff_client.post(
        "/reports/clients/acme/invoice/", {"start": "2026-03-31", "end": "2026-03-01"}, follow=True
    )
    assert "The end date is before the start date." in response.content.decode()
    assert not Invoice.objects.exists()
