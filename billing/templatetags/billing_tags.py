"""Formatting for report pages: money, hours and times, computed here so templates stay plain."""

from __future__ import annotations

import datetime as dt

from django import template
from django.utils.http import urlencode

from billing.money import format_cost, format_money, format_plain, format_rate
from sessions_app.models import StreamReason

register = template.Library()


@register.filter
def money(value, currency: str = "USD") -> str:
    """A total or line in cents with its currency: `{{ x|money:client.currency }}` → "1,234.50 EUR"."""
    if value is None or value == "":
        return "—"
    return format_money(value, currency)


@register.filter
def cost(value, currency: str = "USD") -> str:
    """A raw cost with the decimals it needs and its currency ("0.000125 USD"), for breakdowns."""
    if value is None or value == "":
        return "—"
    return format_cost(value, currency)


@register.filter
def figure(value) -> str:
    """A plain two-decimal figure for a column whose header names the currency ("1,234.50")."""
    return format_plain(value, 2)


@register.filter
def rate_text(value) -> str:
    """An exchange rate as stored, trailing zeros dropped ("0.9231")."""
    return format_rate(value)


@register.filter
def hours2(value) -> str:
    return format_plain(value or 0, 2)


@register.filter
def hmm(seconds) -> str:
    seconds = int(seconds or 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}"


@register.filter
def hmmss(seconds) -> str:
    seconds = int(seconds or 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@register.filter
def local_minute(value, tz) -> str:
    """The time to the minute (2026-03-02 09:00) in the report's zone; cheaper than |date."""
    if not isinstance(value, dt.datetime):
        return "—"
    return value.astimezone(tz).strftime("%Y-%m-%d %H:%M")


@register.filter
def local_second(value, tz) -> str:
    if not isinstance(value, dt.datetime):
        return "—"
    return value.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S")


@register.filter
def isoformat(value) -> str:
    return value.isoformat() if isinstance(value, dt.datetime | dt.date) else ""


@register.filter
def urlencode_dict(value: dict) -> str:
    return urlencode(value or {})


@register.filter
def reason_label(value: str) -> str:
    try:
        return StreamReason(value).label
    except ValueError:
        return value
