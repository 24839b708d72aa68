"""Admin actions of the billing desk: draft and issue invoices, export and check sessions.

Plain functions with the admin action signature, attached to the model admins in
`billing/admin.py` and `sessions_app/admin.py`; each calls one service and reports back.
"""

from __future__ import annotations

from django.contrib import admin, messages

from billing.money import format_money
from billing.services import (
    BillingError,
    invoice_issue,
    invoices_draft_for_clients,
    last_month,
    unpriced_calls_on,
)


@admin.action(description="Draft invoices for last month")
def draft_last_month(modeladmin, request, queryset):
    start, end = last_month()
    drafts, skipped = invoices_draft_for_clients(
        clients=queryset, period_start=start, period_end=end, user=request.user
    )
    for invoice in drafts:
        modeladmin.message_user(
            request,
            f"Drafted an invoice for {invoice.client} ({start} – {end}): {format_money(invoice.total, invoice.currency)}.",
            messages.SUCCESS,
        )
    for client, reason in skipped:
        modeladmin.message_user(request, f"{client}: {reason}", messages.WARNING)


@admin.action(description="Issue selected draft invoices (assigns numbers, locks their sessions)")
def issue_invoices(modeladmin, request, queryset):
    for invoice in queryset.order_by("created_at"):
        try:
            issued = invoice_issue(invoice=invoice, user=request.user)
        except BillingError as exc:
            modeladmin.message_user(request, f"{invoice}: {exc.message}", messages.ERROR)
        else:
            modeladmin.message_user(request, f"Issued {issued.number} for {issued.client}.", messages.SUCCESS)
            unpriced = unpriced_calls_on(issued)
            if unpriced:
                modeladmin.message_user(
                    request,
                    f"{issued.number} covers {unpriced} call(s) with unknown price, billed at 0.00 and named on its LLM lines.",
                    messages.WARNING,
                )
