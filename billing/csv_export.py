"""CSV that spreadsheets open safely: streamed, fixed money format, formula cells escaped."""

from __future__ import annotations

import csv
import datetime as dt
import itertools
from collections.abc import AsyncIterator, Iterable, Iterator

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.http import StreamingHttpResponse

from billing.money import amount_text
from billing.reports import BillingLine, Period

# A cell a spreadsheet would run as a formula starts with one of these (tab and CR too:
# some programs strip them and then see the "=").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
ASYNC_BATCH = 500  # CSV lines per hop to the sync thread under ASGI

REPORT_HEADER = [
    "client",
    "client_name",
    "session_id",
    "session_name",
    "consultant",
    "session_started_at",
    "session_ended_at",
    "period_start",
    "period_end",
    "seconds",
    "billable_minutes",
    "billable_hours",
    "hourly_rate",
    "time_amount",
    "messages",
    "tokens",
    "unpriced_calls",
    "provider_cost_usd",
    "exchange_rate",
    "unconverted_calls",
    "llm_cost",
    "markup_percent",
    "llm_markup",
    "line_total",
    "currency",
    "invoice",
]

INVOICE_HEADER = [
    "invoice",
    "document",
    "credits_invoice",
    "status",
    "issued_at",
    "client",
    "client_name",
    "period_start",
    "period_end",
    "line",
    "kind",
    "session_id",
    "description",
    "quantity",
    "unit",
    "unit_price",
    "amount",
    "currency",
    "usd_cost",
    "exchange_rate",
    "exchange_rate_from",
]


def escape_cell(value) -> str:
    """Text for one cell; text a spreadsheet would run as a formula gets a leading quote.

    Numbers are written by `cell()` from Decimal/int, so a negative amount never reaches
    this function as text; anything else starting with = + - @ TAB CR is escaped.
    """
    text = "" if value is None else str(value)
    if text.startswith(FORMULA_STARTS):
        return "'" + text
    return text


def iso(value: dt.datetime | dt.date | None, tz=None) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return (value.astimezone(tz) if tz else value).isoformat()
    return value.isoformat()


class _Echo:
    """A file-like object whose write() hands the line back, for streaming csv.writer."""

    def write(self, value: str) -> str:
        return value


def stream_rows(header: list[str], rows: Iterable[list]) -> Iterator[str]:
    """CSV text a line at a time: minimal quoting (fields with , " CR or LF), LF line ends.

    The writer's CRLF terminator makes it quote fields holding a bare CR as well as LF (as
    PostgreSQL's COPY does); each line's own CRLF then becomes LF, the form COPY writes, so
    the Python and PostgreSQL exports are byte-identical.
    """
    writer = csv.writer(_Echo(), lineterminator="\r\n")
    yield writer.writerow(header)[:-2] + "\n"
    for row in rows:
        yield writer.writerow(row)[:-2] + "\n"


def _batched(chunks: Iterator[str], size: int) -> str | None:
    """The next `size` pieces of the sync generator joined, or None at its end."""
    parts = list(itertools.islice(chunks, size))
    return "".join(parts) if parts else None


async def _async_chunks(chunks: Iterator[str], size: int = ASYNC_BATCH) -> AsyncIterator[str]:
    """Hand a sync generator (which reads the database) to an ASGI server a batch at a time.

    Each batch runs in Django's sync thread (`thread_sensitive`), so the generator keeps one
    database connection and the event loop is never blocked on a query.
    """
    step = sync_to_async(_batched, thread_sensitive=True)
    while (batch := await step(chunks, size)) is not None:
        yield batch


def csv_response(request, filename: str, header: list[str], rows: Iterable[list]) -> StreamingHttpResponse:
    """Stream rows (lists of cells) as CSV; see `csv_text_response`."""
    return csv_text_response(request, filename, stream_rows(header, rows))


def csv_text_response(request, filename: str, chunks: Iterator[str]) -> StreamingHttpResponse:
    """Stream CSV text with an iterator the server can consume lazily.

    Under ASGI (daphne) Django buffers a *sync* iterator whole before sending it, so ASGI
    requests get an async iterator; WSGI and the test client get the sync one.
    """
    content = _async_chunks(chunks) if isinstance(request, ASGIRequest) else chunks
    response = StreamingHttpResponse(content, content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    response["X-Content-Type-Options"] = "nosniff"
    response["Cache-Control"] = "no-store"
    return response


def header_line(header: list[str]) -> str:
    return next(stream_rows(header, []))


def report_rows(lines: Iterable[BillingLine], period: Period) -> Iterator[list]:
    """One row per billing line (a session's part for one client), as on the report page.

    Amounts are in the client's currency (the `currency` column); `provider_cost_usd` is what
    the providers charged, `exchange_rate` the rate(s) it was converted at (";" between several).
    """
    tz = period.tz
    period_start, period_end = iso(period.start, tz), iso(period.end, tz)
    client_cells: dict = {}  # the client's columns, escaped once per client
    for ln in lines:
        t = ln.terms
        cells = client_cells.get(t.client_id)
        if cells is None:
            cells = client_cells[t.client_id] = (escape_cell(t.slug), escape_cell(t.name), escape_cell(t.currency))
        yield [
            cells[0],
            cells[1],
            str(ln.session_id),
            escape_cell(ln.session_name),
            escape_cell(ln.username),
            iso(ln.started_at, tz),
            iso(ln.ended_at, tz),
            period_start,
            period_end,
            ln.seconds,
            ln.billable_minutes,
            amount_text(ln.billable_hours, 4),
            amount_text(t.hourly_rate),
            amount_text(ln.time_amount),
            ln.messages,
            ln.tokens,
            ln.unpriced,
            amount_text(ln.llm_cost_raw, 6),
            ";".join(amount_text(rate, 6) for rate in ln.rates_used),
            ln.unconverted,
            amount_text(ln.llm_cost),
            amount_text(t.llm_markup_percent),
            amount_text(ln.markup),
            amount_text(ln.total),
            cells[2],
            escape_cell(ln.invoice_number or ""),
        ]


def invoice_rows(invoice, tz) -> Iterator[list]:
    """One row per invoice line, then the tax line when there is tax: the amounts add up to the total.

    A credit note's amounts are negative here (it is stored positive), so an export of invoices
    and their credit notes nets out.
    """
    client = invoice.client
    sign = invoice.sign
    head = [
        escape_cell(invoice.number or ""),
        invoice.kind,
        escape_cell(invoice.credit_for.number if invoice.credit_for_id else ""),
        invoice.status,
        iso(invoice.issued_at, tz),
        escape_cell(client.slug),
        escape_cell(client.name),
        invoice.period_start.isoformat(),
        invoice.period_end.isoformat(),
    ]
    position = 0
    for line in invoice.lines.all().order_by("position").iterator(chunk_size=2000):
        position = line.position
        yield [
            *head,
            line.position,
            line.kind,
            str(line.session_id or ""),
            escape_cell(line.description),
            amount_text(line.quantity, 6 if line.kind == "llm" else 4 if line.unit == "hours" else 2),
            escape_cell(line.unit),
            amount_text(line.unit_price, 6 if line.kind in ("llm", "markup") else 2),
            amount_text(sign * line.amount),
            escape_cell(invoice.currency),
            "" if line.usd_cost is None else amount_text(line.usd_cost, 6),
            "" if line.exchange_rate is None else amount_text(line.exchange_rate, 6),
            iso(line.exchange_rate_from, tz),
        ]
    if invoice.tax_total:
        yield [
            *head,
            position + 1,
            "tax",
            "",
            escape_cell(f"Tax {amount_text(invoice.tax_rate_percent)}% on {amount_text(invoice.subtotal)}"),
            amount_text(invoice.subtotal),
            escape_cell(invoice.currency),
            amount_text(invoice.tax_rate_percent / 100, 6),
            amount_text(sign * invoice.tax_total),
            escape_cell(invoice.currency),
            "",
            "",
            "",
        ]
