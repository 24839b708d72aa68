"""The chat WebSocket: `/ws/sessions/<id>/` streams a session's answers to its owner's pages.

Inbound frames (JSON objects, each validated before anything happens):
  {"type": "chat", "message": "...", "turn": "optional id"}   ask; one answer at a time
  {"type": "stop"}                                             stop the answer streaming now
  {"type": "switch", "client": "slug", "model": "p:m", "reason": "..."}   at least one of client/model
  {"type": "end"}                                              end the session
  {"type": "ping"}

Outbound frames: `ready`, `turn.started`, `token` (coalesced deltas, at most ~30 a second),
`message.done`, `stopped`, `switched`, `ended`, `error` (code + message), `pong`.

Every frame about the session also goes to the group `session.<id>` so a second tab or device
watches the same answer live, across daphne processes when the channel layer is Redis. The
asking socket always gets its frames directly: if the channel layer fails, only the fan-out
degrades (logged).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.urls import reverse

from sessions_app import boundary, selectors, services
from sessions_app.errors import (
    MESSAGE_EMPTY,
    MESSAGE_TOO_LARGE,
    SESSION_BUSY,
    NotFound,
    ProviderFailed,
    SessionError,
)
from sessions_app.events import Done, Token
from sessions_app.live import brand_payload, session_brand_style
from sessions_app.models import ChatSession, MessageRole

logger = logging.getLogger(__name__)

# WebSocket close codes for refused connections (4000-4999 are for applications).
CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_FOUND = 4404

# Error codes of `error` frames beyond the session services' own (`SessionError.code`).
INVALID_JSON = "invalid_json"
INVALID_FRAME = "invalid_frame"
UNKNOWN_TYPE = "unknown_type"
INTERNAL_ERROR = "internal_error"

INVALID_JSON_MESSAGE = "The frame is not valid JSON."
BINARY_FRAME_MESSAGE = "Send JSON text frames, not binary ones."
NOT_AN_OBJECT_MESSAGE = 'A frame is a JSON object with a "type".'
UNKNOWN_TYPE_MESSAGE = "Unknown frame type {type!r}; expected one of: {known}."
FIELD_NOT_TEXT_MESSAGE = "{field!r} must be a string of at most {limit} characters."
BAD_TURN_MESSAGE = "'turn' must be 1-64 letters, digits, '-' or '_'."
SWITCH_NEEDS_TARGET_MESSAGE = "A switch names a client, a model, or both."
# Said when the cause is unknown, so it never claims the message was stored: reloading shows what was.
INTERNAL_ERROR_MESSAGE = "Something went wrong on our side; the error is logged. Reload to see what was stored."

TURN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
NAME_LIMIT = 200
REASON_LIMIT = 500
# Room for the JSON envelope around the largest message allowed (escapes can double it).
FRAME_OVERHEAD = 4096


class FrameError(Exception):
    """An inbound frame that cannot be acted on; answered with an `error` frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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

    def discard(self) -> None:
        """Drop the timer without sending (the socket is gone)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._parts.clear()


def _text_field(content: dict, field: str, limit: int, *, required: bool = False) -> str:
    value = content.get(field)
    if value is None:
        if required:
            raise FrameError("bad_request", MESSAGE_EMPTY)
        return ""
    if not isinstance(value, str) or len(value) > limit:
        raise FrameError("bad_request", FIELD_NOT_TEXT_MESSAGE.format(field=field, limit=limit))
    return value.strip()


class SessionConsumer(AsyncWebsocketConsumer):
    """One browser tab's connection to one work session."""

    # Seconds between token frames: at most ~30 frames a second per stream.
    token_interval = 1 / 30
    # A channel layer that does not answer within this long is treated as failed for the turn.
    fanout_timeout = 0.5

    KNOWN_TYPES = ("chat", "stop", "switch", "end", "ping")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.session_id: str = ""
        self.group: str = ""
        self.user = None
        self._turn: asyncio.Task | None = None
        # The turn whose answer is still open: cleared just before its last frame goes out,
        # so a chat sent right after `message.done` is not refused while fan-out finishes.
        self._open_turn: str | None = None
        self._closed = False
        self._fanout_ok = True
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._sender: asyncio.Task | None = None
        self._layer_receive: Callable[[], Awaitable[dict]] | None = None
        # The session and its messages as the last turn left them: the next turn's claim checks
        # they are still current and then need not read them again (see services.KnownSession).
        self._known: services.KnownSession | None = None

    # --- Channel layer resilience --------------------------------------------------------
    # Channels' dispatch loop awaits `channel_receive` alongside the socket; a failing channel
    # layer (Redis down) would end the consumer. Wrap it so only the fan-out degrades.

    @property
    def channel_receive(self) -> Callable[[], Awaitable[dict]]:
        return self._receive_from_layer

    @channel_receive.setter
    def channel_receive(self, receive: Callable[[], Awaitable[dict]]) -> None:
        self._layer_receive = receive

    async def _receive_from_layer(self) -> dict:
        delay = 0.5
        while True:
            try:
                return await self._layer_receive()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning(
                    "Channel layer receive failed for %s; retrying in %.1fs", self.group, delay, exc_info=True
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    # --- Connection ----------------------------------------------------------------------

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.user = user
        self.session_id = str(self.scope["url_route"]["kwargs"]["session_id"])
        try:
            ready = await database_sync_to_async(self._ready_payload)()
        except NotFound:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        self.group = f"session.{self.session_id}"
        try:
            await asyncio.wait_for(self.channel_layer.group_add(self.group, self.channel_name), self.fanout_timeout)
        except Exception:
            logger.warning("Could not join %s; this socket will not see other tabs' answers", self.group, exc_info=True)
        await self.accept()
        await self._send_frame(ready)

    async def disconnect(self, code: int) -> None:
        self._closed = True
        await self._cancel_turn()
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
        if self.group:
            try:
                await asyncio.wait_for(
                    self.channel_layer.group_discard(self.group, self.channel_name), self.fanout_timeout
                )
            except Exception:
                logger.warning("Could not leave %s", self.group, exc_info=True)

    # --- Inbound frames ------------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            content = self._parse(text_data, bytes_data)
            handler = getattr(self, f"_on_{content['type']}")
            await handler(content)
        except FrameError as exc:
            await self._send_error(exc.code, exc.message)
        except SessionError as exc:
            await self._send_error(exc.code, exc.message)
        except Exception:
            # The input boundary's last line: an error frame, never a 1011 close.
            logger.exception("Frame failed in session %s", self.session_id)
            await self._send_error(INTERNAL_ERROR, INTERNAL_ERROR_MESSAGE)

    def _parse(self, text_data: str | None, bytes_data: bytes | None) -> dict[str, Any]:
        if text_data is None:
            raise FrameError(INVALID_FRAME, BINARY_FRAME_MESSAGE)
        limit = settings.CHAT_MAX_MESSAGE_CHARS
        if len(text_data) > 2 * limit + FRAME_OVERHEAD:
            raise FrameError("message_too_large", MESSAGE_TOO_LARGE.format(size=len(text_data), limit=limit))
        try:
            content = boundary.load_json(text_data)
        except boundary.InputRefused as exc:
            if exc.message == boundary.NOT_JSON:
                raise FrameError(INVALID_JSON, INVALID_JSON_MESSAGE) from None
            raise FrameError(exc.code, exc.message) from None
        if not isinstance(content, dict) or not isinstance(content.get("type"), str):
            raise FrameError(INVALID_FRAME, NOT_AN_OBJECT_MESSAGE)
        if content["type"] not in self.KNOWN_TYPES:
            raise FrameError(
                UNKNOWN_TYPE,
                UNKNOWN_TYPE_MESSAGE.format(type=content["type"][:40], known=", ".join(self.KNOWN_TYPES)),
            )
        return content

    async def _on_ping(self, content: dict) -> None:
        await self._send_frame({"type": "pong"})

    async def _on_chat(self, content: dict) -> None:
        limit = settings.CHAT_MAX_MESSAGE_CHARS
        raw = content.get("message")
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            raise FrameError("bad_request", MESSAGE_EMPTY)
        if not isinstance(raw, str):
            raise FrameError("bad_request", FIELD_NOT_TEXT_MESSAGE.format(field="message", limit=limit))
        if len(raw) > limit:
            raise FrameError("message_too_large", MESSAGE_TOO_LARGE.format(size=len(raw), limit=limit))
        turn = content.get("turn")
        if turn is None:
            turn = uuid.uuid4().hex
        elif not isinstance(turn, str) or not TURN_ID.match(turn):
            raise FrameError("bad_request", BAD_TURN_MESSAGE)
        if self._streaming:
            raise FrameError("session_busy", SESSION_BUSY)
        self._open_turn = turn
        self._turn = asyncio.create_task(self._run_turn(turn, raw))
        self._turn.add_done_callback(self._log_turn_failure)

    async def _on_stop(self, content: dict) -> None:
        if self._streaming:
            await self._cancel_turn()
        else:
            # The answer may be streaming to another tab or device: ask its socket to stop.
            await self._fanout({"type": "session.stop"})

    async def _on_switch(self, content: dict) -> None:
        client = _text_field(content, "client", NAME_LIMIT)
        model = _text_field(content, "model", NAME_LIMIT)
        reason = _text_field(content, "reason", REASON_LIMIT)
        if not client and not model:
            raise FrameError("bad_request", SWITCH_NEEDS_TARGET_MESSAGE)
        if self._streaming:
            raise FrameError("session_busy", SESSION_BUSY)
        frame = await database_sync_to_async(self._switch)(client=client or None, model=model or None, reason=reason)
        await self._broadcast(frame)

    async def _on_end(self, content: dict) -> None:
        # Ending stops an answer in progress first; its partial text is stored.
        await self._cancel_turn()
        summary = await services.asession_end(session_id=self.session_id, user=self.user)
        frame = {
            "type": "ended",
            "summary": summary,
            "summary_url": reverse("session-summary", kwargs={"session_id": self.session_id}),
        }
        await self._broadcast(frame)

    # --- The answer ----------------------------------------------------------------------

    @property
    def _streaming(self) -> bool:
        return self._open_turn is not None and self._turn is not None and not self._turn.done()

    async def _run_turn(self, turn: str, message: str) -> None:
        """Stream one answer: deltas as coalesced `token` frames, then `message.done`."""
        self._fanout_ok = True
        started = {"type": "turn.started", "turn": turn, "message": message}
        shared = False
        closed = False  # the turn's last frame has gone out

        async def share(frame: dict) -> None:
            # This socket first (no fan-out latency before its tokens); other tabs hear of the
            # turn only once it is really under way (not refused as busy).
            nonlocal shared, closed
            if frame["type"] != "token":
                closed = True
                self._close_turn(turn)
            await self._send_frame(frame)
            if not shared:
                shared = True
                await self._fanout({"type": "session.frame", "frame": started})
            await self._fanout({"type": "session.frame", "frame": frame})

        async def emit(text: str) -> None:
            await share({"type": "token", "turn": turn, "text": text})

        coalescer = TokenCoalescer(emit, self.token_interval)
        await self._send_frame(started)
        known, self._known = self._known, None
        try:
            stream = services.session_chat(session_id=self.session_id, user=self.user, message=message, known=known)
            async with aclosing(stream) as events:
                async for event in events:
                    if isinstance(event, Token):
                        await coalescer.add(event.text)
                    elif isinstance(event, Done):
                        self._known = event.known
                        await coalescer.close()
                        payload = await database_sync_to_async(self._done_payload)(event)
                        await share({"type": "message.done", "turn": turn, **payload})
        except asyncio.CancelledError:
            # Stop, end or disconnect. Closing the stream made the service store the partial answer.
            if self._closed or closed:
                coalescer.discard()
                raise
            asyncio.current_task().uncancel()
            await coalescer.close()
            payload = await database_sync_to_async(self._latest_payload)()
            await share({"type": "stopped", "turn": turn, **payload})
        except ProviderFailed as exc:
            # The provider failed mid-turn: the user message and any partial answer are stored.
            if self._closed:
                coalescer.discard()
                return
            await coalescer.close()
            payload = await database_sync_to_async(self._latest_payload)()
            await share({"type": "error", "code": exc.code, "message": exc.message, "turn": turn, **payload})
        except SessionError as exc:
            # Refused before anything streamed (busy, ended, too large...): only this socket hears of it.
            coalescer.discard()
            self._close_turn(turn)
            await self._send_frame({"type": "error", "code": exc.code, "message": exc.message, "turn": turn})
        except Exception:
            logger.exception("Chat turn failed in session %s", self.session_id)
            if self._closed:
                coalescer.discard()
                return
            await coalescer.close()
            payload = await database_sync_to_async(self._latest_payload)()
            await share(
                {"type": "error", "code": INTERNAL_ERROR, "message": INTERNAL_ERROR_MESSAGE, "turn": turn, **payload}
            )

    def _close_turn(self, turn: str) -> None:
        if self._open_turn == turn:
            self._open_turn = None

    def _log_turn_failure(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("Chat turn task in session %s died", self.session_id, exc_info=task.exception())

    async def _cancel_turn(self) -> None:
        task = self._turn
        if task is None or task.done():
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise

    # --- Frames from other sockets of this session (the group) ---------------------------

    async def dispatch(self, message: dict) -> None:
        # Channels sweeps stale database connections before every handler: a hop to the one
        # database thread. Group events never touch the database, and with many streams they
        # are most of the traffic, so they skip the sweep and never queue behind the
        # database work of other answers.
        if message.get("type") in ("session.frame", "session.stop"):
            await getattr(self, message["type"].replace(".", "_"))(message)
            return
        await super().dispatch(message)

    async def session_frame(self, event: dict) -> None:
        if event.get("origin") == self.channel_name or self._closed:
            return
        await self._send_frame(event["frame"])

    async def session_stop(self, event: dict) -> None:
        if event.get("origin") != self.channel_name and self._streaming:
            await self._cancel_turn()

    # --- Sending -------------------------------------------------------------------------

    async def _send_frame(self, frame: dict) -> None:
        if not self._closed:
            await self.send(text_data=json.dumps(frame, separators=(",", ":"), cls=DjangoJSONEncoder))

    async def _send_error(self, code: str, message: str) -> None:
        await self._send_frame({"type": "error", "code": code, "message": message})

    async def _broadcast(self, frame: dict) -> None:
        """Send to this socket first, then to the session's other sockets through the group."""
        await self._send_frame(frame)
        await self._fanout({"type": "session.frame", "frame": frame})

    async def _fanout(self, event: dict) -> None:
        """Queue an event for the session's other sockets; never waits on the channel layer.

        One background task sends the queue in order, so a slow or hanging Redis delays
        only the other tabs, never this socket's own frames.
        """
        if not self.group or not self._fanout_ok or self._closed:
            return
        self._outbox.put_nowait({**event, "origin": self.channel_name})
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_outbox())

    async def _send_outbox(self) -> None:
        while not self._outbox.empty():
            event = self._outbox.get_nowait()
            if not self._fanout_ok:
                continue
            try:
                await asyncio.wait_for(self.channel_layer.group_send(self.group, event), self.fanout_timeout)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Degrade: other tabs miss this turn live (they refetch on reconnect); the asker is unaffected.
                self._fanout_ok = False
                logger.warning("Fan-out to %s failed; other tabs miss this answer live", self.group, exc_info=True)

    # --- Database work (run in a thread) -------------------------------------------------

    def _session(self) -> ChatSession:
        session = selectors.session_get_for_user(session_id=self.session_id, user=self.user)
        if session.user_id != self.user.pk:
            # Owner only: staff review sessions in the admin, not by joining a live chat.
            raise NotFound("No such session.")
        return session

    def _ready_payload(self) -> dict:
        session = self._session()
        return {
            "type": "ready",
            "session": selectors.session_as_dict(session),
            "streaming": session.turn_started_at is not None,
        }

    def _done_payload(self, event: Done) -> dict:
        return {
            "message": selectors.message_as_dict(event.message),
            "session": selectors.session_as_dict(event.session),
        }

    def _latest_payload(self) -> dict:
        """The stored answer of a stopped or failed turn, and the session's totals."""
        session = ChatSession.objects.select_related("domain", "brand").get(pk=self.session_id)
        latest = selectors.session_messages(session=session).last()
        stored = latest if latest is not None and latest.role == MessageRole.ASSISTANT else None
        return {
            "stored": selectors.message_as_dict(stored) if stored else None,
            "session": selectors.session_as_dict(session),
        }

    def _switch(self, *, client: str | None, model: str | None, reason: str) -> dict:
        stream = services.session_switch(
            session_id=self.session_id, user=self.user, client=client, model=model, reason=reason
        )
        session = ChatSession.objects.select_related("domain", "brand").get(pk=self.session_id)
        return {
            "type": "switched",
            "stream": selectors.stream_as_dict(stream),
            "session": selectors.session_as_dict(session),
            "client": {"slug": session.domain.slug, "name": session.domain.name},
            "model": session.current_model,
            "brand": brand_payload(session_brand_style(session)),
        }
