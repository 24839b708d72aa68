"""`config.dbthread`: database calls on the server's long-lived threads, or the waiting caller's."""

from __future__ import annotations

import asyncio
import threading

import pytest
from asgiref.sync import async_to_sync

from config import dbthread


@pytest.fixture
def server_threads():
    dbthread.serve_from_threads(2)
    yield
    dbthread._threads.pop("server").shutdown(wait=True)


def _thread_name() -> str:
    return threading.current_thread().name


def test_under_the_server_calls_run_on_its_database_threads(server_threads):
    names: list[str] = []

    def serve() -> None:  # an event loop with no synchronous caller above it, as under daphne
        async def calls() -> None:
            for _ in range(3):
                names.append(await dbthread.db_sync_to_async(_thread_name)())

        asyncio.run(calls())

    server = threading.Thread(target=serve)
    server.start()
    server.join()
    assert names and all(name.startswith("db") for name in names), names


@pytest.mark.django_db
def test_a_synchronous_caller_waiting_above_keeps_its_own_thread(server_threads):
    # A test or a command: the call must see the caller's connection (and its transaction).
    assert async_to_sync(dbthread.db_sync_to_async(_thread_name))() == threading.current_thread().name


def test_the_server_runs_db_threads_but_never_more_than_the_pool_holds(settings):
    from sessions_app.serving import database_threads

    settings.DB_THREADS = 4
    settings.DATABASES = {"default": {**settings.DATABASES["default"], "OPTIONS": {"pool": {"max_size": 20}}}}
    assert database_threads() == 4
    settings.DATABASES = {"default": {**settings.DATABASES["default"], "OPTIONS": {"pool": {"max_size": 2}}}}
    assert database_threads() == 2
    settings.DATABASES = {"default": {**settings.DATABASES["default"], "OPTIONS": {}}}
    assert database_threads() == 4
