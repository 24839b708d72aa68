"""Pooled HTTP clients: one per provider configuration per event loop.

An httpx client is bound to the loop it first ran on; a test's loop, daphne's loop and a
management command's loop each get their own, and a closed loop's clients are dropped with it.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import httpx2
from django.conf import settings

T = TypeVar("T")

_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Hashable, Any]] = weakref.WeakKeyDictionary()


def pooled(key: Hashable, factory: Callable[[], T]) -> T:
    """The client for `key` on the running loop, made by `factory` on first use."""
    loop = asyncio.get_running_loop()
    pool = _pools.get(loop)
    if pool is None:
        pool = _pools[loop] = {}
    client = pool.get(key)
    if client is None or _is_closed(client):
        client = pool[key] = factory()
    return client


def _is_closed(client: Any) -> bool:
    closed = getattr(client, "is_closed", False)
    return closed() if callable(closed) else bool(closed)


def reset_clients() -> None:
    """Forget every pooled client (after settings change, or between tests)."""
    _pools.clear()


async def aclose_clients() -> None:
    """Close the running loop's clients (at shutdown)."""
    pool = _pools.pop(asyncio.get_running_loop(), {})
    for client in pool.values():
        close = getattr(client, "aclose", None) or getattr(client, "close", None)
        if close is not None:
            await close()


def timeouts() -> dict[str, float]:
    """Transport-level limits. The router enforces first-token and between-token limits exactly;
    the read limit here is a backstop for callers that use an adapter directly."""
    connect = settings.PROVIDER_CONNECT_TIMEOUT
    # A whole answer asked without streaming may take the first-token limit plus the idle one.
    read = settings.PROVIDER_FIRST_TOKEN_TIMEOUT + settings.PROVIDER_IDLE_TIMEOUT
    return {"connect": connect, "read": read, "write": max(connect, 10.0), "pool": connect}


def sdk_http_client(limits: dict[str, float]) -> httpx2.AsyncClient:
    """The HTTP client handed to the OpenAI and Anthropic SDKs: their own defaults (1,000
    connections, 100 kept alive, redirects followed), as a plain httpx2 client.

    The SDKs' default client closes itself from `__del__` by starting a task on whatever event
    loop is running at that moment; one pooled for a loop that has since closed (a test's, a
    management command's) then fails on the other loop and prints a traceback there.
    """
    return httpx2.AsyncClient(
        timeout=httpx2.Timeout(**limits),
        limits=httpx2.Limits(max_connections=1000, max_keepalive_connections=100),
        follow_redirects=True,
    )
