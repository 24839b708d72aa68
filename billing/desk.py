"""Reads for the billing desk: invoice lists, one invoice as a document, what an action will do.

Everything a desk page, the print view and the PDF show comes from `invoice_context`, so the
three always agree; money goes through `billing.money`, a credit note's figures shown negative.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass

from django.conf import settings
from django.db.models import Count, Q, QuerySet, Sum
from django.urls import reverse
from django.utils import timezone

from billing.models import Invoice, InvoiceKind, InvoiceLine, InvoiceStatus
from billing.money import amount_text, format_money, format_plain, format_rate
from billing.services import billing_tz

LIST_LIMIT = 200
STATES = [
    ("", "All"),
    ("draft", "Drafts"),
    ("outstanding", "Issued, unpaid"),
    ("overdue", "Overdue"),
    ("paid", "Paid"),
    ("void", "Void"),
    ("credit", "Credit notes"),
]
KIND_LABELS = dict(InvoiceLine.Kind.choices)


def today() -> dt.date:
    return timezone.now().astimezone(billing_tz()).date()


def file_stem(invoice: Invoice) -> str:
    return invoice.number or f"draft-{invoice.client.slug}-{invoice.period_start}-{invoice.period_end}"


def issuer_lines() -> list[str]:
    """The firm that sends the invoices (INVOICE_ISSUER, ";" between lines)."""
    return [line.strip() for line in settings.INVOICE_ISSUER.split(";") if line.strip()]


def state_of(invoice: Invoice, day: dt.date) -> tuple[str, str]:
    """(key, label) of where an invoice stands: draft, credit, void, paid, overdue or issued."""
    if invoice.status == InvoiceStatus.DRAFT:
        return "draft", "Draft"
    if invoice.is_credit_note:
        return "credit", "Credit note"
    if invoice.status == InvoiceStatus.VOID:
        return "void", "Void"
    if invoice.paid_at is not None:
        return "paid", f"Paid {invoice.paid_at.astimezone(billing_tz()):%Y-%m-%d}"
    if invoice.is_overdue(day):
        return "overdue", f"Overdue since {invoice.due_date + dt.timedelta(days=1):%Y-%m-%d}"
    return "issued", f"Issued, due {invoice.due_date:%Y-%m-%d}" if invoice.due_date else "Issued"


def invoices_filtered(*, state: str, client_slug: str, today: dt.date) -> QuerySet:
    qs = Invoice.objects.select_related("client", "credit_for").order_by("-created_at")
    issued_invoice = Q(status=InvoiceStatus.ISSUED, kind=InvoiceKind.INVOICE)
    filters = {
        "draft": Q(status=InvoiceStatus.DRAFT),
        "outstanding": issued_invoice & Q(paid_at__isnull=True),
        "overdue": issued_invoice & Q(paid_at__isnull=True, due_date__lt=today),
        "paid": issued_invoice & Q(paid_at__isnull=False),
        "void": Q(status=InvoiceStatus.VOID),
        "credit": Q(kind=InvoiceKind.CREDIT_NOTE),
    }
    if state in filters:
        qs = qs.filter(filters[state])
    if client_slug:
        qs = qs.filter(client__slug=client_slug)
    return qs


def invoice_rows(invoices, *, today: dt.date) -> list[dict]:
    rows = []
    for invoice in invoices:
        key, label = state_of(invoice, today)
        rows.append(
            {
                "invoice": invoice,
                "state": key,
                "state_label": label,
                "total": format_money(invoice.total, invoice.currency, sign=invoice.sign),
            }
        )
    return rows


def desk_summary(*, today: dt.date) -> dict:
    """Drafts waiting, and what is outstanding and overdue per currency (never one sum of two)."""
    outstanding = (
        Invoice.objects.filter(status=InvoiceStatus.ISSUED, kind=InvoiceKind.INVOICE, paid_at__isnull=True)
        .values("currency")
        .annotate(total=Sum("total"), n=Count("pk"), late=Count("pk", filter=Q(due_date__lt=today)))
        .order_by("currency")
    )
    return {
        "drafts": Invoice.objects.filter(status=InvoiceStatus.DRAFT).count(),
        "outstanding": [
            {"total": format_money(r["total"], r["currency"]), "count": r["n"], "overdue": r["late"]}
            for r in outstanding
        ],
    }


@dataclass
class LineView:
    line: InvoiceLine
    kind_label: str
    quantity: str
    unit_price: str
    amount: str
    session_url: str | None


def _quantity(line: InvoiceLine, currency: str) -> tuple[str, str]:
    """(quantity, unit price) as printed: their product is the amount, to the cent."""
    if line.kind == InvoiceLine.Kind.TIME:
        return f"{amount_text(line.quantity, 4)} h", f"{format_money(line.unit_price, currency)}/h"
    if line.kind == InvoiceLine.Kind.LLM:
        rate = "—" if line.exchange_rate is None else f"× {format_rate(line.exchange_rate)} {currency}/USD"
        return f"{amount_text(line.quantity, 6)} USD", rate
    if line.kind == InvoiceLine.Kind.MARKUP:
        return format_money(line.quantity, currency), f"× {format_plain(line.unit_price * 100, 2)} %"
    return "", ""


def invoice_context(invoice: Invoice, *, today: dt.date) -> dict:
    """The invoice as a document (page, print view, PDF) and what may be done with it."""
    currency, sign = invoice.currency, invoice.sign
    lines, pending = [], []
    for line in invoice.lines.select_related("session").order_by("position"):
        if line.kind == InvoiceLine.Kind.PENDING:
            pending.append(line)
            continue
        quantity, unit_price = _quantity(line, currency)
        lines.append(
            LineView(
                line=line,
                kind_label=KIND_LABELS.get(line.kind, line.kind),
                quantity=quantity,
                unit_price=unit_price,
                amount=format_money(line.amount, currency, sign=sign),
                session_url=reverse("session-summary", args=[line.session_id]) if line.session_id else None,
            )
        )
    key, label = state_of(invoice, today)
    billed_sessions = {v.line.session_id for v in lines if v.line.session_id}
    return {
        "invoice": invoice,
        "client": invoice.client,
        "title": invoice.title,
        "number": invoice.number or "Draft",
        "state": key,
        "state_label": label,
        "issuer": issuer_lines(),
        "lines": lines,
        "pending": pending,
        "sessions": len(billed_sessions),
        "unpriced": sum(v.line.unpriced_calls for v in lines),
        "unconverted": sum(v.line.unconverted_calls for v in lines),
        "rates": sorted(
            {
                (v.line.exchange_rate_from, v.line.exchange_rate)
                for v in lines
                if v.line.exchange_rate is not None and currency != "USD"
            },
            key=lambda r: r[0] or dt.datetime.min.replace(tzinfo=dt.UTC),
        ),
        "totals": {
            "time": format_money(invoice.time_total, currency, sign=sign),
            "llm": format_money(invoice.llm_total, currency, sign=sign),
            "subtotal": format_money(invoice.subtotal, currency, sign=sign),
            "tax_rate": format_plain(invoice.tax_rate_percent, 2),
            "tax": format_money(invoice.tax_total, currency, sign=sign),
            "total": format_money(invoice.total, currency, sign=sign),
        },
        "credit_notes": list(invoice.credit_notes.order_by("created_at")),
        "can_edit_draft": invoice.status == InvoiceStatus.DRAFT,
        "can_pay": invoice.status == InvoiceStatus.ISSUED and not invoice.is_credit_note and invoice.paid_at is None,
        "can_void": invoice.status == InvoiceStatus.ISSUED and not invoice.is_credit_note,
        "today": today,
        "file_stem": file_stem(invoice),
    }


def confirm_context(invoice: Invoice, *, action: str) -> dict:
    """What issuing or voiding will do, in words, before it is done."""
    context = invoice_context(invoice, today=today())
    sessions = (
        invoice.lines.filter(kind__in=InvoiceLine.BILLED_KINDS)
        .exclude(session=None)
        .values_list("session_id", "session__name")
        .distinct()
        .order_by("session__name")
    )
    by: dict = defaultdict(str)
    for session_id, name in sessions:
        by[session_id] = name or f"Session {str(session_id)[:8]}"
    context.update(action=action, session_names=sorted(by.values()))
    return context
