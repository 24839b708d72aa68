"""Template filters for showing sessions: durations and money."""

from __future__ import annotations

from django import template
from django.utils import timezone

from billing.money import format_cost, format_money

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
def usd(value) -> str:
    """A total in USD, in cents unless a non-zero amount needs more ("0.0031 USD")."""
    if value is None or value == "":
        return "—"
    return format_money(value, "USD")


@register.filter
def usd_cost(value) -> str:
    """One message's cost in USD, with the decimals it needs; an unknown price says so."""
    return format_cost(value, "USD")
