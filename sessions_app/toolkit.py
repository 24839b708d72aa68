"""A small facade over the session services for scripts and notebooks.

    from sessions_app.toolkit import SessionManager

    sm = SessionManager(user="olivia", client="acme", model="ollama:llama3.2")
    sm.create_session(name="Pricing questions")
    answer = sm.chat("What is our refund policy?", on_token=lambda t: print(t, end=""))
    print(answer.tokens, answer.cost_usd)
    sm.history()                     # the messages as dicts
    branch = sm.branch(at=2)         # a new session with messages 1..2 (not billed again)
    sm.search("refund")              # ranked hits in your own sessions
    document = sm.export()           # the versioned JSON export, as a dict
    result = sm.import_(document)    # a new session, marked imported; result.valid

Everything goes through the same services as the web pages, so it is billed and sealed the
same way. `OllamaSessionManager` (at the end) is the original design's spelling of the same. `chat` is synchronous; it works from plain scripts and from Jupyter (which already
runs an event loop) alike.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import threading
from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path

from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from django.db import connections

from billing.models import ClientDomain
from sessions_app import conversation, selectors, services, transfer
from sessions_app.archive import stored_messages
from sessions_app.errors import BadInput, NotFound
from sessions_app.events import Done, Token
from sessions_app.models import ChatSession, SessionMessage, SessionSource
from sessions_app.shapes import MessageShape, SessionShape, SummaryShape

NO_SESSION = "No current session: call create_session() first or pass session=."


def _sync_safe(method):
    """Run the method in a worker thread when this thread already runs an event loop (Jupyter)."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return method(*args, **kwargs)
        box: dict = {}

        def worker() -> None:
            try:
                box["value"] = method(*args, **kwargs)
            except BaseException as exc:
                box["error"] = exc
            finally:
                connections.close_all()

        thread = threading.Thread(target=worker, name=f"session-manager-{method.__name__}")
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]

    return wrapper


class SessionManager:
    """Chat, branch, search, export and import as one consultant, optionally for one client."""

    @_sync_safe
    def __init__(self, user, client: str | None = None, model: str | None = None) -> None:
        if isinstance(user, str):
            User = get_user_model()
            found = User.objects.filter(**{User.USERNAME_FIELD: user}, is_active=True).first()
            if found is None:
                raise NotFound(f"No active user named {user!r}.")
            user = found
        self.user = user
        self.client = client
        self.model = model
        self.session: ChatSession | None = None

    def __repr__(self) -> str:
        current = f" session={str(self.session.session_id)[:8]}" if self.session else ""
        return f"<SessionManager user={self.user.get_username()} client={self.client} model={self.model}{current}>"

    # --- sessions -----------------------------------------------------------------------------

    def _resolve(self, session) -> ChatSession:
        if session is None:
            if self.session is None:
                raise BadInput(NO_SESSION)
            return selectors.session_get_for_user(session_id=self.session.pk, user=self.user)
        if isinstance(session, ChatSession):
            return selectors.session_get_for_user(session_id=session.pk, user=self.user)
        return conversation.session_resolve(ident=str(session), user=self.user)

    @_sync_safe
    def use(self, session) -> ChatSession:
        """Make `session` (object, UUID or unique prefix) the current one."""
        self.session = self._resolve(session)
        return self.session

    @_sync_safe
    def create_session(
        self, *, name: str = "", system_prompt: str = "", client: str | None = None, model: str | None = None
    ) -> ChatSession:
        client = client or self.client
        model = model or self.model
        if not client:
            raise BadInput("Name the client: SessionManager(..., client='slug') or create_session(client=...).")
        if not model:
            raise BadInput("Name the model: SessionManager(..., model='provider:model') or create_session(model=...).")
        self.session = services.session_start(
            user=self.user,
            client=client,
            model=model,
            name=name,
            system_prompt=system_prompt,
            source=SessionSource.CLI,
        )
        return self.session

    @_sync_safe
    def sessions(self, *, client: str | None = None, status: str | None = None) -> list[ChatSession]:
        return list(selectors.session_list(user=self.user, client=client, status=status))

    @_sync_safe
    def end(self, session=None) -> SummaryShape:
        target = self._resolve(session)
        return services.session_end(session_id=target.pk, user=self.user)

    # --- chatting -----------------------------------------------------------------------------

    @_sync_safe
    def chat(self, message: str, *, session=None, on_token: Callable[[str], None] | None = None) -> SessionMessage:
        """Send `message`, wait for the answer and return the stored assistant message.

        A new session is started (with the manager's client and model) when there is none.
        `on_token` receives each text delta as it arrives. Provider failures raise
        `ProviderFailed`/`ProviderTimeout` after the partial answer is stored.
        """
        if session is None and self.session is None:
            self.create_session()
        target = self._resolve(session)
        user = self.user

        async def run() -> Done:
            done = None
            async with aclosing(services.session_chat(session_id=target.pk, user=user, message=message)) as events:
                async for event in events:
                    if isinstance(event, Token) and on_token is not None:
                        on_token(event.text)
                    elif isinstance(event, Done):
                        done = event
            return done

        done = async_to_sync(run)()
        self.session = done.session
        return done.message

    # --- conversation tools ---------------------------------------------------------------

    @_sync_safe
    def history(self, session=None) -> list[MessageShape]:
        target = self._resolve(session)
        messages = stored_messages(target, related=("domain", "author"))
        return [selectors.message_as_dict(m) for m in messages]

    @_sync_safe
    def summary(self, session=None) -> SummaryShape:
        return selectors.session_summary(session=self._resolve(session))

    @_sync_safe
    def branch(self, session=None, *, at: int | None = None, name: str = "") -> ChatSession:
        """A new session with copies of messages 1..at (all by default); it becomes current."""
        target = self._resolve(session)
        self.session = services.session_branch(session_id=target.pk, user=self.user, at_seq=at, name=name)
        return self.session

    @_sync_safe
    def search(self, query: str, *, limit: int = conversation.SEARCH_DEFAULT_LIMIT) -> list[conversation.SearchHit]:
        return conversation.messages_search(user=self.user, query=query, limit=limit, client=self.client)

    @_sync_safe
    def export(self, session=None, path: str | Path | None = None) -> dict:
        """The export document; also written to `path` when given."""
        document = transfer.session_export(session=self._resolve(session))
        if path is not None:
            Path(path).write_text(json.dumps(document, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        return document

    @_sync_safe
    def import_(self, source: dict | str | bytes | Path, *, client: str | None = None) -> transfer.ImportResult:
        """Import a document (dict, JSON text or a file path); the new session becomes current."""
        if isinstance(source, Path) or (isinstance(source, str) and not source.lstrip().startswith("{")):
            source = Path(source).read_bytes()
        result = transfer.session_import(user=self.user, data=source, client=client or self.client)
        self.session = result.session
        return result

    @_sync_safe
    def stats(self) -> dict:
        return conversation.sessions_stats(user=self.user, client=self.client)


# --- The original design's Python API ---------------------------------------------------------

NO_USER = "Name the consultant: OllamaSessionManager(user='name') or set CHAT_USER."
NO_CLIENT = "Name the client: OllamaSessionManager(client='slug'), create_session(client='slug') or set CHAT_CLIENT."


class ChatReply(str):
    """The answer's text (what the original `chat` returned), with the stored message behind it."""

    message: SessionMessage

    def __new__(cls, message: SessionMessage) -> ChatReply:
        reply = super().__new__(cls, message.content)
        reply.message = message
        return reply

    @property
    def session_id(self) -> str:
        return str(self.message.session_id)

    @property
    def tokens(self) -> int:
        return self.message.tokens

    @property
    def cost_usd(self):
        return self.message.cost_usd


class OllamaSessionManager:
    """The original design's session manager, over the same billed, sealed sessions.

        from sessions_app import OllamaSessionManager

        manager = OllamaSessionManager()                       # CHAT_USER, CHAT_CLIENT, CHAT_MODEL
        session_id = manager.create_session("Code review", "You are a careful reviewer.")
        print(manager.chat(session_id, "What should I check first?"))
        manager.get_conversation_history(session_id)           # [{"role", "content", ...}, ...]

    Sessions are named by their id (a string; a unique prefix of 8+ characters works too).
    """

    def __init__(self, user=None, client: str | None = None, model: str | None = None) -> None:
        from django.conf import settings

        user = user or os.environ.get("CHAT_USER")
        if not user:
            raise BadInput(NO_USER)
        self.client = client or os.environ.get("CHAT_CLIENT") or settings.CHAT_CLIENT or None
        self.model = model or os.environ.get("CHAT_MODEL") or settings.CHAT_MODEL
        self._manager = SessionManager(user, client=self.client, model=self.model)
        self.user = self._manager.user

    def __repr__(self) -> str:
        return f"<OllamaSessionManager user={self.user.get_username()} client={self.client} model={self.model}>"

    @_sync_safe
    def _default_client(self) -> str:

        clients = list(ClientDomain.objects.active().open_to(self.user).values_list("slug", flat=True)[:2])
        if len(clients) != 1:
            raise BadInput(NO_CLIENT)
        return clients[0]

    def create_session(self, name: str | None = None, system_prompt: str | None = None, **kw) -> str:
        """Start a session; return its id. `client=`, `model=` and `template=` may be given too."""
        template = kw.pop("template", None)
        client = kw.pop("client", None)
        model = kw.pop("model", None)
        if kw:
            raise BadInput(f"create_session() got unknown arguments: {', '.join(sorted(kw))}.")
        if template is not None:
            # The template's own client wins over the manager's default, not over an explicit client=.
            session = _start_from_template(
                user=self.user,
                template=template,
                client=client,
                default_client=self.client,
                model=model,
                name=name or "",
                prompt=system_prompt,
            )
        else:
            session = self._manager.create_session(
                name=name or "",
                system_prompt=system_prompt or "",
                client=client or self.client or self._default_client(),
                model=model or self.model,
            )
        self._manager.session = session
        return str(session.session_id)

    def chat(self, session_id, text: str, *, model: str | None = None, on_token=None) -> ChatReply:
        """Send `text` in the session and return the answer (a str, with `.tokens`, `.cost_usd`, `.message`).

        `model=` switches the session to that model first (recorded as a context stream).
        """
        session = self._manager.use(str(session_id))
        if model and model != session.current_model:
            _switch(session=session, user=self.user, model=model)
        return ChatReply(self._manager.chat(text, session=session, on_token=on_token))

    def get_conversation_history(self, session_id) -> list[dict]:
        """The messages in order, as dicts: role, content, timestamp, model, tokens, cost_usd, author, ..."""
        return self._manager.history(str(session_id))

    def list_sessions(self, *, status: str | None = None) -> list[SessionShape]:
        return [selectors.session_as_dict(s) for s in self._manager.sessions(status=status)]

    def end_session(self, session_id) -> SummaryShape:
        """End the session and return its summary (time, cost, per client)."""
        return self._manager.end(str(session_id))


@_sync_safe
def _start_from_template(*, user, template, client, default_client, model, name: str, prompt) -> ChatSession:
    preset = services.template_resolve(template=template, user=user, client=client)
    return services.session_start_from_template(
        user=user,
        template=preset,
        client=client or (None if preset.client_id else default_client),
        model=model,
        name=name,
        system_prompt=prompt or "",
        source=SessionSource.CLI,
    )


@_sync_safe
def _switch(*, session: ChatSession, user, model: str) -> None:
    services.session_switch(session_id=session.pk, user=user, model=model)
