"""Each client's part names its own invoice everywhere; summary and report agree; unknown prices flagged."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from billing.selectors import client_drilldown, report_for_period
from billing.services import invoice_create_draft, invoice_issue
from billing.tests.helpers import NY, march, work
from sessions_app.models import SessionSegment
from sessions_app.selectors import session_summary
from tests.factories import MessageFactory

MARCH = {"period_start": dt.date(2026, 3, 1), "period_end": dt.date(2026, 3, 31)}


@pytest.fixture
def switched(owner, client_acme, client_globex):
    """Acme 09:00:00.4–09:10:00.9, then Globex to 09:25:00.5: 600.5 s and 899.6 s, 1500.1 s in all.

    Flooring each segment alone would give 600 + 899 and lose a second; cutting at cumulative
    boundaries gives 600 + 900 = 1500, the session's own duration.
    """
    start = dt.datetime(2026, 3, 4, 9, 0, 0, 400000, tzinfo=NY)
    session = work(user=owner, client=client_acme, start=start, seconds=0, costs=["0.5", None])
    switch = dt.datetime(2026, 3, 4, 9, 10, 0, 900000, tzinfo=NY)
    end = dt.datetime(2026, 3, 4, 9, 25, 0, 500000, tzinfo=NY)
    SessionSegment.objects.filter(session=session).update(ended_at=switch)
    SessionSegment.objects.create(
        session=session, domain=client_globex, model="openai:gpt-4o", started_at=switch, ended_at=end
    )
    MessageFactory(
        session=session, seq=9, role="assistant", domain=client_globex, cost_usd=Decimal("0.25"), timestamp=switch
    )
    type(session).objects.filter(pk=session.pk).update(ended_at=end, duration_seconds=1500)
    session.refresh_from_db()
    return session


@pytest.mark.django_db
def test_each_client_report_shows_the_invoice_that_billed_its_own_part(staff, switched, client_acme, client_globex):
    globex = invoice_issue(invoice=invoice_create_draft(client=client_globex, user=staff, **MARCH), user=staff)
    acme = invoice_issue(invoice=invoice_create_draft(client=client_acme, user=staff, **MARCH), user=staff)
    assert (globex.number, acme.number) == ("INV-2026-0001", "INV-2026-0002")
    lines = client_drilldown(period=march(), client=client_acme, user=staff).report.lines
    assert [ln.invoice_number for ln in lines] == ["INV-2026-0002"]
    by_slug = {ln.terms.slug: ln.invoice_number for ln in report_for_period(period=march(), user=staff).lines}
    assert by_slug == {"acme": "INV-2026-0002", "globex": "INV-2026-0001"}
    summary = session_summary(session=switched)
    assert {row["client"]: row["invoice"] for row in summary["by_client"]} == by_slug


@pytest.mark.django_db
def test_summary_and_report_agree_on_each_clients_seconds(staff, switched):
    summary = {row["client"]: row["seconds"] for row in session_summary(session=switched)["by_client"]}
    report = {ln.terms.slug: ln.seconds for ln in report_for_period(period=march(), user=staff).lines}
    assert summary == report == {"acme": 600, "globex": 900}
    assert sum(summary.values()) == switched.duration_seconds


@pytest.mark.django_db
def test_an_unknown_price_is_flagged_on_the_summary_and_the_stats_api(owner_client, switched):
    summary = owner_client.get(f"/api/ollama/session/{switched.pk}/summary").json()
    assert summary["unpriced_calls"] == 1
    assert {row["client"]: row["unpriced_calls"] for row in summary["by_client"]} == {"acme": 1, "globex": 0}
    stats = owner_client.get("/api/ollama/stats").json()
    assert stats["unpriced_calls"] == 1
    page = owner_client.get(f"/sessions/{switched.pk}/summary/").content.decode()
    assert "1 call with unknown price" in page
