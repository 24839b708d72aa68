"""On PostgreSQL the heavy reads run in SQL: they must equal the Python reference exactly."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.db import connection
from django.utils import timezone

from billing import csv_export, pg_reports
from billing.models import SessionMessageTotals
from billing.reports import PERIOD_CUSTOM, Period, grand_total
from billing.selectors import iter_billing_lines, report_for_period
from billing.services import invoice_create_draft, invoice_issue
from billing.tests.helpers import NY, at, march, work
from sessions_app.models import SessionMessage
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
    rows = pg_reports.client_rows(period=march(), now=now)
    total = grand_total(rows)
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
    rows = pg_reports.client_rows(period=march(), now=timezone.now())
    total = grand_total(rows)
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


def _totals_from_messages() -> dict:
    with connection.cursor() as cur:
        cur.execute(
            "SELECT session_id, domain_id, COUNT(*), COALESCE(SUM(tokens), 0), COALESCE(SUM(cost_usd), 0),"
            " COUNT(*) FILTER (WHERE cost_usd IS NULL AND role <> 'user'), MIN(timestamp), MAX(timestamp)"
            " FROM ollama_session_messages WHERE copied_from_id IS NULL AND NOT is_imported GROUP BY 1, 2"
        )
        return {(r[0], r[1]): r[2:] for r in cur.fetchall()}


def assert_totals_exact():
    """The trigger-kept totals are the messages' own, and their bounds hold every message."""
    expected = _totals_from_messages()
    kept = {
        (t.session_id, t.domain_id): t
        for t in SessionMessageTotals.objects.all()
        if t.messages or (t.session_id, t.domain_id) in expected
    }
    assert kept.keys() == expected.keys()
    for key, (messages, tokens, cost, unpriced, first, last) in expected.items():
        t = kept[key]
        assert (t.messages, t.tokens, t.cost, t.unpriced) == (messages, tokens, cost, unpriced)
        assert t.first_at <= first and t.last_at >= last
    for t in SessionMessageTotals.objects.exclude(pk__in=[t.pk for t in kept.values()]):
        assert (t.messages, t.tokens, t.cost, t.unpriced) == (0, 0, 0, 0)


@pytest.mark.django_db
def test_message_totals_follow_every_write(owner, client_acme, client_globex):
    session = work(user=owner, client=client_acme, start=at(2, 9), seconds=600, costs=["0.125", None, "0.5"])
    assert_totals_exact()
    first = SessionMessage.objects.get(session=session, seq=1)
    first.cost_usd = Decimal("0.200001")
    first.tokens = 777
    first.save()
    assert_totals_exact()
    second = SessionMessage.objects.get(session=session, seq=2)
    second.domain = client_globex  # moved to another client
    second.timestamp = at(20, 9)  # and in time
    second.save()
    assert_totals_exact()
    SessionMessage.objects.filter(session=session, seq=3).update(is_imported=True)
    assert_totals_exact()
    copy = MessageFactory(session=session, seq=4, role="assistant", domain=client_acme, cost_usd=Decimal("9"))
    assert_totals_exact()
    SessionMessage.objects.filter(pk=copy.pk).update(copied_from=first)  # a branch copy is not billed
    assert_totals_exact()
    SessionMessage.objects.filter(session=session, seq=3).update(is_imported=False, cost_usd=None, role="user")
    assert_totals_exact()
    first.delete()
    assert_totals_exact()
    SessionMessage.objects.filter(session=session).update(content="edited")  # no billed field: no change
    assert_totals_exact()
    session.delete()
    assert_totals_exact()
    assert not SessionMessageTotals.objects.exists()


@pytest.mark.django_db
def test_rebuilt_message_totals_equal_the_kept_ones(awkward_month):
    before = {
        (t.session_id, t.domain_id): (t.messages, t.tokens, t.cost, t.unpriced, t.first_at, t.last_at)
        for t in SessionMessageTotals.objects.all()
    }
    assert before
    assert pg_reports.rebuild_message_totals() == len(before)
    after = {
        (t.session_id, t.domain_id): (t.messages, t.tokens, t.cost, t.unpriced, t.first_at, t.last_at)
        for t in SessionMessageTotals.objects.all()
    }
    assert after == before


@pytest.mark.django_db
@pytest.mark.parametrize("moved", [False, True])
def test_sessions_across_the_period_edges_are_billed_whole_where_they_ended(staff, owner, client_acme, moved):
    """Issue 14 changed this rule: a part is billed whole in the period where its session ended.

    It used to be cut at the period's edges (its messages inside counted, the rest left to
    the neighbouring period); now every message of a session that ended in March is March's,
    wherever its timestamp lies, and none of one that ended in April.
    """
    early = work(user=owner, client=client_acme, start=dt.datetime(2026, 2, 28, 23, 0, tzinfo=NY), seconds=7200)
    MessageFactory(session=early, seq=1, role="assistant", domain=client_acme, cost_usd=Decimal("1.11"),
                   timestamp=dt.datetime(2026, 2, 28, 23, 30, tzinfo=NY))  # fmt: skip
    MessageFactory(session=early, seq=2, role="assistant", domain=client_acme, cost_usd=Decimal("2.22"),
                   timestamp=dt.datetime(2026, 3, 1, 0, 30, tzinfo=NY))  # fmt: skip
    late = work(user=owner, client=client_acme, start=dt.datetime(2026, 3, 31, 23, 0, tzinfo=NY), seconds=7200)
    MessageFactory(session=late, seq=1, role="assistant", domain=client_acme, cost_usd=None,
                   timestamp=dt.datetime(2026, 3, 31, 23, 30, tzinfo=NY))  # fmt: skip
    MessageFactory(session=late, seq=2, role="assistant", domain=client_acme, cost_usd=Decimal("4.44"),
                   timestamp=dt.datetime(2026, 4, 1, 0, 30, tzinfo=NY))  # fmt: skip
    work(user=owner, client=client_acme, start=at(10), seconds=60, costs=["0.01"])
    if moved:
        # A message moved out of the period leaves the bounds wide: still summed exactly.
        SessionMessage.objects.filter(session=early, seq=2).update(
            timestamp=dt.datetime(2026, 2, 28, 23, 45, tzinfo=NY)
        )
    now = timezone.now()
    reference = report_for_period(period=march(), user=staff, now=now)
    total = grand_total(pg_reports.client_rows(period=march(), now=now))
    fields = ("sessions", "seconds", "messages", "tokens", "llm_cost_raw", "unpriced", "llm_cost", "total")
    assert {f: getattr(total, f) for f in fields} == {f: getattr(reference.total, f) for f in fields}
    assert total.messages == 3 and total.unpriced == 0  # early's two and the tenth's one; late is April's
    python = "".join(
        csv_export.stream_rows(
            csv_export.REPORT_HEADER,
            csv_export.report_rows(iter_billing_lines(period=march(), user=staff, now=now), march()),
        )
    )
    sql = csv_export.header_line(csv_export.REPORT_HEADER) + "".join(pg_reports.csv_lines(period=march(), now=now))
    assert sql == python
