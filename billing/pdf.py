"""An invoice as an A4 PDF, drawn by ReportLab from the same context as the invoice page.

ReportLab is pure Python and ships the Bitstream Vera TrueType fonts, so the PDF carries €, £,
accents and the other Latin characters a client name or description may hold without any
system font or library (docs/BILLING.md says why this library). Every text is set as a
Paragraph with its markup escaped: a client or session name is text, never markup.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path
from xml.sax.saxutils import escape

import reportlab
from reportlab.lib import colors
from reportlab.lib.enums import TA_RIGHT
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

FONTS = Path(reportlab.__file__).resolve().parent / "fonts"
INK = colors.HexColor("#1f2328")
MUTED = colors.HexColor("#57606a")
RULE = colors.HexColor("#d0d7de")


@functools.cache
def _fonts() -> tuple[str, str]:
    pdfmetrics.registerFont(TTFont("InvoiceSans", str(FONTS / "Vera.ttf")))
    pdfmetrics.registerFont(TTFont("InvoiceSans-Bold", str(FONTS / "VeraBd.ttf")))
    return "InvoiceSans", "InvoiceSans-Bold"


def _styles() -> dict[str, ParagraphStyle]:
    regular, bold = _fonts()
    base = ParagraphStyle("base", fontName=regular, fontSize=9, leading=12, textColor=INK)
    return {
        "base": base,
        "small": ParagraphStyle("small", parent=base, fontSize=8, leading=10, textColor=MUTED),
        "title": ParagraphStyle("title", parent=base, fontName=bold, fontSize=18, leading=22),
        "bold": ParagraphStyle("bold", parent=base, fontName=bold),
        "right": ParagraphStyle("right", parent=base, alignment=TA_RIGHT),
        "right_bold": ParagraphStyle("right_bold", parent=base, fontName=bold, alignment=TA_RIGHT),
    }


def _p(text, style) -> Paragraph:
    return Paragraph(escape(str(text)).replace("\n", "<br/>"), style)


def invoice_pdf(context: dict) -> bytes:
    """The PDF bytes of one invoice (or credit note) from `billing.desk.invoice_context`."""
    s = _styles()
    invoice = context["invoice"]
    buffer = io.BytesIO()
    doc = SimpleDocTemplate(
        buffer,
        pagesize=A4,
        leftMargin=18 * mm,
        rightMargin=18 * mm,
        topMargin=18 * mm,
        bottomMargin=18 * mm,
        title=f"{context['title']} {context['number']}",
        author=(context["issuer"] or ["Billable Sessions"])[0],
    )
    width = A4[0] - 36 * mm
    story: list = []

    dates = [("Number", context["number"]), ("Period", f"{invoice.period_start} – {invoice.period_end}")]
    if invoice.issued_at:
        dates.append(("Issued", f"{invoice.issued_at:%Y-%m-%d}"))
    if invoice.due_date and not invoice.is_credit_note:
        dates.append(("Due", f"{invoice.due_date:%Y-%m-%d}"))
    if invoice.credit_for_id:
        dates.append(("Cancels", invoice.credit_for.number))
    dates.append(("Status", context["state_label"]))
    head = Table(
        [
            [
                [_p(context["title"], s["title"]), *[_p(line, s["base"]) for line in context["issuer"]]],
                Table(
                    [[_p(k, s["small"]), _p(v, s["right"])] for k, v in dates],
                    colWidths=[22 * mm, 48 * mm],
                    style=[("VALIGN", (0, 0), (-1, -1), "TOP"), ("BOTTOMPADDING", (0, 0), (-1, -1), 1)],
                ),
            ]
        ],
        colWidths=[width - 72 * mm, 72 * mm],
        style=[("VALIGN", (0, 0), (-1, -1), "TOP")],
    )
    story += [head, Spacer(1, 8 * mm), _p("Bill to", s["small"]), _p(context["client"].name, s["bold"])]
    story.append(Spacer(1, 6 * mm))

    rows = [[_p(h, s["small"]) for h in ("Description", "Quantity", "Unit price", f"Amount ({invoice.currency})")]]
    for view in context["lines"]:
        rows.append(
            [
                _p(view.line.description, s["base"]),
                _p(view.quantity, s["right"]),
                _p(view.unit_price, s["right"]),
                _p(view.amount, s["right"]),
            ]
        )
    totals = context["totals"]
    rows.append(["", "", _p("Subtotal", s["right"]), _p(totals["subtotal"], s["right"])])
    rows.append(["", "", _p(f"Tax {totals['tax_rate']} %", s["right"]), _p(totals["tax"], s["right"])])
    rows.append(["", "", _p("Total", s["right_bold"]), _p(totals["total"], s["right_bold"])])
    body = len(context["lines"])
    table = Table(rows, colWidths=[width - 96 * mm, 30 * mm, 32 * mm, 34 * mm], repeatRows=1)
    table.setStyle(
        TableStyle(
            [
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("LINEBELOW", (0, 0), (-1, 0), 0.8, INK),
                ("LINEBELOW", (0, 1), (-1, body), 0.3, RULE),
                ("LINEABOVE", (2, body + 1), (-1, body + 1), 0.8, INK),
                ("LINEABOVE", (2, body + 3), (-1, body + 3), 0.8, INK),
            ]
        )
    )
    story.append(table)

    notes = []
    if context["pending"]:
        notes.append("Still running, billed on the invoice for the period in which they end:")
        notes += [f"• {line.description}" for line in context["pending"]]
    if context["unpriced"]:
        notes.append(f"{context['unpriced']} call(s) had no known price and are not charged.")
    for effective_from, rate in context["rates"]:
        notes.append(
            f"USD costs converted at {rate.normalize():f} {invoice.currency} per USD (rate of {effective_from:%Y-%m-%d %H:%M} UTC)."
        )
    if invoice.void_reason:
        notes.append(f"Reason: {invoice.void_reason}")
    if notes:
        story.append(Spacer(1, 6 * mm))
        story += [_p(note, s["small"]) for note in notes]
    doc.build(story)
    return buffer.getvalue()
