"""Test data for billing: sessions with segments and messages at chosen times."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from zoneinfo import ZoneInfo

from billing.reports import PERIOD_CUSTOM, Period
from sessions_app.models import SessionStatus
from tests.factories import MessageFactory, SegmentFactory, SessionFactory

NY = ZoneInfo("America/New_York")
UTC = dt.UTC


def at(day: int, hour: int = 10, minute: int = 0, second: int = 0, month: int = 3) -> dt.datetime:
    """A time in March 2026, New York (the test settings' zone)."""
    return dt.datetime(2026, month, day, hour, minute, second, tzinfo=NY)


def march(tz=NY) -> Period:
    return Period(kind=PERIOD_CUSTOM, first_day=dt.date(2026, 3, 1), last_day=dt.date(2026, 3, 31), tz=tz)


def work(
    *,
    user,
    client,
    start: dt.datetime,
    seconds: int = 0,
    costs=(),
    model: str = "openai:gpt-4o",
    ended: bool = True,
    name: str | None = None,
    tokens: int = 100,
):
    """A session of `seconds` on one client with one assistant message per cost."""
    end = start + dt.timedelta(seconds=seconds)
    extra = {"name": name} if name is not None else {}
    session = SessionFactory(
        user=user,
        domain=client,
        started_at=start,
        ended_at=end if ended else None,
        duration_seconds=seconds if ended else None,
        status=SessionStatus.ENDED if ended else SessionStatus.ACTIVE,
        last_activity_at=end,
        primary_model=model,
        **extra,
    )
    SegmentFactory(session=session, domain=client, model=model, started_at=start, ended_at=end if ended else None)
    for i, cost in enumerate(costs):
        MessageFactory(
            session=session,
            seq=i + 1,
            role="assistant",
            content=f"answer {i}",
            domain=client,
            model=model,
            provider=model.split(":")[0],
            timestamp=start + dt.timedelta(seconds=min(i, max(seconds - 1, 0))),
            tokens=tokens,
            prompt_tokens=tokens // 2,
            completion_tokens=tokens - tokens // 2,
            cost_usd=None if cost is None else Decimal(cost),
        )
    return session
