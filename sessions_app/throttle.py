"""Throttling of failed sign-ins and unknown API tokens, counted in the shared cache.

django-ratelimit keeps the counters: fixed windows in the cache, incremented atomically, so
with Redis (`REDIS_URL`) every daphne process counts the same failures (with the local-memory
cache of a one-process `make run`, that process alone). Only failures count; a consultant who
types their password right is never slowed down.

- Sign-in (`/accounts/login/` and `/admin/login/`): `SIGNIN_FAILURE_LIMIT` failures per
  username (whatever the address, so a distributed guess at one account stops) and five times
  that per client address (so one address cannot spray usernames). Then the form refuses with
  429 until the window ends, even the right password.
- API tokens (REST Bearer, gateway Bearer and `/t/<token>/`): `TOKEN_FAILURE_LIMIT` unknown
  or revoked tokens per client address, then 429 with `Retry-After` for every token from
  that address until the window ends. A valid token's call reads no counter: each process
  remembers the addresses it has seen go over the limit, so the hot path costs nothing.
"""

from __future__ import annotations

import threading
import time

from django.conf import settings
from django.http import HttpRequest
from django_ratelimit.core import get_usage

SIGNIN_THROTTLED = "Too many failed sign-ins. Try again in {minutes} minute{s}."
TOKEN_THROTTLED = "Too many requests with unknown API tokens from your address; retry in {seconds} seconds."
# Per address, sign-in allows this many times the per-username limit (people behind one NAT).
SIGNIN_ADDRESS_FACTOR = 5

_blocked_until: dict[str, float] = {}  # this process's memory of addresses over the token limit
_blocked_lock = threading.Lock()


def client_address(request: HttpRequest) -> str:
    """The caller's address: REMOTE_ADDR, or the last hop of `CLIENT_IP_HEADER` behind a proxy."""
    header = getattr(settings, "CLIENT_IP_HEADER", "")
    if header:
        forwarded = request.META.get(header, "")
        if forwarded:
            return forwarded.split(",")[-1].strip()[:64]
    return (request.META.get("REMOTE_ADDR") or "unknown")[:64]


def _rate(setting: str, factor: int = 1) -> str:
    count, seconds = getattr(settings, setting)  # parsed by settings from "10/10m"
    return f"{count * factor}/{seconds}s"


def _usage(request: HttpRequest, group: str, value: str, rate: str, *, increment: bool) -> dict | None:
    return get_usage(request, group=group, key=lambda _group, _request: value, rate=rate, increment=increment)


def _wait(usage: dict | None, *, allowed: int = 0) -> int:
    """Seconds until the window ends once more than `limit - allowed` failures are counted, else 0."""
    if usage is None or usage["count"] + allowed <= usage["limit"]:
        return 0
    return max(1, int(usage["time_left"]))


# --- sign-in --------------------------------------------------------------------------------


def _signin_keys(request: HttpRequest, username: str) -> list[tuple[str, str, str]]:
    return [
        ("signin-user", username.strip().lower()[:150], _rate("SIGNIN_FAILURE_LIMIT")),
        ("signin-address", client_address(request), _rate("SIGNIN_FAILURE_LIMIT", SIGNIN_ADDRESS_FACTOR)),
    ]


def signin_wait(request: HttpRequest, username: str) -> int:
    """Seconds the caller must wait before trying to sign in again (0: go ahead)."""
    # Read before the attempt: `limit` failures so far leave no attempt.
    return max(
        _wait(_usage(request, group, value, rate, increment=False), allowed=1)
        for group, value, rate in _signin_keys(request, username)
    )


def signin_failed(request: HttpRequest, username: str) -> None:
    for group, value, rate in _signin_keys(request, username):
        _usage(request, group, value, rate, increment=True)


def signin_message(wait: int) -> str:
    minutes = max(1, -(-wait // 60))
    return SIGNIN_THROTTLED.format(minutes=minutes, s="" if minutes == 1 else "s")


# --- API tokens -----------------------------------------------------------------------------


def token_wait(request: HttpRequest) -> int:
    """Seconds this address must wait before any token of it is looked at (0: go ahead).

    Reads only this process's memory: the shared counter is read and written on failures.
    """
    address = client_address(request)
    with _blocked_lock:
        until = _blocked_until.get(address)
        if until is None:
            return 0
        left = until - time.monotonic()
        if left <= 0:
            del _blocked_until[address]
            return 0
    return max(1, int(left + 0.999))


def token_failed(request: HttpRequest) -> int:
    """Count an unknown token from this address; return the seconds to wait if now over the limit."""
    address = client_address(request)
    wait = _wait(_usage(request, "token-address", address, _rate("TOKEN_FAILURE_LIMIT"), increment=True))
    if wait:
        with _blocked_lock:
            if len(_blocked_until) > 10_000:  # a flood of addresses must not grow memory without end
                _blocked_until.clear()
            _blocked_until[address] = time.monotonic() + wait
    return wait


def token_message(wait: int) -> str:
    return TOKEN_THROTTLED.format(seconds=wait)


def forget_blocked_addresses() -> None:
    """Clear this process's memory of blocked addresses (tests; the shared counters stay)."""
    with _blocked_lock:
        _blocked_until.clear()
