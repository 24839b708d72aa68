"""Template filters for showing sessions: durations and money."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from django import template
from django.utils import timezone

register = template.Library()


def format_duration(seconds: int | float | None) -> str:
    """`1:02:03` for a number of seconds; `—` for none."""
    if seconds is None:
        return "—"
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def session_duration(session, now=None) -> str:
    """The stored duration of an ended session, or the time elapsed so far of an active one."""
    if session.duration_seconds is not None:
        return format_duration(session.duration_seconds)
    if session.status == "active":
        now = now or timezone.now()
        return f"{format_duration((now - session.started_at).total_seconds())} so far"
    return "—"


@register.filter
def hms(seconds) -> str:
    return format_duration(seconds)


@register.filter
def elapsed(session) -> str:
    return session_duration(session)


@register.filter
def usd(value, places: int = 6) -> str:
    """A USD amount with a fixed number of decimals (no float on the way)."""
    if value is None or value == "":
        return "—"
    try:
        amount = Decimal(str(value))
        digits = int(places)
    except (InvalidOperation, ValueError, TypeError):
        return "—"
    return f"${amount:,.{digits}f}"
