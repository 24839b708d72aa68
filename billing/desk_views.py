"""The billing desk: staff pages for invoices outside the admin.

An invoice list with filters and a form for a new draft; an invoice page with what can be done
to it (refresh, issue, delete a draft; mark paid, void an issued invoice); a confirmation page
before issuing or voiding (a server page, so it works without script and under a strict CSP);
a printable A4 page and a PDF. Every action is one service call in `billing.services`.
"""

from __future__ import annotations

import datetime as dt

from django.contrib import messages
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.dateparse import parse_date
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from billing import desk, pdf
from billing.models import ClientDomain, Invoice
from billing.reports import PeriodError, period_from
from billing.services import (
    BillingError,
    billing_tz,
    invoice_create_draft,
    invoice_delete_draft,
    invoice_issue,
    invoice_mark_paid,
    invoice_refresh_draft,
    invoice_summary_text,
    invoice_void,
    last_month,
)
from billing.views import staff_required

ERR_BAD_PAID_DATE = "Give the payment date as YYYY-MM-DD, not in the future."


def _invoice(pk) -> Invoice:
    return get_object_or_404(Invoice.objects.select_related("client", "credit_for", "created_by"), pk=pk)


@require_GET
@staff_required
def invoice_list(request):
    """Invoices and credit notes, newest first, filtered by state and client; and a new draft."""
    state = request.GET.get("state", "")
    client_slug = request.GET.get("client", "")
    invoices = desk.invoices_filtered(state=state, client_slug=client_slug, today=desk.today())
    start, end = last_month()
    context = {
        "rows": desk.invoice_rows(invoices[: desk.LIST_LIMIT], today=desk.today()),
        "cut": max(invoices.count() - desk.LIST_LIMIT, 0),
        "states": desk.STATES,
        "state": state,
        "clients": ClientDomain.objects.order_by("name"),
        "client_slug": client_slug,
        "draft_start": start.isoformat(),
        "draft_end": end.isoformat(),
        "summary": desk.desk_summary(today=desk.today()),
    }
    return render(request, "billing/invoice_list.html", context)


@require_POST
@staff_required
def invoice_draft(request):
    """Draft an invoice for the client and dates posted (from the list or a client's report)."""
    client = get_object_or_404(ClientDomain, slug=request.POST.get("client", ""))
    try:
        period = period_from(
            kind="custom",
            start=request.POST.get("start"),
            end=request.POST.get("end"),
            tz=billing_tz(),
            now=timezone.now(),
        )
        invoice = invoice_create_draft(
            client=client, period_start=period.first_day, period_end=period.last_day, user=request.user
        )
    except (PeriodError, BillingError) as exc:
        messages.error(request, str(exc))
        return redirect(request.POST.get("back") or reverse("billing:invoices"))
    messages.success(request, f"Drafted {invoice_summary_text(invoice)}. Check it, then issue it.")
    return redirect("billing:invoice", pk=invoice.pk)


@require_GET
@staff_required
def invoice_page(request, pk):
    invoice = _invoice(pk)
    return render(request, "billing/invoice_detail.html", desk.invoice_context(invoice, today=desk.today()))


@require_GET
@staff_required
def invoice_print(request, pk):
    """The invoice as a clean A4 page: print it, or save it as PDF from the browser."""
    invoice = _invoice(pk)
    return render(request, "billing/invoice_print.html", desk.invoice_context(invoice, today=desk.today()))


@require_GET
@staff_required
def invoice_pdf(request, pk):
    invoice = _invoice(pk)
    body = pdf.invoice_pdf(desk.invoice_context(invoice, today=desk.today()))
    response = HttpResponse(body, content_type="application/pdf")
    response["Content-Disposition"] = f'attachment; filename="{desk.file_stem(invoice)}.pdf"'
    response["Cache-Control"] = "no-store"
    return response


@require_http_methods(["GET", "POST"])
@staff_required
def invoice_issue_view(request, pk):
    """GET: what issuing does (numbers it, locks its sessions). POST: issue it."""
    invoice = _invoice(pk)
    if request.method == "GET":
        return render(request, "billing/invoice_confirm.html", desk.confirm_context(invoice, action="issue"))
    try:
        issued = invoice_issue(invoice=invoice, user=request.user)
    except BillingError as exc:
        messages.error(request, exc.message)
        return redirect("billing:invoice", pk=invoice.pk)
    messages.success(request, f"Issued {invoice_summary_text(issued)}, due {issued.due_date:%Y-%m-%d}.")
    return redirect("billing:invoice", pk=issued.pk)


@require_http_methods(["GET", "POST"])
@staff_required
def invoice_void_view(request, pk):
    """GET: what voiding does (a credit note cancels it). POST: void it, with the reason given."""
    invoice = _invoice(pk)
    if request.method == "GET":
        return render(request, "billing/invoice_confirm.html", desk.confirm_context(invoice, action="void"))
    try:
        credit = invoice_void(invoice=invoice, user=request.user, reason=request.POST.get("reason", ""))
    except BillingError as exc:
        messages.error(request, exc.message)
        return redirect("billing:invoice", pk=invoice.pk)
    messages.success(request, f"Voided {invoice.number}: credit note {invoice_summary_text(credit)} cancels it.")
    return redirect("billing:invoice", pk=credit.pk)


@require_POST
@staff_required
def invoice_paid(request, pk):
    invoice = _invoice(pk)
    raw = request.POST.get("paid_on", "").strip()
    paid_at = None
    if raw:
        day = parse_date(raw) if len(raw) == 10 else None
        if day is None or day > desk.today():
            messages.error(request, ERR_BAD_PAID_DATE)
            return redirect("billing:invoice", pk=invoice.pk)
        paid_at = dt.datetime.combine(day, dt.time(12), tzinfo=billing_tz())
    try:
        invoice_mark_paid(invoice=invoice, user=request.user, paid_at=paid_at)
    except BillingError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"{invoice.number} is marked paid.")
    return redirect("billing:invoice", pk=invoice.pk)


@require_POST
@staff_required
def invoice_refresh(request, pk):
    invoice = _invoice(pk)
    try:
        refreshed = invoice_refresh_draft(invoice=invoice, user=request.user)
    except BillingError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Refreshed the draft from the work as it is now: {invoice_summary_text(refreshed)}.")
    return redirect("billing:invoice", pk=invoice.pk)


@require_POST
@staff_required
def invoice_delete(request, pk):
    invoice = _invoice(pk)
    try:
        invoice_delete_draft(invoice=invoice, user=request.user)
    except BillingError as exc:
        messages.error(request, exc.message)
        return redirect("billing:invoice", pk=invoice.pk)
    messages.success(
        request, f"Deleted the draft for {invoice.client} ({invoice.period_start} – {invoice.period_end})."
    )
    return redirect("billing:invoices")
