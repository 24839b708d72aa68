"""Admin actions on work sessions: export them as CSV, verify their integrity, end them.

Plain functions with the admin action signature, attached in `sessions_app/admin.py`; each
calls one service and reports back.
"""

from __future__ import annotations

from decimal import Decimal

from django.contrib import admin, messages
from django.utils import timezone

from billing.csv_export import csv_response, escape_cell, iso
from billing.money import amount_text
from billing.reports import billing_tz
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
