"""Report pages and their CSV: staff report, client drill-down, monitoring, a consultant's own.

One view serves the HTML page and its CSV (`?format=csv`, streamed). Periods are picked in
the viewer's time zone (`?tz=`, else settings.TIME_ZONE) and queried in UTC.
"""

from __future__ import annotations

import functools
from decimal import Decimal

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import urlencode
from django.views.decorators.http import require_GET, require_POST

from billing import budgets, charts, csv_export, selectors
from billing.models import ClientDomain, ExchangeRate, Invoice
from billing.money import format_money, format_plain
from billing.reports import PERIOD_CHOICES, ROUNDING_RULE, PeriodError, parse_tz, period_from
from billing.services import ERR_NOT_ISSUED, BillingError, billing_tz, invoice_create_draft, invoice_summary_text

DRILLDOWN_SESSION_LIMIT = 500


def staff_required(view):
    """Anonymous → the sign-in page (302); signed-in non-staff → 403."""

    @functools.wraps(view)
    def wrapper(request, *args, **kwargs):
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        if not request.user.is_staff:
            raise PermissionDenied("Staff only.")
        return view(request, *args, **kwargs)

    return wrapper


def _period(request):
    tz = parse_tz(request.GET.get("tz"), settings.TIME_ZONE)
    return period_from(
        kind=request.GET.get("period"),
        start=request.GET.get("start"),
        end=request.GET.get("end"),
        tz=tz,
        now=timezone.now(),
    )


def _wants_csv(request) -> bool:
    return request.GET.get("format", "").lower() == "csv"


def _bad_period(request, error: PeriodError, template: str, extra: dict | None = None) -> HttpResponse:
    context = {
        "error": str(error),
        "period_choices": PERIOD_CHOICES,
        "form": _form_values(request, None),
        "rounding_rule": ROUNDING_RULE,
        **(extra or {}),
    }
    return render(request, template, context, status=400)


def _form_values(request, period) -> dict:
    return {
        "period": request.GET.get("period") or (period.kind if period else "this_month"),
        "start": request.GET.get("start") or (period.first_day.isoformat() if period else ""),
        "end": request.GET.get("end") or (period.last_day.isoformat() if period else ""),
        "tz": request.GET.get("tz") or (period.tz.key if period else settings.TIME_ZONE),
    }


def _csv_url(request) -> str:
    params = request.GET.copy()
    params["format"] = "csv"
    return f"{request.path}?{params.urlencode()}"


def _report_csv(request, period, filename: str, *, client=None, mine: bool = False):
    chunks = selectors.report_csv_chunks(period=period, user=request.user, mine=mine, client=client)
    return csv_export.csv_text_response(request, filename, chunks)


def _client_charts(rows) -> dict:
    # Bars share one scale, so they show what the providers charged, in the one currency it is
    # stored in (USD); each label adds what is billed for it in the client's own currency.
    cost = [
        charts.Bar(
            r.label,
            r.totals.llm_cost_raw,
            f"{format_money(r.totals.llm_cost_raw, 'USD')} → billed {format_money(r.totals.llm_amount, r.currency)}",
        )
        for r in rows
    ]
    hours = [charts.Bar(r.label, r.totals.billable_hours, f"{format_plain(r.totals.billable_hours)} h") for r in rows]
    return {
        "cost_chart": charts.bar_chart(
            title="Provider cost per client (USD)",
            desc="Horizontal bars: what the providers charged for each client's calls in the period, in USD; "
            "each label adds the LLM amount billed with markup in the client's currency, as in the table below.",
            bars=cost,
            colour=charts.PALETTE[0],
        ),
        "hours_chart": charts.bar_chart(
            title="Billable hours per client",
            desc="Horizontal bars: billable hours (rounded up per session) for each client in the period.",
            bars=hours,
            colour=charts.PALETTE[2],
        ),
    }


def _daily_chart(period, daily, names, what: str):
    return charts.stacked_daily_chart(
        title=f"Provider cost per day by {what} (USD)",
        desc=f"One column per day from {period.first_day} to {period.last_day} ({period.tz.key}), stacked by {what}: "
        "what each day's calls cost in USD, by the call's own day; hover a column for its figures.",
        days=period.days,
        series=charts.top_series(daily, names),
        currency="USD",
    )


@require_GET
@login_required
def report(request):
    """The staff report: one row per client. Consultants are sent to their own report."""
    if not request.user.is_staff:
        query = request.META.get("QUERY_STRING")
        return redirect(reverse("billing:mine") + (f"?{query}" if query else ""))
    try:
        period = _period(request)
    except PeriodError as exc:
        return _bad_period(request, exc, "billing/report.html")
    if _wants_csv(request):
        return _report_csv(request, period, f"report-{period.first_day}-{period.last_day}.csv")
    data = selectors.staff_report(period=period, user=request.user)
    daily = selectors.daily_cost(period=period, user=request.user)
    names = {r.key: r.label for r in data.rows}
    if any(k not in names for values in daily.values() for k in values):
        names.update(dict(ClientDomain.objects.values_list("pk", "name")))
    context = {
        "period": period,
        "data": data,
        "form": _form_values(request, period),
        "period_choices": PERIOD_CHOICES,
        "rounding_rule": ROUNDING_RULE,
        "csv_url": _csv_url(request),
        "query": urlencode(period.as_query()),
        "daily_chart": _daily_chart(period, daily, names, "client"),
        **_client_charts(data.rows),
    }
    return render(request, "billing/report.html", context)


@require_GET
@staff_required
def client_report(request, slug: str):
    """One client's period: consultants, models and sessions; its CSV has the same lines."""
    client = get_object_or_404(ClientDomain, slug=slug)
    try:
        period = _period(request)
    except PeriodError as exc:
        return _bad_period(request, exc, "billing/client_report.html", {"client": client})
    if _wants_csv(request):
        return _report_csv(request, period, f"{client.slug}-{period.first_day}-{period.last_day}.csv", client=client)
    drill = selectors.client_drilldown(period=period, client=client, user=request.user)
    daily = selectors.daily_cost(period=period, user=request.user, client=client, by="model")
    context = {
        "client": client,
        "period": period,
        "drill": drill,
        "data": drill.report,
        "total": drill.report.total,
        "sessions": drill.report.lines[:DRILLDOWN_SESSION_LIMIT],
        "sessions_cut": max(len(drill.report.lines) - DRILLDOWN_SESSION_LIMIT, 0),
        "form": _form_values(request, period),
        "period_choices": PERIOD_CHOICES,
        "rounding_rule": ROUNDING_RULE,
        "csv_url": _csv_url(request),
        "daily_chart": _daily_chart(period, daily, {}, "model"),
        "invoices": Invoice.objects.filter(client=client).order_by("-created_at")[:10],
        "rate_now": ExchangeRate.objects.filter(currency=client.currency, effective_from__lte=timezone.now())
        .order_by("-effective_from")
        .first(),
        "billing_tz": settings.TIME_ZONE,
        "session_admin": reverse("admin:sessions_app_chatsession_changelist"),
    }
    return render(request, "billing/client_report.html", context)


@require_POST
@staff_required
def client_invoice_draft(request, slug: str):
    """Draft an invoice for the client and the dates posted (from the drill-down page)."""
    client = get_object_or_404(ClientDomain, slug=slug)
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
        back = reverse("billing:client", args=[client.slug])
        return redirect(
            f"{back}?{urlencode({'period': 'custom', 'start': request.POST.get('start', ''), 'end': request.POST.get('end', '')})}"
        )
    messages.success(request, f"Drafted {invoice_summary_text(invoice)}. Check it, then issue it.")
    return redirect(reverse("billing:invoice", args=[invoice.pk]))


@require_GET
@staff_required
def monitoring(request):
    """What to watch: durations, context carried, cost per client, stuck sessions, unknown prices."""
    try:
        period = _period(request)
    except PeriodError as exc:
        return _bad_period(request, exc, "billing/monitoring.html")
    now = timezone.now()
    distribution = selectors.duration_distribution(period=period)
    per_client = selectors.cost_per_client(period=period)
    context = {
        "period": period,
        "form": _form_values(request, period),
        "period_choices": PERIOD_CHOICES,
        "distribution": distribution,
        "distribution_chart": charts.bar_chart(
            title="Session duration distribution",
            desc="Number of ended sessions started in the period, by how long they lasted.",
            bars=[charts.Bar(b["label"], Decimal(b["count"]), str(b["count"])) for b in distribution],
            colour=charts.PALETTE[4],
        ),
        "carry": selectors.context_carry_stats(period=period),
        "per_client": per_client,
        "per_client_chart": charts.bar_chart(
            title="LLM cost per client (raw, before markup)",
            desc="Horizontal bars: the summed cost of billable messages per client in the period.",
            bars=[
                charts.Bar(r["domain__name"], r["cost"] or Decimal(0), format_money(r["cost"] or Decimal(0), "USD"))
                for r in per_client
            ],
        ),
        "budgets": budgets.budget_overview(now=now),
        "stuck": list(selectors.stuck_sessions(now=now)[: selectors.STUCK_LIMIT]),
        "idle_timeout": settings.SESSION_IDLE_TIMEOUT,
        "turn_stale": int(selectors.turn_stale_after().total_seconds()),
        "unpriced_models": selectors.unpriced_by_model(period=period),
        "unpriced": list(selectors.unpriced_calls(period=period)[: selectors.UNPRICED_LIMIT]),
    }
    return render(request, "billing/monitoring.html", context)


@require_GET
@login_required
def my_report(request):
    """A consultant's own time and cost per client: their sessions only, whoever asks."""
    try:
        period = _period(request)
    except PeriodError as exc:
        return _bad_period(request, exc, "billing/mine.html")
    if _wants_csv(request):
        return _report_csv(request, period, f"my-report-{period.first_day}-{period.last_day}.csv", mine=True)
    data = selectors.report_for_period(period=period, user=request.user, mine=True)
    context = {
        "period": period,
        "data": data,
        "form": _form_values(request, period),
        "period_choices": PERIOD_CHOICES,
        "rounding_rule": ROUNDING_RULE,
        "csv_url": _csv_url(request),
        **_client_charts(data.rows),
    }
    return render(request, "billing/mine.html", context)


@require_GET
@staff_required
def invoice_csv(request, pk):
    """An issued invoice as CSV: one row per invoice line."""
    invoice = get_object_or_404(Invoice.objects.select_related("client"), pk=pk)
    if invoice.number is None:  # a draft; issued, void and credit notes export
        return HttpResponse(ERR_NOT_ISSUED, status=409, content_type="text/plain; charset=utf-8")
    return csv_export.csv_response(
        request, f"{invoice.number}.csv", csv_export.INVOICE_HEADER, csv_export.invoice_rows(invoice, billing_tz())
    )
