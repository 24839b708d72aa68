"""Admin actions of the billing desk: draft and issue invoices, export and check sessions.

Plain functions with the admin action signature, attached to the model admins in
`billing/admin.py` and `sessions_app/admin.py`; each calls one service and reports back.
"""

from __future__ import annotations

from decimal import Decimal

from django.contrib import admin, messages
from django.utils import timezone

from billing.csv_export import csv_response, escape_cell, iso
from billing.money import amount_text, format_money
from billing.services import (
    BillingError,
    billing_tz,
    invoice_issue,
    invoices_draft_for_clients,
    last_month,
    unpriced_calls_on,
)
from sessions_app.integrity import verify_session
from sessions_app.services import session_end_as_staff

SESSION_HEADER = [
    "session_id",
    "name",
    "consultant",
    "client",
    "status",
    "end_reason",
    "started_at",
    "ended_at",
    "duration_seconds",
    "primary_model",
    "total_messages",
    "total_tokens",
    "llm_cost",
    "llm_cost_exact",
    "invoice",
    "sealed",
]


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


def _session_rows(queryset):
    tz = billing_tz()
    for s in queryset.select_related("user", "domain", "invoice").order_by("started_at").iterator(chunk_size=2000):
        cost = Decimal(s.estimated_cost_usd or 0)
        yield [
            str(s.pk),
            escape_cell(s.name),
            escape_cell(s.user.get_username()),
            escape_cell(s.domain.slug),
            s.status,
            s.end_reason,
            iso(s.started_at, tz),
            iso(s.ended_at, tz),
            "" if s.duration_seconds is None else s.duration_seconds,
            escape_cell(s.primary_model),
            s.total_messages,
            s.total_tokens,
            amount_text(cost),
            amount_text(cost, 6),
            escape_cell(s.invoice.number if s.invoice_id and s.invoice.number else ""),
            "yes" if s.soulfra_hash else "no",
        ]


@admin.action(description="Export selected sessions as CSV")
def export_sessions_csv(modeladmin, request, queryset):
    stamp = timezone.now().astimezone(billing_tz()).strftime("%Y%m%d-%H%M%S")
    return csv_response(request, f"sessions-{stamp}.csv", SESSION_HEADER, _session_rows(queryset))


@admin.action(description="Verify integrity (hash chain and seal)")
def verify_integrity(modeladmin, request, queryset):

    good, bad = 0, []
    for session in queryset.order_by("started_at")[:500]:
        valid, detail = verify_session(session)
        if valid:
            good += 1
        else:
            bad.append(f"{session} ({session.pk}): {detail}")
    if good:
        modeladmin.message_user(request, f"{good} session(s) verified: chain and seal intact.", messages.SUCCESS)
    for line in bad[:20]:
        modeladmin.message_user(request, f"FAILED {line}", messages.ERROR)
    if len(bad) > 20:
        modeladmin.message_user(request, f"…and {len(bad) - 20} more failed.", messages.ERROR)


@admin.action(description="End selected active sessions")
def end_sessions(modeladmin, request, queryset):

    ended = 0
    for session in queryset.filter(status="active"):
        session_end_as_staff(session=session)
        ended += 1
    modeladmin.message_user(request, f"Ended {ended} session(s).", messages.SUCCESS if ended else messages.INFO)
