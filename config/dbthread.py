"""Run ORM code from async code: the one database-thread helper every app uses."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import AsyncToSync, sync_to_async
from django.db import close_old_connections, connection

# Under the server (`serve_from_threads`): long-lived threads for every database call.
_threads: dict[str, ThreadPoolExecutor] = {}


def serve_from_threads(workers: int) -> None:
    """Run database calls on `workers` long-lived threads from now on (the server, at start-up).

    Each call is whole on its own (`db_sync_to_async` closes its connections after it, and
    no transaction spans two calls), so any thread can take it. Without this, asgiref runs
    each request's calls on a thread of its own, started for the request and joined after it.
    """
    if "server" not in _threads:
        _threads["server"] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="db")


def db_sync_to_async(func):
    """`channels.db.database_sync_to_async`, minus closing a connection inside a transaction.

    Like channels, drop stale connections around the call (a long-lived worker thread must
    not keep a dead one). Unlike channels, leave a connection alone while it is inside an
    atomic block: closing it there would abort the caller's transaction (a test's, under
    PostgreSQL, or a service's).

    Under the server the call goes to `serve_from_threads`' pool, unless a synchronous caller
    waits above it (a test, a management command): then to that caller's thread, as asgiref
    does, so it sees the caller's transaction.
    """

    def run(*args, **kwargs):
        outside = not connection.in_atomic_block
        if outside:
            close_old_connections()
        try:
            return func(*args, **kwargs)
        finally:
            if outside:
                close_old_connections()

    hop = sync_to_async(run)

    async def call(*args, **kwargs):
        pool = _threads.get("server")
        if pool is None or getattr(AsyncToSync.executors, "current", None) is not None:
            return await hop(*args, **kwargs)
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            pool, functools.partial(context.run, run, *args, **kwargs)
        )

    return call
