"""The chat page's answers: owned by the process, numbered, fanned out to every watcher, resumable.

A turn asked from the chat page runs as a task of the process (`LiveTurn`, run by this event
loop's `Hub`), not of the socket that asked: closing, reloading or leaving the page only stops
watching. Only Stop (from any tab or process), End, a provider failure, a timeout or a server
shutdown end it early. (REST, CLI and gateway callers own their turns: a dropped connection
cancels them, as before.)

Deltas are coalesced once, in the turn, into `token` frames numbered `n` = 1, 2, ... Each frame
is serialized once and handed to every socket of the session watching in this process; when
the channel layer is shared (Redis) it also goes to the session's group `session.<id>` for the
sockets of other processes. A socket only gets a turn's `token` frames once it is in step with
that turn: it was watching when the turn started, or it said what it has (`resume`: the turn
and the last `n`) and got exactly the missing text, from the `LiveTurn` here or from the process
that owns the turn (a `turn.snapshot` request to the group `turn.<id>`, which only that process
joins). Nothing is missing or doubled: a chunk is appended to the turn before it is published,
a snapshot is read and the socket marked in step without yielding, and a socket drops frames it
already has.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
import weakref
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol

from asgiref.sync import sync_to_async
from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.core.serializers.json import DjangoJSONEncoder

from config.dbthread import db_sync_to_async
from config.resilience import REDIS_DOWN, Outage
from sessions_app import selectors, services
from sessions_app.errors import ProviderFailed, SessionEnded, SessionError, StoreFailed
from sessions_app.events import Done, KnownSession, Token
from sessions_app.models import ChatSession, MessageRole, MessageStatus

logger = logging.getLogger(__name__)

# Seconds between token frames: at most ~30 frames a second per stream.
TOKEN_INTERVAL = 1 / 30
# A channel layer that does not answer within this long is treated as failed.
FANOUT_TIMEOUT = 0.5
# How long a socket waits for another process to send a turn's text so far.
SNAPSHOT_TIMEOUT = 1.0

INTERNAL_ERROR = "internal_error"
INTERNAL_ERROR_STORED = "Something went wrong on our side; the message you sent is stored."
INTERNAL_ERROR_NOTHING_STORED = "Something went wrong on our side; nothing was stored. Send it again."

# The frames that close a turn.
FINAL_FRAMES = ("message.done", "stopped", "error")


def dumps(frame: dict) -> str:
    return json.dumps(frame, separators=(",", ":"), cls=DjangoJSONEncoder)


class Watcher(Protocol):
    """A socket watching a session (the chat consumer)."""

    known: KnownSession | None
    token_interval: float

    async def join(self) -> None: ...

    async def take(self, frame: dict, text: str | None = None, *, remote: bool = False) -> None: ...


class TokenCoalescer:
    """Batch text deltas into at most one frame per `interval` seconds.

    The first delta goes out at once (no added time to first token); deltas arriving within
    the interval after a frame wait for a timer and leave together; `close()` flushes the rest.
    """

    def __init__(self, emit: Callable[[str], Awaitable[None]], interval: float) -> None:
        self._emit = emit
        self._interval = interval
        self._parts: list[str] = []
        self._last_sent: float | None = None
        self._timer: asyncio.Task | None = None
        self._sleeping = False
        self.frames = 0

    async def add(self, text: str) -> None:
        if not text:
            return
        self._parts.append(text)
        if self._timer is not None:
            return
        loop = asyncio.get_running_loop()
        wait = 0.0 if self._last_sent is None else self._last_sent + self._interval - loop.time()
        if wait <= 0:
            await self._flush()
        else:
            self._sleeping = True
            self._timer = asyncio.create_task(self._flush_after(wait))

    async def _flush_after(self, wait: float) -> None:
        try:
            await asyncio.sleep(wait)
        finally:
            self._sleeping = False
        try:
            await self._flush()
        finally:
            self._timer = None

    async def _flush(self) -> None:
        if not self._parts:
            return
        text = "".join(self._parts)
        self._parts.clear()
        self._last_sent = asyncio.get_running_loop().time()
        self.frames += 1
        await self._emit(text)

    async def close(self) -> None:
        """Send whatever is buffered now, in order after any frame already on its way."""
        timer, self._timer = self._timer, None
        if timer is not None:
            if self._sleeping:
                timer.cancel()
            await asyncio.gather(timer, return_exceptions=True)
        await self._flush()


@dataclass
class LiveTurn:
    """A chat page's answer streaming in this process: its question and its numbered text so far."""

    session_id: str
    turn_id: str
    message: str
    user: Any
    asker: Watcher | None
    known: KnownSession | None = None
    interval: float = TOKEN_INTERVAL  # seconds between token frames
    chunks: list[str] = field(default_factory=list)  # chunks[n - 1] is the text of token frame n
    claimed: bool = False  # the session is claimed: other sockets may see it
    start: Any = None  # the begun turn (services.begin_turn)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def n(self) -> int:
        return len(self.chunks)

    def catch_up(self, *, turn_id: str | None, after: int) -> tuple[list[dict], int]:
        """The frames a socket that has `after` frames of `turn_id` is missing, and the `n` they reach."""
        frames: list[dict] = []
        if turn_id != self.turn_id:
            frames.append({"type": "turn.started", "turn": self.turn_id, "message": self.message, "resumed": True})
            after = 0
        after = min(max(after, 0), self.n)
        if after < self.n:
            frames.append({"type": "token", "turn": self.turn_id, "n": self.n, "text": "".join(self.chunks[after:])})
        return frames, self.n


def question_payload(message) -> dict:
    """A turn's stored user message and its author's name, read from objects in hand (no query)."""
    payload = dict(selectors.message_as_dict(message))
    author = message.author if message.author_id else None
    payload["author_name"] = (author.get_full_name() or author.get_username()) if author is not None else None
    return payload


def _done_payload(event: Done) -> dict:
    return {"message": selectors.message_as_dict(event.message), "session": selectors.session_as_dict(event.session)}


def latest_payload(session_id: str) -> dict:
    """The stored answer of a stopped or failed turn, and the session's totals."""
    session = ChatSession.objects.select_related("domain", "brand").get(pk=session_id)
    latest = selectors.session_messages(session=session).last()
    stored = latest if latest is not None and latest.role == MessageRole.ASSISTANT else None
    return {
        "stored": selectors.message_as_dict(stored) if stored else None,
        "session": selectors.session_as_dict(session),
    }


class Hub:
    """This event loop's live turns and the sockets watching each session (`hub()` gets it)."""

    def __init__(self) -> None:
        self.id = uuid.uuid4().hex  # the origin of frames this process sends to the group
        self.layer = get_channel_layer()
        # The stock in-memory layer cannot reach another process: fan-out through it is waste.
        self.shared = self.layer is not None and type(self.layer) is not InMemoryChannelLayer
        self.outage = Outage(
            "Fan-out to other processes",
            down="Fan-out to other processes stopped: the channel layer does not answer ({exc}); "
            "sockets of this process are unaffected",
            max_retry=5.0,  # fan-out comes back within seconds of Redis
        )
        self.watchers: dict[str, set[Watcher]] = {}
        self.turns: dict[str, LiveTurn] = {}
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._sender: asyncio.Task | None = None
        self.channel: str | None = None
        self._server: asyncio.Task | None = None
        self._healer: asyncio.Task | None = None

    # --- Watching ---------------------------------------------------------------------------

    def watch(self, session_id: str, watcher: Watcher) -> None:
        self.watchers.setdefault(session_id, set()).add(watcher)

    def unwatch(self, session_id: str, watcher: Watcher) -> None:
        watching = self.watchers.get(session_id)
        if watching is not None:
            watching.discard(watcher)
            if not watching:
                del self.watchers[session_id]
        live = self.turns.get(session_id)
        if live is not None and live.asker is watcher:
            live.asker = None  # the answer goes on; nobody to hand the next turn's `known` to

    def live(self, session_id: str) -> LiveTurn | None:
        """The turn streaming here for the session, once it holds the session's claim."""
        live = self.turns.get(session_id)
        return live if live is not None and live.claimed else None

    def busy(self, session_id: str) -> bool:
        return session_id in self.turns

    # --- Turns ------------------------------------------------------------------------------

    def start_turn(self, *, session_id: str, turn_id: str, message: str, user, asker: Watcher | None) -> LiveTurn:
        """Run the turn as a task of the process: it outlives the socket that asked.

        With no asker (the first turn of a new version, asked from its source session's page)
        the turn's sockets are those of its own session's pages, which resume it.
        """
        if asker is None:
            live = LiveTurn(session_id, turn_id, message, user, None)
        else:
            live = LiveTurn(session_id, turn_id, message, user, asker, known=asker.known, interval=asker.token_interval)
            asker.known = None
        self.turns[session_id] = live
        task = asyncio.get_running_loop().create_task(self._run(live), name=f"turn {session_id}")
        _RUNNING.add(task)
        task.add_done_callback(_RUNNING.discard)
        return live

    def stop_here(self, session_id: str, reason: str) -> LiveTurn | None:
        """Stop the turn streaming here (its partial answer is stored); None if none streams here."""
        live = self.live(session_id)
        if live is None or live.start is None:
            return None
        live.start.turn.request_stop(reason)
        return live

    async def _run(self, live: LiveTurn) -> None:
        sid, turn_id = live.session_id, live.turn_id

        async def emit(text: str) -> None:
            live.chunks.append(text)  # before publishing: a snapshot taken meanwhile includes it
            await self.publish(sid, {"type": "token", "turn": turn_id, "n": live.n, "text": text})

        # Coalesced once, at the pace the asking page wants, for every socket alike.
        coalescer = TokenCoalescer(emit, live.interval)
        try:
            live.start = await db_sync_to_async(services.begin_turn)(
                session_id=sid, user=live.user, message=live.message, known=live.known
            )
        except Exception as exc:
            # Refused before anything was stored (busy, ended, too large...): only the asker hears of it.
            self.turns.pop(sid, None)
            if isinstance(exc, SessionError):
                frame = {"type": "error", "code": exc.code, "message": exc.message, "turn": turn_id}
            else:
                logger.exception("Chat turn failed to begin in session %s", sid)
                frame = {"type": "error", "code": INTERNAL_ERROR, "message": INTERNAL_ERROR_NOTHING_STORED}
                frame["turn"] = turn_id
            if live.asker is not None:
                await live.asker.take(frame)
            else:
                logger.info("The first turn of version %s was refused: %s", sid, frame["message"])
            live.done.set()
            return
        live.claimed = True
        # The stored question, with who typed it: every page shows it as it arrives.
        question = question_payload(live.start.user_message)
        started = {"type": "turn.started", "turn": turn_id, "message": live.message, "question": question}
        await self.publish(sid, started, exclude=live.asker)
        await self._join_turn_group(sid)
        final: dict
        try:
            events = services.session_chat(session_id=sid, user=live.user, message=live.message, start=live.start)
            async with aclosing(events) as stream:
                async for event in stream:
                    if isinstance(event, Token):
                        await coalescer.add(event.text)
                    elif isinstance(event, Done):
                        await coalescer.close()
                        if live.asker is not None:
                            live.asker.known = event.known
                        payload = await db_sync_to_async(_done_payload)(event)
                        if event.message.status == MessageStatus.COMPLETE:
                            final = {"type": "message.done", "turn": turn_id, **payload}
                        else:  # stopped (Stop, or a shutdown) with what had arrived
                            final = {"type": "stopped", "turn": turn_id, "stored": payload["message"]}
                            final["session"] = payload["session"]
        except SessionEnded:
            await coalescer.close()
            turn = live.start.turn
            if turn.state == "taken":  # the end stores the answer: wait for its transaction
                await sync_to_async(turn.finished.wait, thread_sensitive=False)(30)
            final = {"type": "stopped", "turn": turn_id, **await db_sync_to_async(latest_payload)(sid)}
        except StoreFailed as exc:
            # Nothing was stored: the frame says so (`stored` is null), the text stays on the page.
            await coalescer.close()
            final = {"type": "error", "code": exc.code, "message": exc.message, "turn": turn_id, "stored": None}
        except ProviderFailed as exc:
            # The provider failed mid-turn: the user message and any partial answer are stored.
            await coalescer.close()
            final = {"type": "error", "code": exc.code, "message": exc.message, "turn": turn_id}
            final.update(await db_sync_to_async(latest_payload)(sid))
        except Exception:
            logger.exception("Chat turn failed in session %s", sid)
            await coalescer.close()
            final = {"type": "error", "code": INTERNAL_ERROR, "message": INTERNAL_ERROR_STORED, "turn": turn_id}
            try:
                final.update(await db_sync_to_async(latest_payload)(sid))
            except Exception:
                final["stored"] = None
        if final.get("turn") == turn_id:
            final["question"] = question  # the asker's page learns its message's number and time
        # Gone from the registry before its last frame: a chat sent right after it is not busy.
        self.turns.pop(sid, None)
        live.done.set()
        await self.publish(sid, final)
        await self._leave_turn_group(sid)

    # --- Frames out -------------------------------------------------------------------------

    async def publish(self, session_id: str, frame: dict, *, exclude: Watcher | None = None) -> None:
        """Hand a frame to the session's sockets here (serialized once) and to other processes."""
        watching = self.watchers.get(session_id)
        if watching:
            text = dumps(frame)
            for watcher in tuple(watching):
                if watcher is not exclude:
                    await watcher.take(frame, text)
        if self.shared:
            self._fanout(f"session.{session_id}", {"type": "session.frame", "frame": frame, "origin": self.id})

    def _fanout(self, group: str, event: dict) -> None:
        """Queue a group send; one background task sends them in order, never delaying the sockets here."""
        if self.outage.should_skip():
            return  # other processes' sockets resync by the frame numbers once it answers again
        self._outbox.put_nowait((group, event))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_outbox())

    async def _send_outbox(self) -> None:
        while not self._outbox.empty():
            group, event = self._outbox.get_nowait()
            if self.outage.should_skip():
                continue
            try:
                await self._group_send(group, event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.layer_failed(exc)

    async def _group_send(self, group: str, event: dict) -> None:
        await _twice(lambda: self.layer.group_send(group, event))

    # --- Channel layer outages --------------------------------------------------------------

    def layer_failed(self, exc: BaseException) -> None:
        """The channel layer failed: note it (logged once), and rejoin every group once it answers."""
        self.outage.failed(exc)
        if self._healer is None or self._healer.done():
            self._healer = asyncio.get_running_loop().create_task(self._heal())

    async def _heal(self) -> None:
        # A restarted Redis has forgotten every group: join them all again, then fan out again.
        while True:
            await asyncio.sleep(max(0.2, self.outage.retry_in()))
            try:
                await _twice(lambda: self.layer.group_discard("hub-probe", self.id))
                for watching in list(self.watchers.values()):
                    for watcher in list(watching):
                        await watcher.join()
                if self.channel is not None:
                    for session_id in list(self.turns):
                        await asyncio.wait_for(self.layer.group_add(f"turn.{session_id}", self.channel), FANOUT_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.outage.failed(exc)
                continue
            self.outage.recovered()
            return

    # --- Snapshots across processes ---------------------------------------------------------

    async def ask_snapshot(self, *, session_id: str, reply_to: str, turn_id: str | None, after: int) -> None:
        """Ask the process that owns the session's turn for its text after `after` (answered to `reply_to`)."""
        event = {"type": "turn.snapshot", "session": session_id, "reply_to": reply_to, "turn": turn_id, "after": after}
        try:
            await asyncio.wait_for(self.layer.group_send(f"turn.{session_id}", event), FANOUT_TIMEOUT)
        except Exception as exc:
            self.layer_failed(exc)

    async def _join_turn_group(self, session_id: str) -> None:
        if not self.shared:
            return
        if self.channel is None:
            self.channel = await self.layer.new_channel()
            self._server = asyncio.get_running_loop().create_task(self._serve())
        if self.outage.down:
            return  # joined once the layer answers again (`_heal`)
        try:
            await asyncio.wait_for(self.layer.group_add(f"turn.{session_id}", self.channel), FANOUT_TIMEOUT)
        except Exception as exc:
            self.layer_failed(exc)

    async def _leave_turn_group(self, session_id: str) -> None:
        if not self.shared or self.channel is None or self.outage.down:
            return
        try:
            await asyncio.wait_for(self.layer.group_discard(f"turn.{session_id}", self.channel), FANOUT_TIMEOUT)
        except Exception as exc:
            self.layer_failed(exc)

    async def _serve(self) -> None:
        """Answer other processes' snapshot requests for the turns streaming here."""
        delay = 0.5
        while True:
            try:
                event = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.layer_failed(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.5
            if event.get("type") == "turn.snapshot":
                await self._answer_snapshot(event)

    async def _answer_snapshot(self, event: dict) -> None:
        live = self.live(str(event.get("session")))
        reply_to = event.get("reply_to")
        if live is None or not isinstance(reply_to, str):
            return
        after = event.get("after") if isinstance(event.get("after"), int) else 0
        frames, n = live.catch_up(turn_id=event.get("turn"), after=after)
        reply = {"type": "turn.snapshot.reply", "turn": live.turn_id, "n": n, "frames": frames}
        try:
            await asyncio.wait_for(self.layer.send(reply_to, reply), FANOUT_TIMEOUT)
        except Exception as exc:
            self.layer_failed(exc)


async def _twice(call: Callable[[], Awaitable[Any]]) -> None:
    """Call the channel layer; a pooled connection to a Redis that restarted fails once, so retry once."""
    try:
        await asyncio.wait_for(call(), FANOUT_TIMEOUT)
    except REDIS_DOWN:
        await asyncio.wait_for(call(), FANOUT_TIMEOUT)


# Tasks of turns in flight, so none is garbage-collected while it runs.
_RUNNING: set[asyncio.Task] = set()

_HUBS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hub] = weakref.WeakKeyDictionary()


def hub() -> Hub:
    """The running event loop's hub (daphne has one loop; each test has its own)."""
    loop = asyncio.get_running_loop()
    found = _HUBS.get(loop)
    if found is None:
        found = _HUBS[loop] = Hub()
    return found


def turns_in_flight() -> list[asyncio.Task]:
    """The chat page's turns still running on this event loop."""
    loop = asyncio.get_running_loop()
    return [task for task in _RUNNING if not task.done() and task.get_loop() is loop]
