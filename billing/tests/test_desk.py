"""The billing desk outside the admin: list, draft, issue (confirmed), print, PDF, mark paid, void."""

from __future__ import annotations

import datetime as dt
import io
from decimal import Decimal

import pytest
from django.utils import timezone
from pypdf import PdfReader

from billing.models import Invoice, InvoiceKind, InvoiceLine, InvoiceStatus
from billing.services import invoice_create_draft, invoice_issue
from billing.tests.helpers import at, work
from sessions_app.models import ChatSession
from tests.factories import ClientFactory

MARCH = {"start": "2026-03-01", "end": "2026-03-31"}


@pytest.fixture
def taxed(db):
    return ClientFactory(
        slug="taxed",
        name="Taxed & Sons",
        hourly_rate=Decimal("120.00"),
        tax_rate_percent=Decimal("20"),
        payment_terms_days=14,
    )


def draft_via_desk(staff_client, client) -> Invoice:
    response = staff_client.post("/reports/invoices/draft/", {"client": client.slug, **MARCH})
    invoice = Invoice.objects.get(client=client, status=InvoiceStatus.DRAFT)
    assert response.status_code == 302 and response["Location"] == f"/reports/invoices/{invoice.pk}/"
    return invoice


@pytest.mark.django_db
def test_draft_issue_print_and_void_at_the_desk(staff_client, owner, taxed):
    session = work(user=owner, client=taxed, start=at(2), seconds=1800, costs=["0.003"], name="Audit prep")
    invoice = draft_via_desk(staff_client, taxed)
    # 30 minutes at 120/h = 60.00; LLM 0.003 USD rounds to 0.00 but keeps its line; 20 % tax.
    assert (invoice.subtotal, invoice.tax_total, invoice.total) == (
        Decimal("60.00"),
        Decimal("12.00"),
        Decimal("72.00"),
    )
    page = staff_client.get(f"/reports/invoices/{invoice.pk}/").content.decode()
    assert "Tax 20.00 %" in page and "72.00 USD" in page and "0.003000 USD" in page
    assert "Issue…" in page and "Mark paid" not in page

    confirm = staff_client.get(f"/reports/invoices/{invoice.pk}/issue/").content.decode()
    assert "It locks the 1 session it bills" in confirm and "Audit prep" in confirm
    staff_client.post(f"/reports/invoices/{invoice.pk}/issue/")
    invoice.refresh_from_db()
    assert invoice.status == InvoiceStatus.ISSUED and invoice.number == "INV-2026-0001"
    assert invoice.due_date == timezone.localtime(invoice.issued_at).date() + dt.timedelta(days=14)
    assert ChatSession.objects.get(pk=session.pk).is_locked

    printed = staff_client.get(f"/reports/invoices/{invoice.pk}/print/").content.decode()
    assert "INV-2026-0001" in printed and "Taxed &amp; Sons" in printed and "<script" not in printed
    pdf = staff_client.get(f"/reports/invoices/{invoice.pk}.pdf")
    assert pdf["Content-Type"] == "application/pdf"
    assert pdf["Content-Disposition"] == 'attachment; filename="INV-2026-0001.pdf"'
    text = PdfReader(io.BytesIO(pdf.content)).pages[0].extract_text()
    for expected in ("Invoice", "INV-2026-0001", "Taxed & Sons", "72.00 USD", "Tax 20.00 %", "0.5000 h"):
        assert expected in text

    assert "It cancels" not in staff_client.get(f"/reports/invoices/{invoice.pk}/void/").content.decode()
    staff_client.post(f"/reports/invoices/{invoice.pk}/void/", {"reason": "Wrong rate"})
    invoice.refresh_from_db()
    credit = Invoice.objects.get(kind=InvoiceKind.CREDIT_NOTE)
    assert invoice.status == InvoiceStatus.VOID and invoice.total == Decimal("72.00")  # never edited
    assert (credit.number, credit.credit_for, credit.total, credit.status) == (
        "INV-2026-0002",
        invoice,
        Decimal("72.00"),
        InvoiceStatus.ISSUED,
    )
    credit_page = staff_client.get(f"/reports/invoices/{credit.pk}/").content.decode()
    assert "Credit note" in credit_page and "\u221272.00 USD" in credit_page and "Wrong rate" in credit_page
    # The voided invoice's work is unbilled again: a new draft picks it up.
    assert not ChatSession.objects.get(pk=session.pk).is_locked
    again = draft_via_desk(staff_client, taxed)
    assert again.total == Decimal("72.00")


@pytest.mark.django_db
def test_an_issued_invoice_is_marked_paid_or_shows_overdue(staff_client, staff, owner, taxed):
    work(user=owner, client=taxed, start=at(2), seconds=600)
    invoice = invoice_create_draft(
        client=taxed, period_start=dt.date(2026, 3, 1), period_end=dt.date(2026, 3, 31), user=staff
    )
    invoice = invoice_issue(invoice=invoice, user=staff, now=at(31, 12))
    listing = staff_client.get("/reports/invoices/?state=overdue").content.decode()
    assert invoice.number in listing and "Overdue since 2026-04-15" in listing
    assert "1 overdue" in listing
    staff_client.post(f"/reports/invoices/{invoice.pk}/paid/", {"paid_on": "2026-04-20"})
    invoice.refresh_from_db()
    assert invoice.paid_at.date() == dt.date(2026, 4, 20)
    assert invoice.number in staff_client.get("/reports/invoices/?state=paid").content.decode()
    assert invoice.number not in staff_client.get("/reports/invoices/?state=overdue").content.decode()
    page = staff_client.post(f"/reports/invoices/{invoice.pk}/paid/", follow=True).content.decode()
    assert "was already marked paid on" in page


@pytest.mark.django_db
def test_a_second_draft_for_the_same_dates_is_refused_by_name(staff_client, owner, taxed):
    work(user=owner, client=taxed, start=at(2), seconds=600)
    draft_via_desk(staff_client, taxed)
    page = staff_client.post("/reports/invoices/draft/", {"client": taxed.slug, **MARCH}, follow=True).content.decode()
    assert "Taxed &amp; Sons already has a draft for 2026-03-01 – 2026-03-31" in page
    assert Invoice.objects.filter(client=taxed).count() == 1


@pytest.mark.django_db
def test_a_draft_refreshes_and_deletes(staff_client, owner, taxed):
    first = work(user=owner, client=taxed, start=at(2), seconds=600)
    invoice = draft_via_desk(staff_client, taxed)
    work(user=owner, client=taxed, start=at(3), seconds=600)
    # A draft that no longer matches the work is not issued: it must be refreshed first.
    page = staff_client.post(f"/reports/invoices/{invoice.pk}/issue/", follow=True).content.decode()
    assert "The draft no longer matches the work it bills" in page
    staff_client.post(f"/reports/invoices/{invoice.pk}/refresh/")
    assert InvoiceLine.objects.filter(invoice=invoice, kind="time").count() == 2
    staff_client.post(f"/reports/invoices/{invoice.pk}/delete/")
    assert not Invoice.objects.exists()
    assert ChatSession.objects.get(pk=first.pk).invoice_id is None


@pytest.mark.django_db
def test_consultants_never_reach_the_desk(owner_client, staff, owner, taxed):
    work(user=owner, client=taxed, start=at(2), seconds=600)
    invoice = invoice_create_draft(
        client=taxed, period_start=dt.date(2026, 3, 1), period_end=dt.date(2026, 3, 31), user=staff
    )
    for url in ("/reports/invoices/", f"/reports/invoices/{invoice.pk}/", f"/reports/invoices/{invoice.pk}.pdf"):
        assert owner_client.get(url).status_code == 403
    assert owner_client.post(f"/reports/invoices/{invoice.pk}/issue/").status_code == 403
    invoice.refresh_from_db()
    assert invoice.status == InvoiceStatus.DRAFT


@pytest.mark.django_db
def test_the_desk_pages_make_a_bounded_number_of_queries(
    staff_client, staff, owner, taxed, django_assert_max_num_queries
):
    for day in range(2, 12):
        work(user=owner, client=taxed, start=at(day), seconds=600, costs=["0.5"])
    invoice = invoice_create_draft(
        client=taxed, period_start=dt.date(2026, 3, 1), period_end=dt.date(2026, 3, 31), user=staff
    )
    with django_assert_max_num_queries(8):
        assert staff_client.get(f"/reports/invoices/{invoice.pk}/").status_code == 200
    with django_assert_max_num_queries(8):
        assert staff_client.get("/reports/invoices/").status_code == 200
