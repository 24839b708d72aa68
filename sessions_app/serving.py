"""The server process's start and stop, under daphne: settle what a dead process left, drain on SIGTERM.

At start-up, answers whose process is gone (stale, or their process dead on this host: a
killed or crashed daphne) are settled as `partial` from their checkpoint, in a thread, so the
first page already shows them. On SIGTERM the process stops taking new turns (`begin_turn`
answers 503, *the server is restarting*), lets the answers streaming in it (chat page, REST,
gateway) finish for up to `SHUTDOWN_GRACE_SECONDS`, then stops the rest, which stores what
they have as `partial` ("cut off: the server was restarting"), and only then stops daphne.
SIGINT (Ctrl-C under `make run`) does the same without the grace period. A second signal
stops at once.

Installed by config/asgi.py; does nothing outside daphne (tests import the ASGI app too).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading

from django.conf import settings
from django.db import DatabaseError, close_old_connections

from config.dbthread import db_sync_to_async, serve_from_threads
from sessions_app import livechat, services

logger = logging.getLogger(__name__)

# How long stopped answers get to store themselves before the process exits regardless.
STORE_WAIT_SECONDS = 10.0

_state = {"draining": False}


def install() -> None:
    """Hook start-up and the stop signals into daphne's reactor, if this process runs one."""
    reactor = sys.modules.get("twisted.internet.reactor")
    if reactor is None or "daphne.server" not in sys.modules:
        return  # not a server process (tests, management commands)
    # After start-up: Twisted has installed its own signal handlers by then, and ours replace them.
    reactor.callWhenRunning(_on_start, reactor)


def _on_start(reactor) -> None:
    if threading.current_thread() is threading.main_thread():
        # A server process (not a test's daphne in a thread, whose tests expect asgiref's threads).
        serve_from_threads(database_threads())
    loop = asyncio.get_event_loop()

    def on_signal(signum, _frame) -> None:
        grace = settings.SHUTDOWN_GRACE_SECONDS if signum == signal.SIGTERM else 0.0
        loop.call_soon_threadsafe(lambda: loop.create_task(_drain(reactor, grace)))

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=settle_at_start, name="settle-at-start", daemon=True).start()


def database_threads() -> int:
    """`DB_THREADS`, but never more than the connection pool holds connections."""
    pool = settings.DATABASES["default"].get("OPTIONS", {}).get("pool")
    most = pool.get("max_size", settings.DB_THREADS) if isinstance(pool, dict) else settings.DB_THREADS
    return min(settings.DB_THREADS, most)


def settle_at_start() -> int:
    """Settle the answers a dead process left streaming; return how many."""
    try:
        settled = services.sessions_settle_abandoned()
    except DatabaseError:
        logger.warning("start-up: could not look for answers left by a dead process", exc_info=True)
        return 0
    finally:
        close_old_connections()
    for session, message in settled:
        logger.warning(
            "start-up: session %s's answer lost its process; stored as %s with %d characters",
            session.pk,
            message.status,
            len(message.content),
        )
    return len(settled)


async def _drain(reactor, grace: float) -> None:
    if _state["draining"]:
        logger.warning("Second stop signal: stopping now")
        reactor.stop()
        return
    _state["draining"] = True
    services.turns_stop_admission()
    # A turn being claimed on the database thread right now registers before this returns.
    await db_sync_to_async(lambda: None)()
    streaming = services.local_turns()
    if streaming:
        logger.warning("Stopping: no new answers; %d streaming get %.0f s to finish", len(streaming), grace)
    await _while_turns_stream(grace)
    cut = services.local_turns()
    for turn in cut:
        turn.request_stop(services.STOP_SHUTDOWN)
    await _while_turns_stream(STORE_WAIT_SECONDS)
    if cut:
        logger.warning("Stopping: %d answer(s) cut off and stored as partial", len(cut))
    # Let the chat page's turns send their last frame to the sockets still open.
    in_flight = livechat.turns_in_flight()
    if in_flight:
        await asyncio.wait(in_flight, timeout=2)
    reactor.stop()


async def _while_turns_stream(seconds: float, poll: float = 0.05) -> None:
    """Wait up to `seconds` for this process's answers to be stored (the registry to empty)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    for _ in range(int(seconds / poll) + 1):
        if not services.local_turns() or loop.time() >= deadline:
            return
        await asyncio.sleep(poll)
