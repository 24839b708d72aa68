"""Client currencies, dated exchange rates and dated terms: converted per call, never 1:1, never rewritten."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import transaction

from billing.models import TERMS_EPOCH, ClientTerms, ExchangeRate, InvoiceLine
from billing.rates import RecordLocked, exchange_rates_load
from billing.reports import MixedCurrencies
from billing.selectors import report_for_period
from billing.services import ERR_MISSING_RATE, BillingError, invoice_create_draft, invoice_issue
from billing.signals import ERR_CURRENCY_FIXED
from billing.tests.helpers import NY, at, march, work
from tests.factories import ClientFactory, MessageFactory

MARCH = {"period_start": dt.date(2026, 3, 1), "period_end": dt.date(2026, 3, 31)}


@pytest.fixture
def euro(db):
    return ClientFactory(slug="euro", name="Euro GmbH", currency="EUR", hourly_rate=Decimal("100.00"))


def rate(currency: str, value: str, when: dt.datetime) -> ExchangeRate:
    return ExchangeRate.objects.create(currency=currency, usd_rate=Decimal(value), effective_from=when)


@pytest.mark.django_db
def test_each_call_is_converted_at_the_rate_in_force_at_its_time(owner, staff, euro):
    rate("EUR", "0.900000", at(1, 0))
    rate("EUR", "0.950000", at(2, 10, 0, 1))  # takes effect with the second answer (a second later)
    session = work(user=owner, client=euro, start=at(2, 10), seconds=360, costs=["1.000000", "2.000000"])
    line = report_for_period(period=march(), user=staff).lines[0]
    assert line.currency == "EUR"
    assert [(c.rate, c.usd) for c in line.charges] == [(Decimal("0.9"), Decimal("1")), (Decimal("0.95"), Decimal("2"))]
    assert line.llm_cost == Decimal("0.90") + Decimal("1.90")
    assert line.llm_cost_raw == Decimal("3")  # the provider cost stays in USD
    assert line.time_amount == Decimal("10.00")  # 6 minutes at 100 EUR/h: time is priced in EUR directly

    invoice = invoice_create_draft(client=euro, user=staff, **MARCH)
    assert invoice.currency == "EUR" and invoice.total == line.total
    llm = list(invoice.lines.filter(kind="llm").order_by("position"))
    assert [(x.exchange_rate, x.usd_cost, x.amount) for x in llm] == [
        (Decimal("0.9"), Decimal("1"), Decimal("0.90")),
        (Decimal("0.95"), Decimal("2"), Decimal("1.90")),
    ]
    for x in llm:  # the printed quantity × unit price is the amount
        assert (x.quantity * x.unit_price).quantize(Decimal("0.01")) == x.amount
    assert {x.session_id for x in llm} == {session.pk}


@pytest.mark.django_db
def test_a_missing_rate_is_flagged_never_converted_one_to_one(owner, staff, euro):
    work(user=owner, client=euro, start=at(3), seconds=60, costs=["1.500000"])
    data = report_for_period(period=march(), user=staff)
    line = data.lines[0]
    assert (line.llm_cost, line.unconverted) == (Decimal("0.00"), 1)
    assert data.unconverted == 1
    invoice = invoice_create_draft(client=euro, user=staff, **MARCH)
    assert "no EUR exchange rate in force" in invoice.lines.get(kind="llm").description
    with pytest.raises(BillingError) as refused:
        invoice_issue(invoice=invoice, user=staff)
    assert refused.value.message == ERR_MISSING_RATE.format(count=1, currency="EUR")


@pytest.mark.django_db
def test_no_total_adds_two_currencies(owner, staff, euro, client_acme):
    rate("EUR", "0.9", at(1, 0))
    work(user=owner, client=euro, start=at(4), seconds=600, costs=["1"])
    work(user=owner, client=client_acme, start=at(5), seconds=600, costs=["1"])
    data = report_for_period(period=march(), user=staff)
    assert [t.currency for t in data.totals] == ["EUR", "USD"]
    # 600 s → 12 minutes: 0.2 h × 100 EUR + 0.90 EUR; 0.2 h × 150 USD + 1.00 USD.
    assert [t.total for t in data.totals] == [Decimal("20.90"), Decimal("31.00")]
    with pytest.raises(MixedCurrencies):
        data.total  # noqa: B018  (a single total of two currencies does not exist)


@pytest.mark.django_db
def test_a_used_rate_cannot_change_and_no_rate_may_take_over_billed_calls(owner, staff, euro):
    used = rate("EUR", "0.9", at(1, 0))
    work(user=owner, client=euro, start=at(4), seconds=60, costs=["1"])
    invoice = invoice_issue(invoice=invoice_create_draft(client=euro, user=staff, **MARCH), user=staff)
    used.usd_rate = Decimal("0.8")
    with pytest.raises(RecordLocked, match=f"used by issued invoice {invoice.number}"):
        used.save()
    # Django deletes inside an atomic block without a savepoint: give it one, as a view would.
    with pytest.raises(RecordLocked, match=f"used by issued invoice {invoice.number}"), transaction.atomic():
        ExchangeRate.objects.get(pk=used.pk).delete()
    with pytest.raises(RecordLocked, match="would change issued invoice"):
        rate("EUR", "0.7", at(3, 0))
    rate("EUR", "0.7", at(4, 11))  # after the last billed call: fine
    assert InvoiceLine.objects.get(invoice=invoice, kind="llm").exchange_rate == Decimal("0.9")


@pytest.mark.django_db
def test_changing_a_rate_never_rewrites_an_earlier_period(owner, staff, client_acme):
    work(user=owner, client=client_acme, start=at(4), seconds=3600)
    february = report_for_period(period=march(), user=staff).total.total
    client_acme.hourly_rate = Decimal("200.00")
    client_acme.save()
    rows = list(ClientTerms.objects.filter(client=client_acme).order_by("effective_from"))
    assert (rows[0].effective_from, rows[0].hourly_rate) == (TERMS_EPOCH, Decimal("150.00"))
    assert rows[-1].hourly_rate == Decimal("200.00")
    assert report_for_period(period=march(), user=staff).total.total == february == Decimal("150.00")


@pytest.mark.django_db
def test_terms_that_would_reprice_an_issued_part_are_refused(owner, staff, client_acme):
    work(user=owner, client=client_acme, start=at(4), seconds=3600)
    invoice = invoice_issue(invoice=invoice_create_draft(client=client_acme, user=staff, **MARCH), user=staff)
    with pytest.raises(RecordLocked, match=invoice.number):
        ClientTerms.objects.create(
            client=client_acme,
            effective_from=at(1),
            hourly_rate=Decimal("1"),
            llm_markup_percent=Decimal("0"),
            billing_increment_minutes=6,
        )
    client_acme.hourly_rate = Decimal("175.00")
    client_acme.save()  # from now on: allowed, the invoiced work keeps its terms
    assert report_for_period(period=march(), user=staff).total.total == invoice.total


@pytest.mark.django_db
def test_a_clients_currency_is_fixed_once_invoiced(owner, staff, euro):
    rate("EUR", "0.9", at(1, 0))
    work(user=owner, client=euro, start=at(4), seconds=60)
    invoice_issue(invoice=invoice_create_draft(client=euro, user=staff, **MARCH), user=staff)
    euro.currency = "GBP"
    with pytest.raises(RecordLocked) as refused:
        euro.save()
    assert str(refused.value) == ERR_CURRENCY_FIXED.format(client="Euro GmbH", currency="EUR", new="GBP")


@pytest.mark.django_db
def test_load_exchange_rates_imports_a_csv_once_and_all_or_nothing(tmp_path):
    good = tmp_path / "rates.csv"
    good.write_text("currency,usd_rate,effective_from\nEUR,0.9231,2026-03-01\ngbp,0.79,2026-03-01T00:00:00+00:00\n")
    out = StringIO()
    call_command("load_exchange_rates", str(good), stdout=out)
    assert "2 added, 0 already there" in out.getvalue()
    assert ExchangeRate.objects.get(currency="EUR").effective_from == dt.datetime(2026, 3, 1, tzinfo=NY)
    out = StringIO()
    call_command("load_exchange_rates", str(good), stdout=out)
    assert "0 added, 2 already there" in out.getvalue()

    bad = tmp_path / "bad.csv"
    bad.write_text("currency,usd_rate,effective_from\nCHF,0.88,2026-04-01\nUSD,1,2026-04-01\nJPY,-3,soon\n")
    with pytest.raises(CommandError) as refused:
        call_command("load_exchange_rates", str(bad), stdout=StringIO())
    message = str(refused.value)
    assert "Nothing was loaded" in message and "Line 3" in message and "Line 4" in message
    assert not ExchangeRate.objects.filter(currency="CHF").exists()
    assert exchange_rates_load("cur,rate\n").errors[0].startswith("The first line must name the columns")


@pytest.mark.django_db
def test_an_archived_session_keeps_its_cost_in_reports_and_invoices(owner, staff, client_acme):
    from sessions_app.archive import session_archive, session_restore

    session = work(user=owner, client=client_acme, start=at(6), seconds=60, costs=["0.690357"])
    MessageFactory(session=session, seq=5, role="user", domain=client_acme, timestamp=at(6), cost_usd=Decimal("0"))
    before = report_for_period(period=march(), user=staff).total
    session_archive(session_id=session.pk)
    after = report_for_period(period=march(), user=staff).total
    assert (after.llm_cost_raw, after.messages, after.total) == (Decimal("0.690357"), 2, before.total)
    invoice = invoice_create_draft(client=client_acme, user=staff, **MARCH)
    assert invoice.lines.get(kind="llm").usd_cost == Decimal("0.690357")
    invoice.lines.all().delete()
    invoice.delete()
    session_restore(session_id=session.pk)
    assert report_for_period(period=march(), user=staff).total == before
