"""The report math: rounding, reconciliation to the cent, periods, unknown prices."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.db.models import Sum

from billing.reports import (
    ERR_DATES_ORDER,
    Period,
    PeriodError,
    billable_minutes,
    money,
    period_from,
)
from billing.selectors import billing_lines, client_drilldown, report_for_period
from billing.tests.helpers import NY, at, march, work
from sessions_app.models import SessionMessage, SessionSegment
from tests.factories import ClientFactory, MessageFactory, SegmentFactory


@pytest.mark.parametrize(
    ("seconds", "increment", "expected"),
    [
        (0, 6, 0),
        (1, 6, 6),
        (359, 6, 6),
        (360, 6, 6),  # exactly 6 minutes
        (361, 6, 12),  # 6 minutes 1 second
        (720, 6, 12),
        (721, 6, 18),
        (900, 15, 15),
        (901, 15, 30),
        (3600, 60, 60),
        (3601, 1, 61),
    ],
)
def test_billable_minutes_round_up_to_the_increment(seconds, increment, expected):
    assert billable_minutes(seconds, increment) == expected


def test_money_rounds_half_up_to_the_cent():
    assert money(Decimal("0.005")) == Decimal("0.01")
    assert money(Decimal("0.004999")) == Decimal("0.00")
    assert money(Decimal("2.675")) == Decimal("2.68")  # float would give 2.67


def test_this_month_is_taken_in_the_viewers_time_zone():
    # 03:00 UTC on 1 March is still 28 February in New York.
    now = dt.datetime(2026, 3, 1, 3, 0, tzinfo=dt.UTC)
    period = period_from(kind="this_month", tz=NY, now=now)
    assert (period.first_day, period.last_day) == (dt.date(2026, 2, 1), dt.date(2026, 2, 28))
    assert period.start == dt.datetime(2026, 2, 1, 5, 0, tzinfo=dt.UTC)
    assert period.end == dt.datetime(2026, 3, 1, 5, 0, tzinfo=dt.UTC)
    last = period_from(kind="last_month", tz=NY, now=now)
    assert (last.first_day, last.last_day) == (dt.date(2026, 1, 1), dt.date(2026, 1, 31))


def test_custom_period_spans_whole_local_days_across_a_dst_change():
    period = period_from(kind="custom", start="2026-03-08", end="2026-03-08", tz=NY, now=at(20))
    assert (period.end - period.start) == dt.timedelta(hours=23)


def test_custom_period_rejects_an_end_before_its_start():
    with pytest.raises(PeriodError, match=ERR_DATES_ORDER):
        period_from(kind="custom", start="2026-03-09", end="2026-03-08", tz=NY, now=at(20))


@pytest.mark.django_db
def test_report_totals_equal_the_sums_of_messages_and_segments(owner, colleague, client_acme, client_globex):
    work(user=owner, client=client_acme, start=at(2), seconds=1000, costs=["0.123456", "0.000100"])
    work(user=colleague, client=client_acme, start=at(3), seconds=361, costs=["1.5"])
    work(user=owner, client=client_globex, start=at(4), seconds=3600, costs=["0.333333", "0.333333", "0.333334"])
    data = report_for_period(period=march(), user=_staff())

    segments = SessionSegment.objects.all()
    seconds = sum(int((s.ended_at - s.started_at).total_seconds()) for s in segments)
    cost = SessionMessage.objects.billable().aggregate(c=Sum("cost_usd"))["c"]
    assert data.total.seconds == seconds
    assert data.total.llm_cost_raw == cost
    assert data.total.messages == SessionMessage.objects.billable().count()
    for field in ("time_amount", "llm_cost", "markup", "total", "billable_minutes", "sessions"):
        assert getattr(data.total, field) == sum(getattr(r.totals, field) for r in data.rows)
    for row in data.rows:
        assert row.totals.total == sum(ln.total for ln in row.lines)
        assert row.totals.total == row.totals.time_amount + row.totals.llm_cost + row.totals.markup
    acme = next(r for r in data.rows if r.terms.slug == "acme")
    # 1000 s → 18 min, 361 s → 12 min at 150/h.
    assert acme.totals.billable_minutes == 30
    assert acme.totals.time_amount == Decimal("75.00")


@pytest.mark.django_db
def test_each_line_is_rounded_once_and_the_total_is_the_sum_of_rounded_lines(owner, client_acme):
    for day in (2, 3, 4):
        work(user=owner, client=client_acme, start=at(day), seconds=0, costs=["0.005"])
    data = report_for_period(period=march(), user=_staff())
    assert [ln.llm_cost for ln in data.lines] == [Decimal("0.01")] * 3
    # Rounding the raw sum (0.015) would give 0.02: the total is the sum of the rows shown.
    assert data.total.llm_cost == Decimal("0.03")


@pytest.mark.django_db
def test_markup_is_applied_to_llm_cost_and_rounded_half_up(owner):
    client = ClientFactory(slug="marked", llm_markup_percent=Decimal("12.5"), hourly_rate=Decimal("0"))
    work(user=owner, client=client, start=at(5), seconds=0, costs=["0.20"])
    line = report_for_period(period=march(), user=_staff()).lines[0]
    assert (line.llm_cost, line.markup, line.total) == (Decimal("0.20"), Decimal("0.03"), Decimal("0.23"))


@pytest.mark.django_db
def test_a_session_is_billed_whole_in_the_period_where_it_ended_and_an_open_one_where_now_is(owner, client_acme):
    # Issue 14 changed this rule: a session across a period's edge used to be clipped (and
    # rounded) in each period, billing the increment twice. It is billed whole where it ended.
    start = dt.datetime(2026, 2, 28, 23, 30, tzinfo=NY)
    work(user=owner, client=client_acme, start=start, seconds=3600)
    # A session still running counts, as open, in the period that holds now (up to now).
    work(user=owner, client=client_acme, start=at(31, 23, 0), ended=False)
    data = report_for_period(period=march(), user=_staff(), now=at(31, 23, 40))
    assert sorted(ln.seconds for ln in data.lines) == [2400, 3600]
    assert data.total.open_sessions == 1
    february = Period(kind="custom", first_day=dt.date(2026, 2, 1), last_day=dt.date(2026, 2, 28), tz=NY)
    assert report_for_period(period=february, user=_staff(), now=at(31, 23, 40)).lines == []
    # Once April has begun the running session belongs to April, not to March.
    later = report_for_period(period=march(), user=_staff(), now=at(1, 9, month=4))
    assert [ln.seconds for ln in later.lines] == [3600]


@pytest.mark.django_db
def test_adjacent_periods_add_up_to_their_union(owner, client_acme):
    """Across midnight: two daily reports bill exactly what one report over both days bills."""
    for minute in (41, 47, 53):  # 19–31 minutes each, ending after midnight
        work(user=owner, client=client_acme, start=at(9, 23, minute), seconds=1861, costs=["0.333333", "0.004"])
    staff = _staff()
    day = lambda d: Period(kind="custom", first_day=dt.date(2026, 3, d), last_day=dt.date(2026, 3, d), tz=NY)  # noqa: E731
    both = Period(kind="custom", first_day=dt.date(2026, 3, 9), last_day=dt.date(2026, 3, 10), tz=NY)
    first, second = (report_for_period(period=day(d), user=staff).total for d in (9, 10))
    union = report_for_period(period=both, user=staff).total
    for name in ("seconds", "billable_minutes", "time_amount", "llm_cost", "markup", "total", "messages"):
        assert getattr(first, name) + getattr(second, name) == getattr(union, name)
    assert first.sessions == 0 and second.sessions == 3


@pytest.mark.django_db
def test_a_switch_bills_each_client_its_own_segments(owner, client_acme, client_globex):
    session = work(user=owner, client=client_acme, start=at(6), seconds=600, costs=["0.10"])
    SegmentFactory(session=session, domain=client_globex, started_at=at(6, 10, 10), ended_at=at(6, 10, 25))
    MessageFactory(
        session=session,
        seq=9,
        role="assistant",
        domain=client_globex,
        cost_usd=Decimal("0.40"),
        timestamp=at(6, 10, 20),
    )
    lines = {ln.terms.slug: ln for ln in report_for_period(period=march(), user=_staff()).lines}
    assert (lines["acme"].seconds, lines["acme"].llm_cost) == (600, Decimal("0.10"))
    assert (lines["globex"].seconds, lines["globex"].billable_minutes) == (900, 15)
    assert lines["globex"].llm_cost == Decimal("0.40")


@pytest.mark.django_db
def test_branch_copies_and_imported_messages_are_not_billed_again(owner, client_acme):
    session = work(user=owner, client=client_acme, start=at(7), seconds=60, costs=["1.00"])
    original = session.messages.get()
    MessageFactory(
        session=session, seq=2, domain=client_acme, cost_usd=Decimal("1.00"), copied_from=original, timestamp=at(7)
    )
    MessageFactory(
        session=session, seq=3, domain=client_acme, cost_usd=Decimal("5.00"), is_imported=True, timestamp=at(7)
    )
    assert report_for_period(period=march(), user=_staff()).total.llm_cost == Decimal("1.00")


@pytest.mark.django_db
def test_calls_with_unknown_price_are_counted_and_flagged_never_zero(owner, client_acme):
    work(user=owner, client=client_acme, start=at(8), seconds=60, costs=["0.50", None, None])
    data = report_for_period(period=march(), user=_staff())
    assert data.total.unpriced == 2
    assert data.rows[0].totals.unpriced == 2
    assert data.total.llm_cost == Decimal("0.50")


@pytest.mark.django_db
def test_price_change_mid_period_applies_only_to_calls_after_it(owner, client_acme):
    pricing = pytest.importorskip("billing.pricing")
    from tests.factories import PriceFactory

    PriceFactory(
        provider="openai", model="gpt-4o", input_per_mtok="2.50", output_per_mtok="10.00", effective_from=at(1, 0)
    )
    PriceFactory(
        provider="openai", model="gpt-4o", input_per_mtok="5.00", output_per_mtok="20.00", effective_from=at(15, 0)
    )
    before = pricing.cost_of(
        provider="openai", model_id="gpt-4o", prompt_tokens=1_000_000, completion_tokens=0, at=at(10)
    )
    after = pricing.cost_of(
        provider="openai", model_id="gpt-4o", prompt_tokens=1_000_000, completion_tokens=0, at=at(20)
    )
    assert (before, after) == (Decimal("2.50"), Decimal("5.00"))
    work(user=owner, client=client_acme, start=at(10), seconds=0, costs=[before])
    work(user=owner, client=client_acme, start=at(20), seconds=0, costs=[after])
    data = report_for_period(period=march(), user=_staff())
    assert data.total.llm_cost == Decimal("7.50")
    # A later price row changes nothing already billed: costs are stored per message.
    PriceFactory(
        provider="openai", model="gpt-4o", input_per_mtok="9.00", output_per_mtok="9.00", effective_from=at(25, 0)
    )
    assert report_for_period(period=march(), user=_staff()).total.llm_cost == Decimal("7.50")


@pytest.mark.django_db
def test_own_report_only_holds_the_viewers_sessions(owner, colleague, client_acme):
    work(user=owner, client=client_acme, start=at(9), seconds=600, costs=["1.00"])
    work(user=colleague, client=client_acme, start=at(9, 11), seconds=1200, costs=["9.00"])
    mine = report_for_period(period=march(), user=owner, mine=True)
    assert [ln.username for ln in mine.lines] == ["olivia"]
    assert mine.total.llm_cost == Decimal("1.00")
    # A non-staff user asking for the full report still only sees their own lines.
    assert report_for_period(period=march(), user=owner).total.llm_cost == Decimal("1.00")


@pytest.mark.django_db
def test_drilldown_splits_by_consultant_and_model_and_reconciles(owner, colleague, client_acme):
    work(user=owner, client=client_acme, start=at(10), seconds=600, costs=["1.00"], model="openai:gpt-4o")
    work(user=colleague, client=client_acme, start=at(11), seconds=300, costs=["0"], model="ollama:llama3.2")
    drill = client_drilldown(period=march(), client=client_acme, user=_staff())
    assert sum(r.totals.total for r in drill.consultants) == drill.report.total.total
    models = {m["model"]: m for m in drill.models}
    assert models["openai:gpt-4o"]["cost"] == Decimal("1.00")
    assert models["ollama:llama3.2"]["seconds"] == 300


@pytest.mark.django_db
def test_lines_outside_the_period_are_left_out(owner, client_acme):
    work(user=owner, client=client_acme, start=at(10, month=4), seconds=600, costs=["1.00"])
    lines = billing_lines(period=march(), user=_staff())
    assert lines == []


def _staff():
    from tests.factories import UserFactory

    return UserFactory(username="auditor", is_staff=True)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("seconds", "minutes", "amount"), [(360, 6, "15.00"), (361, 12, "30.00"), (359, 6, "15.00"), (0, 0, "0.00")]
)
def test_a_session_at_an_increment_boundary_bills_as_stated(owner, client_acme, seconds, minutes, amount):
    work(user=owner, client=client_acme, start=at(12), seconds=seconds, costs=["0"])
    line = report_for_period(period=march(), user=_staff()).lines[0]
    assert (line.seconds, line.billable_minutes, line.time_amount) == (seconds, minutes, Decimal(amount))


@pytest.mark.django_db
def test_an_open_segment_counts_up_to_now_inside_the_period(owner, client_acme):
    work(user=owner, client=client_acme, start=at(12, 9, 0), ended=False)
    line = report_for_period(period=march(), user=_staff(), now=at(12, 9, 7)).lines[0]
    assert (line.seconds, line.billable_minutes) == (420, 12)
