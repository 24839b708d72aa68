"""Formatting for report pages: money, hours and times, computed here so templates stay plain."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from django import template
from django.utils.http import urlencode

from billing.reports import money_str
from sessions_app.models import StreamReason

register = template.Library()


@register.filter
def money(value) -> str:
    """Two decimals, half up: "1234.50"."""
    if value is None or value == "":
        return "—"
    return money_str(Decimal(value))


@register.filter
def money6(value) -> str:
    """A raw cost as stored (six decimals), for breakdowns that are not billed as shown."""
    if value is None:
        return "—"
    return f"{Decimal(value):.6f}"


@register.filter
def hours2(value) -> str:
    return f"{Decimal(value or 0):.2f}"


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
