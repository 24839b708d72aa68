"""The chat WebSocket: `/ws/sessions/<id>/` streams a session's answers to its owner's pages.

Inbound frames (JSON objects, each validated before anything happens):
  {"type": "chat", "message": "...", "turn": "optional id"}   ask; one answer at a time
  {"type": "resume", "turn": "id or null", "after": n}        "I have token frames 1..n of this turn"
  {"type": "stop"}                                             stop the answer streaming now
  {"type": "switch", "client": "slug", "model": "p:m", "reason": "..."}   at least one of client/model
  {"type": "end"}                                              end the session (the owner only)
  {"type": "edit", "seq": n, "message": "..."}                 a new version with your message n changed
  {"type": "regenerate", "seq": n}                             a new version with answer n asked again
  {"type": "ping"}

Outbound frames: `ready`, `turn.started`, `token` (coalesced deltas, numbered `n`, at most ~30
a second), `message.done`, `stopped`, `switched`, `ended`, `resumed`, `version` (an edit or
regeneration made a new session: go there), `revoked`, `error` (code + message), `pong`.

A chat asked here runs as a task of the process (sessions_app/livechat.py), not of this socket:
closing the socket only stops watching. Every socket of the session, on any process, watches
the same answer; one that (re)connects mid-answer sends `resume` and gets exactly what it
missed, then the rest live. A refused connection is accepted and then closed, with 4401 (not
signed in) or 4404 (not found, or not yours), so the page can tell which.

Who may connect: the session's owner and the consultants it is shared with (a live invitation);
staff who are neither get 4404 too (they review sessions in the admin). A guest's socket is
closed with 4403 after a `revoked` frame as soon as the owner revokes the invitation: the
revocation is broadcast to the session's group, and every frame a guest sends re-checks it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.urls import reverse

from sessions_app import boundary, livechat, selectors, services
from sessions_app.errors import (
    MESSAGE_EMPTY,
    MESSAGE_TOO_LARGE,
    SESSION_BUSY,
    NotFound,
    SessionError,
)
from sessions_app.frames import ReadyFrame, SwitchedFrame
from sessions_app.live import REVOKED_EVENT, brand_payload, display_name, session_brand_style
from sessions_app.livechat import TokenCoalescer
from sessions_app.models import ChatSession, SessionInvitation, SessionStatus

logger = logging.getLogger(__name__)

__all__ = ["SessionConsumer", "TokenCoalescer"]

# WebSocket close codes for refused connections (4000-4999 are for applications).
CLOSE_UNAUTHENTICATED = 4401
CLOSE_REVOKED = 4403  # a guest whose invitation the owner revoked
CLOSE_NOT_FOUND = 4404

# Error codes of `error` frames beyond the session services' own (`SessionError.code`).
INVALID_JSON = "invalid_json"
INVALID_FRAME = "invalid_frame"
UNKNOWN_TYPE = "unknown_type"
INTERNAL_ERROR = livechat.INTERNAL_ERROR

INVALID_JSON_MESSAGE = "The frame is not valid JSON."
BINARY_FRAME_MESSAGE = "Send JSON text frames, not binary ones."
NOT_AN_OBJECT_MESSAGE = 'A frame is a JSON object with a "type".'
UNKNOWN_TYPE_MESSAGE = "Unknown frame type {type!r}; expected one of: {known}."
FIELD_NOT_TEXT_MESSAGE = "{field!r} must be a string of at most {limit} characters."
BAD_TURN_MESSAGE = "'turn' must be 1-64 letters, digits, '-' or '_'."
BAD_AFTER_MESSAGE = "'after' must be the number of the last token frame you have (0 for none)."
SWITCH_NEEDS_TARGET_MESSAGE = "A switch names a client, a model, or both."
BAD_SEQ_MESSAGE = "'seq' must be a message number (a whole number), or left out for the latest."
END_NOT_OWNER_MESSAGE = "Only {owner}, who started this session, can end it. You can stop an answer or leave the page."
REVOKED_MESSAGE = "{owner} stopped sharing this session with you."
VERSION_WAIT_MESSAGE = "Wait for the answer to finish (or stop it) before making a new version."
# Said when the cause is unknown, so it never claims the message was stored: reloading shows what was.
INTERNAL_ERROR_MESSAGE = "Something went wrong on our side; the error is logged. Reload to see what was stored."

TURN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_FRAME_NUMBER = 10_000_000
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
    """One browser tab's connection to one work session: a watcher of its live turns."""

    KNOWN_TYPES = ("chat", "resume", "stop", "switch", "end", "edit", "regenerate", "ping")
    # Seconds between token frames of the turns this socket asks for: at most ~30 a second.
    token_interval = livechat.TOKEN_INTERVAL

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.session_id: str = ""
        self.group: str = ""
        self.user: Any = None
        # An invited consultant rather than the owner: their invitation is re-checked on every frame.
        self.guest = False
        self.owner_name = ""
        self.hub: livechat.Hub | None = None
        self._closed = False
        self._joined = False
        self._send_lock = asyncio.Lock()
        # Per turn, the last token frame this socket has: frames at or below it are dropped,
        # and a turn's frames reach the socket only once it is in step (watching from the start,
        # or resumed).
        self._in_step: dict[str, int] = {}
        # A catch-up asked of another process: the frames that arrive from the group meanwhile.
        self._catching_up: dict | None = None
        self._layer_receive: Callable[[], Awaitable[dict]] | None = None
        # The session and its messages as the last turn left them: the next turn's claim checks
        # they are still current and then need not read them again (see services.KnownSession).
        self.known: services.KnownSession | None = None

    @property
    def watching(self) -> livechat.Hub:
        """The hub this socket watches through (set in `connect`, before any frame arrives)."""
        if self.hub is None:
            raise RuntimeError("The socket is not connected.")
        return self.hub

    # --- Channel layer resilience --------------------------------------------------------
    # Channels' dispatch loop awaits `channel_receive` alongside the socket; a failing channel
    # layer (Redis down) would end the consumer. Wrap it so only the fan-out degrades, and join
    # the group again once it answers (a restarted Redis has forgotten every group).

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
            except Exception as exc:
                if self.hub is not None:
                    self.hub.layer_failed(exc)  # logged once; the hub rejoins the groups
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def join(self) -> None:
        """Join the session's group (other processes' frames, revocations); the hub calls it again after an outage."""
        if self.hub is None or self.channel_layer is None or not self.group or self._closed:
            return
        await asyncio.wait_for(self.channel_layer.group_add(self.group, self.channel_name), livechat.FANOUT_TIMEOUT)
        self._joined = True

    async def _join(self) -> None:
        # Joined on any channel layer, the in-memory one too: revocations reach the group from
        # the request that made them, even when no answer frame needs to cross processes.
        if self.hub is None or self.channel_layer is None or self.hub.outage.down:
            return  # while the layer is down the hub joins us once it answers
        try:
            await self.join()
        except Exception as exc:
            logger.warning("Could not join %s; this socket misses other processes' answers for now", self.group)
            self.hub.layer_failed(exc)

    # --- Connection ----------------------------------------------------------------------

    async def connect(self) -> None:
        # Accept, then close with an application code: a refused handshake reaches the page as
        # a bare 1006, which cannot tell "sign in again" from "server down".
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.accept()
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.user = user
        self.session_id = str(self.scope["url_route"]["kwargs"]["session_id"])
        try:
            ready = await database_sync_to_async(self._ready_payload)()
        except NotFound:
            await self.accept()
            await self.close(code=CLOSE_NOT_FOUND)
            return
        self.hub = livechat.hub()
        self.group = f"session.{self.session_id}"
        self.hub.watch(self.session_id, self)
        await self._join()
        await self.accept()
        await self._send_frame(ready)

    async def disconnect(self, code: int) -> None:
        # Only stop watching: an answer this socket asked for goes on (livechat.py).
        self._closed = True
        if self.hub is not None:
            self.hub.unwatch(self.session_id, self)
        if self._joined:
            try:
                await asyncio.wait_for(
                    self.channel_layer.group_discard(self.group, self.channel_name), livechat.FANOUT_TIMEOUT
                )
            except Exception:
                logger.info("Could not leave %s", self.group)

    # --- Inbound frames ------------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.guest and not await database_sync_to_async(self._still_invited)():
            await self._revoked()
            return
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
        if self.watching.busy(self.session_id):
            raise FrameError("session_busy", SESSION_BUSY)
        # This socket hears of its turn at once; the others once it holds the session's claim.
        self._in_step[turn] = 0
        await self._send_frame({"type": "turn.started", "turn": turn, "message": raw})
        self.watching.start_turn(session_id=self.session_id, turn_id=turn, message=raw, user=self.user, asker=self)

    async def _on_resume(self, content: dict) -> None:
        turn = content.get("turn")
        after = content.get("after", 0)
        if turn is not None and (not isinstance(turn, str) or not TURN_ID.match(turn)):
            raise FrameError("bad_request", BAD_TURN_MESSAGE)
        if isinstance(after, bool) or not isinstance(after, int) or not 0 <= after <= MAX_FRAME_NUMBER:
            raise FrameError("bad_request", BAD_AFTER_MESSAGE)
        live = self.watching.live(self.session_id)
        if live is not None:
            # Read the snapshot and mark this socket in step without yielding: the frames
            # published after it are exactly the ones it still lacks.
            frames, n = live.catch_up(turn_id=turn, after=after)
            self._in_step[live.turn_id] = n
            for frame in frames:
                await self._send_frame(frame)
            await self._send_frame({"type": "resumed", "turn": live.turn_id, "n": n})
            return
        if self._catching_up is not None:
            return  # a catch-up is on its way; it ends with its own `resumed`
        if not self.watching.shared or not await database_sync_to_async(self._claimed)():
            await self._send_frame({"type": "resumed", "turn": None})
            return
        # The answer streams in another process: ask it; group frames wait until it replies.
        self._catching_up = {"frames": []}
        await self.watching.ask_snapshot(
            session_id=self.session_id, reply_to=self.channel_name, turn_id=turn, after=after
        )
        asyncio.get_running_loop().call_later(
            livechat.SNAPSHOT_TIMEOUT, lambda: asyncio.ensure_future(self._caught_up(None))
        )

    async def _on_stop(self, content: dict) -> None:
        # Stop the answer wherever it streams: here at once, elsewhere through the shared cache.
        if self.watching.stop_here(self.session_id, services.STOP_USER) is None:
            await database_sync_to_async(services.session_stop)(session_id=self.session_id, user=self.user)

    async def _on_switch(self, content: dict) -> None:
        client = _text_field(content, "client", NAME_LIMIT)
        model = _text_field(content, "model", NAME_LIMIT)
        reason = _text_field(content, "reason", REASON_LIMIT)
        if not client and not model:
            raise FrameError("bad_request", SWITCH_NEEDS_TARGET_MESSAGE)
        if self.watching.busy(self.session_id):
            raise FrameError("session_busy", SESSION_BUSY)
        frame = await database_sync_to_async(self._switch)(client=client or None, model=model or None, reason=reason)
        await self.watching.publish(self.session_id, frame)

    async def _on_end(self, content: dict) -> None:
        if self.guest:
            # Refused before anything stops: the answer streaming goes on for both of them.
            raise FrameError("not_owner", END_NOT_OWNER_MESSAGE.format(owner=self.owner_name))
        # Ending stops an answer in progress first; its partial text is stored (and `stopped` sent).
        live = self.watching.stop_here(self.session_id, services.STOP_END)
        if live is not None:
            await live.done.wait()
        summary = await services.asession_end(session_id=self.session_id, user=self.user)
        frame = {
            "type": "ended",
            "summary": summary,
            "summary_url": reverse("session-summary", kwargs={"session_id": self.session_id}),
        }
        await self.watching.publish(self.session_id, frame)

    async def _on_edit(self, content: dict) -> None:
        seq = self._seq(content)
        limit = settings.CHAT_MAX_MESSAGE_CHARS
        raw = content.get("message")
        if not isinstance(raw, str) or not raw.strip():
            raise FrameError("bad_request", MESSAGE_EMPTY)
        if len(raw) > limit:
            raise FrameError("message_too_large", MESSAGE_TOO_LARGE.format(size=len(raw), limit=limit))
        await self._new_version(
            "edit", lambda: services.session_edit(session_id=self.session_id, user=self.user, seq=seq, message=raw)
        )

    async def _on_regenerate(self, content: dict) -> None:
        seq = self._seq(content)
        await self._new_version(
            "regenerate", lambda: services.session_regenerate(session_id=self.session_id, user=self.user, seq=seq)
        )

    @staticmethod
    def _seq(content: dict) -> int | None:
        seq = content.get("seq")
        if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int)):
            raise FrameError("bad_request", BAD_SEQ_MESSAGE)
        return seq

    async def _new_version(self, kind: str, make: Callable[[], services.NewVersion]) -> None:
        """Make the new version (services/versions.py), start its first turn here, send the page there.

        The turn runs as a task of the process, like any chat page's answer: the page that asked
        goes to the new session and resumes it there, and leaving that page does not stop it.
        """
        if self.watching.busy(self.session_id):
            raise FrameError("session_busy", VERSION_WAIT_MESSAGE)
        version, ended = await database_sync_to_async(self._make_version)(make)
        branch_id = str(version.session.pk)
        self.watching.start_turn(
            session_id=branch_id, turn_id=uuid.uuid4().hex, message=version.message, user=self.user, asker=None
        )
        await self._send_frame(
            {
                "type": "version",
                "kind": kind,
                "replaces_seq": version.replaces_seq,
                "session": selectors.session_as_dict(version.session),
                "url": reverse("session-chat", kwargs={"session_id": branch_id}),
            }
        )
        if ended is not None:
            # The owner's edit ended this session (two timers never bill the same minutes).
            await self.watching.publish(self.session_id, ended, exclude=self)

    def _make_version(self, make: Callable[[], services.NewVersion]) -> tuple[services.NewVersion, dict | None]:
        was_active = self.session_active()
        version = make()
        if not was_active or self.session_active():
            return version, None
        summary = selectors.session_summary(
            session=selectors.session_get_for_user(session_id=self.session_id, user=self.user)
        )
        url = reverse("session-summary", kwargs={"session_id": self.session_id})
        return version, {"type": "ended", "summary": summary, "summary_url": url}

    def session_active(self) -> bool:
        return ChatSession.objects.filter(pk=self.session_id, status=SessionStatus.ACTIVE).exists()

    # --- Frames of the session's turns (from this process's hub, or from the group) -------

    async def take(self, frame: dict, text: str | None = None, *, remote: bool = False) -> None:
        """Send a frame about the session, unless this socket already has it or is not in step."""
        if self._closed:
            return
        kind, turn = frame.get("type"), frame.get("turn")
        if remote and self._catching_up is not None and turn is not None:
            self._catching_up["frames"].append(frame)
            return
        if kind == "token":
            have = self._in_step.get(turn)
            n = frame.get("n")
            if have is None or not isinstance(n, int) or n <= have:
                return  # not in step with this turn (it resumes first), or already sent
            if n > have + 1 and remote:
                # Frames were lost between processes (a channel layer outage): fetch the gap.
                await self._on_resume({"turn": turn, "after": have})
                return
            self._in_step[turn] = n
        elif kind == "turn.started" and not frame.get("resumed"):
            self._in_step[turn] = 0
        elif kind in livechat.FINAL_FRAMES and turn is not None:
            self._in_step.pop(turn, None)
        async with self._send_lock:
            if not self._closed:
                await self.send(text_data=text if text is not None else livechat.dumps(frame))

    async def _caught_up(self, reply: dict | None) -> None:
        waiting, self._catching_up = self._catching_up, None
        if waiting is None:
            return  # answered already (or timed out already)
        turn = None
        if reply is not None and isinstance(reply.get("frames"), list):
            turn = reply.get("turn")
            self._in_step[turn] = reply.get("n", 0)
            for frame in reply["frames"]:
                await self._send_frame(frame)
        await self._send_frame({"type": "resumed", "turn": turn, "n": self._in_step.get(turn, 0) if turn else 0})
        for frame in waiting["frames"]:
            await self.take(frame, remote=True)

    async def dispatch(self, message: dict) -> None:
        # Channels sweeps stale database connections before every handler: a hop to the one
        # database thread, queued behind the database work of every other answer. Group events
        # never touch the database, and inbound frames that do go through
        # `database_sync_to_async`, which sweeps in the thread itself; so neither waits for the
        # hop (a `resume` is answered from memory, a `chat` starts its turn at once).
        kind = message.get("type")
        if kind == "session.frame":
            await self.session_frame(message)
        elif kind == "websocket.receive":
            await self.websocket_receive(message)
        elif kind == "websocket.connect":
            await self.websocket_connect(message)  # its database work sweeps in its own hop
        elif kind == "websocket.disconnect":
            await self.websocket_disconnect(message)  # touches no database
        elif kind == "turn.snapshot.reply":
            await self._caught_up(message)
        elif kind == REVOKED_EVENT:
            await self.session_revoked(message)
        else:
            await super().dispatch(message)

    async def session_frame(self, event: dict) -> None:
        if self.hub is None or event.get("origin") == self.hub.id:
            return  # from this process: its sockets had it straight from the hub
        frame = event.get("frame")
        if isinstance(frame, dict):
            await self.take(frame, remote=True)

    async def session_revoked(self, event: dict) -> None:
        """The owner revoked invitations: a guest among them is told and closed at once."""
        users = event.get("users")
        if self.guest and isinstance(users, list) and self.user.pk in users:
            await self._revoked()

    async def _revoked(self) -> None:
        await self._send_frame({"type": "revoked", "message": REVOKED_MESSAGE.format(owner=self.owner_name)})
        await self.close(code=CLOSE_REVOKED)
        # Closing ends the socket's watching at once, whatever the client does next.
        await self.disconnect(CLOSE_REVOKED)

    # --- Sending -------------------------------------------------------------------------

    async def _send_frame(self, frame: dict) -> None:
        async with self._send_lock:
            if not self._closed:
                await self.send(text_data=livechat.dumps(frame))

    async def _send_error(self, code: str, message: str) -> None:
        await self._send_frame({"type": "error", "code": code, "message": message})

    # --- Database work (run in a thread) -------------------------------------------------

    def _session(self) -> ChatSession:
        # Participants only (the owner, or a live invitation): staff review sessions in the
        # admin, not by joining a live chat.
        session = selectors.session_get_for_participant(session_id=self.session_id, user=self.user)
        self.guest = session.user_id != self.user.pk
        if self.guest:
            self.owner_name = display_name(session.user)
        return session

    def _still_invited(self) -> bool:
        # One indexed EXISTS per frame a guest sends; never per token (those go the other way).
        return SessionInvitation.objects.live().filter(session_id=self.session_id, user_id=self.user.pk).exists()

    def _ready_payload(self) -> ReadyFrame:
        session = self._session()
        return {
            "type": "ready",
            "session": selectors.session_as_dict(session),
            "streaming": session.turn_started_at is not None,
            "owner": not self.guest,
        }

    def _claimed(self) -> bool:
        return ChatSession.objects.filter(pk=self.session_id, turn_started_at__isnull=False).exists()

    def _switch(self, *, client: str | None, model: str | None, reason: str) -> SwitchedFrame:
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
