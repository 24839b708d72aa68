"""On PostgreSQL the heavy reads run in SQL: they must equal the Python reference exactly."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.db import connection
from django.utils import timezone

from billing import csv_export, pg_reports
from billing.reports import PERIOD_CUSTOM, Period
from billing.selectors import iter_billing_lines, report_for_period
from billing.services import invoice_create_draft, invoice_issue
from billing.tests.helpers import NY, at, march, work
from tests.factories import ClientFactory, MessageFactory, SegmentFactory, UserFactory

pytestmark = pytest.mark.skipif(connection.vendor != "postgresql", reason="the SQL fast path is PostgreSQL only")


@pytest.fixture
def awkward_month(owner, colleague, staff, client_acme, client_globex):
    """Edge cases for both paths: odd increments, markups, switches, unknown prices, odd names."""
    odd = ClientFactory(
        slug="odd-7",
        name='+Odd, "quoted" client',
        hourly_rate=Decimal("99.99"),
        billing_increment_minutes=7,
        llm_markup_percent=Decimal("12.5"),
    )
    work(user=owner, client=client_acme, start=at(2, 9), seconds=361, costs=["0.125", "0.0051"], name="=cmd|x")
    work(user=colleague, client=odd, start=at(3, 8, 15, 1), seconds=421, costs=["0.333333", None], name="line\nbreak")
    session = work(user=owner, client=client_acme, start=at(4), seconds=600, costs=["1.005"], name="-switch, to globex")
    SegmentFactory(session=session, domain=client_globex, started_at=at(4, 10, 10), ended_at=at(4, 10, 40))
    MessageFactory(
        session=session,
        seq=9,
        role="assistant",
        domain=client_globex,
        cost_usd=Decimal("0.004999"),
        timestamp=at(4, 10, 20),
    )
    work(user=owner, client=odd, start=at(31, 23, 0), ended=False, name="")  # open: runs to the period end
    work(
        user=owner,
        client=client_acme,
        start=dt.datetime(2026, 2, 28, 23, 30, 0, 250000, tzinfo=NY),
        seconds=3600,
        name="\tcarried over",
    )
    billed = work(user=colleague, client=client_globex, start=at(5), seconds=901, costs=["2"], name="@billed")
    invoice_issue(
        invoice=invoice_create_draft(
            client=client_globex, period_start=at(5).date(), period_end=at(5).date(), user=staff
        ),
        user=staff,
    )
    return billed


@pytest.mark.django_db
def test_sql_client_rows_equal_the_python_report(staff, awkward_month):
    now = timezone.now()
    reference = report_for_period(period=march(), user=staff, now=now)
    rows, total = pg_reports.client_rows(period=march(), now=now)
    fields = ("sessions", "seconds", "billable_minutes", "messages", "tokens", "llm_cost_raw", "unpriced",
              "open_sessions", "time_amount", "llm_cost", "markup", "total")  # fmt: skip
    assert [r.key for r in rows] == [r.key for r in reference.rows]
    for fast, slow in zip(rows, reference.rows, strict=True):
        assert {f: getattr(fast.totals, f) for f in fields} == {f: getattr(slow.totals, f) for f in fields}
    assert {f: getattr(total, f) for f in fields} == {f: getattr(reference.total, f) for f in fields}


@pytest.mark.django_db
@pytest.mark.parametrize("tz", ["America/New_York", "Asia/Kolkata", "UTC"])
def test_sql_csv_is_byte_identical_to_the_python_csv(staff, owner, awkward_month, tz):
    from zoneinfo import ZoneInfo

    period = Period(kind=PERIOD_CUSTOM, first_day=dt.date(2026, 2, 1), last_day=dt.date(2026, 3, 31), tz=ZoneInfo(tz))
    now = timezone.now()
    for kwargs in ({}, {"user": owner}):
        python = "".join(
            csv_export.stream_rows(
                csv_export.REPORT_HEADER,
                csv_export.report_rows(
                    iter_billing_lines(period=period, user=kwargs.get("user", staff), mine="user" in kwargs, now=now),
                    period,
                ),
            )
        )
        sql = csv_export.header_line(csv_export.REPORT_HEADER) + "".join(
            pg_reports.csv_lines(period=period, now=now, **kwargs)
        )
        assert sql == python
        assert sql.count("\n") > 3


@pytest.mark.django_db
def test_sql_csv_for_one_client_matches_the_drilldown_lines(staff, client_acme, awkward_month):
    now = timezone.now()
    python = "".join(
        csv_export.stream_rows(
            csv_export.REPORT_HEADER,
            csv_export.report_rows(
                iter_billing_lines(period=march(), user=staff, client=client_acme, now=now), march()
            ),
        )
    )
    sql = csv_export.header_line(csv_export.REPORT_HEADER) + "".join(
        pg_reports.csv_lines(period=march(), now=now, client=client_acme)
    )
    assert sql == python


@pytest.mark.django_db
def test_sql_paths_handle_an_empty_period(staff):
    UserFactory(username="nobody")
    rows, total = pg_reports.client_rows(period=march(), now=timezone.now())
    assert rows == [] and total.total == 0
    assert list(pg_reports.csv_lines(period=march(), now=timezone.now())) == []


@pytest.mark.django_db
def test_a_cut_csv_download_leaves_the_connection_as_it_was(staff, awkward_month):
    from sessions_app.models import ChatSession

    before = ChatSession.objects.get(pk=awkward_month.pk).started_at
    lines = pg_reports.csv_lines(period=march(), now=timezone.now())
    next(lines)
    lines.close()  # the client went away mid-download
    assert ChatSession.objects.get(pk=awkward_month.pk).started_at == before
    with connection.cursor() as cur:
        cur.execute("SELECT current_setting('TimeZone')")
        assert cur.fetchone()[0] == "UTC"


@pytest.mark.django_db(transaction=True)
def test_concurrent_issues_get_distinct_consecutive_numbers():
    import threading

    from django.db import connections

    from billing.models import Invoice

    staff = UserFactory(username="issuer", is_staff=True)
    drafts = []
    for i in range(4):
        client = ClientFactory(slug=f"race-{i}", name=f"Race {i}")
        work(user=staff, client=client, start=at(2 + i), seconds=600, costs=["1.00"])
        drafts.append(
            invoice_create_draft(client=client, period_start=at(1).date(), period_end=at(31).date(), user=staff)
        )
    barrier = threading.Barrier(len(drafts))
    errors = []

    def issue(draft):
        try:
            barrier.wait()
            invoice_issue(invoice=draft, user=staff, now=at(31, 12))
        except Exception as exc:  # reported below, with the thread's own message
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=issue, args=(d,)) for d in drafts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    numbers = sorted(Invoice.objects.values_list("number", flat=True))
    assert numbers == ["INV-2026-0001", "INV-2026-0002", "INV-2026-0003", "INV-2026-0004"]
