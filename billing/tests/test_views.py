"""Report pages and CSV: permissions, exact CSV, formula injection, bounded queries."""

from __future__ import annotations

import csv
import io
from decimal import Decimal

import pytest
from django.db import connections
from django.http import StreamingHttpResponse
from django.urls import reverse

from billing.csv_export import INVOICE_HEADER, REPORT_HEADER, escape_cell
from billing.services import invoice_create_draft, invoice_issue
from billing.tests.helpers import at, work
from tests.factories import ClientFactory, UsageFactory, UserFactory

MARCH = "period=custom&start=2026-03-01&end=2026-03-31&tz=America/New_York"


def _csv(response) -> list[list[str]]:
    assert isinstance(response, StreamingHttpResponse)
    body = b"".join(response.streaming_content).decode()
    return list(csv.reader(io.StringIO(body)))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("=1+1", "'=1+1"),
        ("+SUM(A1)", "'+SUM(A1)"),
        ("-2", "'-2"),
        ("@cmd", "'@cmd"),
        ("\tTAB", "'\tTAB"),
        ("\r=x", "'\r=x"),
        ("plain", "plain"),
        ("", ""),
    ],
)
def test_cells_that_look_like_formulas_are_escaped(value, expected):
    assert escape_cell(value) == expected


@pytest.mark.django_db
def test_report_csv_has_the_exact_header_and_one_row_per_line(staff_client, owner, client_acme):
    work(
        user=owner,
        client=client_acme,
        start=at(2, 9, 0),
        seconds=361,
        costs=["0.125", "0.0051"],
        name='=HYPERLINK("http://evil.example","x")',
    )
    response = staff_client.get(f"/reports/?{MARCH}&format=csv")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    rows = _csv(response)
    assert rows[0] == REPORT_HEADER
    assert len(rows) == 2
    row = dict(zip(REPORT_HEADER, rows[1], strict=True))
    session_id = row.pop("session_id")
    assert len(session_id) == 36
    assert row == {
        "client": "acme",
        "client_name": "Acme Corp",
        "session_name": '\'=HYPERLINK("http://evil.example","x")',
        "consultant": "olivia",
        "session_started_at": "2026-03-02T09:00:00-05:00",
        "session_ended_at": "2026-03-02T09:06:01-05:00",
        "period_start": "2026-03-01T00:00:00-05:00",
        "period_end": "2026-04-01T00:00:00-04:00",
        "seconds": "361",
        "billable_minutes": "12",
        "billable_hours": "0.2000",
        "hourly_rate": "150.00",
        "time_amount": "30.00",
        "messages": "2",
        "tokens": "200",
        "unpriced_calls": "0",
        "provider_cost_usd": "0.130100",  # issue 14: the USD cost and the rate it was converted at
        "exchange_rate": "1.000000",
        "unconverted_calls": "0",
        "llm_cost": "0.13",
        "markup_percent": "0.00",
        "llm_markup": "0.00",
        "line_total": "30.13",
        "currency": "USD",
        "invoice": "",
    }


@pytest.mark.django_db
def test_csv_totals_match_the_html_report(staff_client, owner, colleague, client_acme, client_globex):
    work(user=owner, client=client_acme, start=at(2), seconds=1000, costs=["0.333"])
    work(user=colleague, client=client_globex, start=at(3), seconds=901, costs=["0.335"])
    html = staff_client.get(f"/reports/?{MARCH}")
    rows = _csv(staff_client.get(f"/reports/?{MARCH}&format=csv"))[1:]
    csv_total = sum(Decimal(r[REPORT_HEADER.index("line_total")]) for r in rows)
    assert csv_total == html.context["data"].total.total
    assert f"{csv_total:.2f}" in html.content.decode()


@pytest.mark.django_db
def test_staff_report_states_the_rounding_rule_and_shows_charts(staff_client, owner, client_acme):
    work(user=owner, client=client_acme, start=at(2), seconds=600, costs=["1.00"])
    response = staff_client.get(f"/reports/?{MARCH}")
    page = response.content.decode()
    assert response.status_code == 200
    assert "ROUND_HALF_UP" in page and "rounded up per session" in page
    assert page.count('<svg class="chart" role="img"') == 3
    assert "<title" in page and "<desc" in page
    assert "Acme Corp" in page


@pytest.mark.django_db
def test_unknown_prices_are_flagged_on_the_report(staff_client, owner, client_acme):
    work(user=owner, client=client_acme, start=at(2), seconds=60, costs=[None])
    page = staff_client.get(f"/reports/?{MARCH}").content.decode()
    assert "1 call with unknown price" in page


@pytest.mark.django_db
def test_a_bad_period_is_a_clear_400_not_a_500(staff_client):
    response = staff_client.get("/reports/?period=custom&start=2026-03-09&end=2026-03-01")
    assert response.status_code == 400
    assert "The end date is before the start date." in response.content.decode()
    assert staff_client.get("/reports/?tz=Mars/Olympus").status_code == 400


@pytest.mark.django_db
def test_consultants_cannot_open_staff_reports(owner_client, client_acme):
    response = owner_client.get(f"/reports/?{MARCH}")
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("billing:mine"))
    assert owner_client.get(f"/reports/?{MARCH}&format=csv").status_code == 302
    assert owner_client.get(f"/reports/clients/acme/?{MARCH}").status_code == 403
    assert owner_client.get(f"/reports/clients/acme/?{MARCH}&format=csv").status_code == 403
    assert owner_client.get("/reports/monitoring/").status_code == 403
    assert (
        owner_client.post("/reports/clients/acme/invoice/", {"start": "2026-03-01", "end": "2026-03-31"}).status_code
        == 403
    )


@pytest.mark.django_db
def test_anonymous_visitors_are_sent_to_sign_in(client):
    for url in ("/reports/", "/reports/mine/", "/reports/monitoring/", "/reports/clients/acme/"):
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/")


@pytest.mark.django_db
def test_own_report_shows_only_the_consultants_figures(owner_client, owner, colleague, client_acme):
    work(user=owner, client=client_acme, start=at(2), seconds=600, costs=["1.11"], name="Mine")
    work(user=colleague, client=client_acme, start=at(2, 11), seconds=600, costs=["7.77"], name="Theirs")
    response = owner_client.get(f"/reports/mine/?{MARCH}")
    page = response.content.decode()
    assert response.status_code == 200
    assert "1.11" in page and "7.77" not in page
    rows = _csv(owner_client.get(f"/reports/mine/?{MARCH}&format=csv"))
    assert [r[REPORT_HEADER.index("session_name")] for r in rows[1:]] == ["Mine"]


@pytest.mark.django_db
def test_drilldown_lists_consultants_models_and_sessions(staff_client, owner, client_acme):
    work(user=owner, client=client_acme, start=at(2), seconds=600, costs=["1.00"], name="Deep dive")
    response = staff_client.get(f"/reports/clients/acme/?{MARCH}")
    page = response.content.decode()
    assert response.status_code == 200
    assert "olivia" in page and "openai:gpt-4o" in page and "Deep dive" in page
    rows = _csv(staff_client.get(f"/reports/clients/acme/?{MARCH}&format=csv"))
    assert rows[0] == REPORT_HEADER and len(rows) == 2


@pytest.mark.django_db
def test_drafting_from_the_report_opens_the_invoice_at_the_billing_desk(staff_client, owner, client_acme):
    # Issue 14: the draft opens at the billing desk (not the admin), and a second draft for the
    # same dates is refused with a message naming the first (it used to be allowed).
    work(user=owner, client=client_acme, start=at(2), seconds=600, costs=["1.00"])
    response = staff_client.post("/reports/clients/acme/invoice/", {"start": "2026-03-01", "end": "2026-03-31"})
    assert response.status_code == 302
    assert response["Location"].startswith("/reports/invoices/")
    again = staff_client.post(
        "/reports/clients/acme/invoice/", {"start": "2026-03-01", "end": "2026-03-31"}, follow=True
    )
    assert "Acme Corp already has a draft for 2026-03-01 – 2026-03-31" in again.content.decode()


@pytest.mark.django_db
def test_issued_invoice_exports_as_csv_and_drafts_do_not(staff_client, staff, owner, client_acme):
    work(user=owner, client=client_acme, start=at(2, 9), seconds=361, costs=["0.125"], name="-rm -rf")
    draft = invoice_create_draft(client=client_acme, period_start=at(1).date(), period_end=at(31).date(), user=staff)
    assert staff_client.get(f"/reports/invoices/{draft.pk}.csv").status_code == 409
    invoice = invoice_issue(invoice=draft, user=staff, now=at(31, 12))
    rows = _csv(staff_client.get(f"/reports/invoices/{invoice.pk}.csv"))
    assert rows[0] == INVOICE_HEADER
    assert [r[INVOICE_HEADER.index("kind")] for r in rows[1:]] == ["time", "llm"]
    time_row = dict(zip(INVOICE_HEADER, rows[1], strict=True))
    assert time_row["invoice"] == "INV-2026-0001"
    assert time_row["issued_at"] == "2026-03-31T12:00:00-04:00"
    assert (time_row["quantity"], time_row["unit_price"], time_row["amount"]) == ("0.2000", "150.00", "30.00")
    assert time_row["description"].startswith("'-rm -rf")
    assert sum(Decimal(r[INVOICE_HEADER.index("amount")]) for r in rows[1:]) == invoice.total


@pytest.mark.django_db
def test_monitoring_shows_stuck_sessions_and_unknown_prices(staff_client, owner, client_acme):
    work(user=owner, client=client_acme, start=at(2), ended=False, name="Forgotten tab")
    UsageFactory(user=owner, client=client_acme, provider="openai", model="gpt-9-unpriced", cost=None, created_at=at(3))
    page = staff_client.get(f"/reports/monitoring/?{MARCH}").content.decode()
    assert "Forgotten tab" in page
    assert "gpt-9-unpriced" in page
    assert "Session duration distribution" in page


def _populate(n: int, users: list, clients: list) -> None:
    for i in range(n):
        work(
            user=users[i % len(users)],
            client=clients[i % len(clients)],
            start=at(1 + i % 28, 9, i % 60),
            seconds=60 * (i + 1),
            costs=["0.10", None],
        )
        UsageFactory(user=users[i % len(users)], client=clients[i % len(clients)], cost=None, created_at=at(2))


@pytest.mark.django_db
@pytest.mark.parametrize("n", [2, 30])
def test_report_pages_run_a_bounded_number_of_queries(staff_client, django_assert_max_num_queries, n):
    users = [UserFactory(username=f"c{i}") for i in range(3)]
    clients = [ClientFactory(slug=f"q{i}", name=f"Q{i}") for i in range(3)]
    _populate(n, users, clients)
    with django_assert_max_num_queries(12):
        assert staff_client.get(f"/reports/?{MARCH}").status_code == 200
    with django_assert_max_num_queries(12):
        assert staff_client.get(f"/reports/clients/q0/?{MARCH}").status_code == 200
    with django_assert_max_num_queries(14):
        assert staff_client.get(f"/reports/monitoring/?{MARCH}").status_code == 200
    with django_assert_max_num_queries(12):
        response = staff_client.get(f"/reports/?{MARCH}&format=csv")
        assert len(_csv(response)) == n + 1


@pytest.mark.django_db
@pytest.mark.parametrize("n", [2, 30])
def test_billing_changelists_run_a_bounded_number_of_queries(staff_client, staff, django_assert_max_num_queries, n):
    users = [UserFactory(username=f"c{i}") for i in range(3)]
    clients = [ClientFactory(slug=f"q{i}", name=f"Q{i}") for i in range(3)]
    _populate(n, users, clients)
    for client in clients[: min(n, 3)]:
        invoice_create_draft(client=client, period_start=at(1).date(), period_end=at(31).date(), user=staff)
    for url in ("/admin/billing/invoice/", "/admin/billing/llmusage/", "/admin/sessions_app/chatsession/"):
        with django_assert_max_num_queries(20):
            assert staff_client.get(url).status_code == 200


@pytest.mark.django_db(transaction=True)
async def test_csv_streams_lazily_under_asgi(async_client):
    from asgiref.sync import sync_to_async

    def setup():
        staff = UserFactory(username="asgi-staff", is_staff=True)
        acme = ClientFactory(slug="acme", name="Acme Corp")
        for day in (2, 3, 4):
            work(user=staff, client=acme, start=at(day), seconds=600, costs=["0.10"])
        return staff

    staff = await sync_to_async(setup)()
    await async_client.aforce_login(staff)
    response = await async_client.get(f"/reports/?{MARCH}&format=csv")
    assert response.status_code == 200
    assert response.is_async  # an async iterator: daphne streams it instead of buffering it whole
    body = "".join([chunk.decode() async for chunk in response.streaming_content])
    rows = list(csv.reader(io.StringIO(body)))
    assert rows[0] == REPORT_HEADER and len(rows) == 4
    await sync_to_async(connections.close_all)()  # the sync thread's connection, so the test DB can be dropped
