"""`manage.py chat`: the terminal form of the work sessions (same services as the web pages).

Exit status: 0 on success, 1 when the provider or the session fails (one line on stderr;
the user message and any partial answer are stored), 2 for bad usage, 130 when stopped
with Ctrl-C (the partial answer is stored).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
from contextlib import aclosing
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from billing.models import ClientDomain, LLMUsage
from billing.money import format_cost
from sessions_app import conversation, selectors, services, transfer
from sessions_app.archive import stored_messages
from sessions_app.errors import BadInput, ProviderFailed, SessionError
from sessions_app.events import Done, Token
from sessions_app.models import ChatSession, SessionSource, SessionStatus
from sessions_app.refs import Person

DEFAULT_MODEL = "ollama:llama3.2"
USAGE, FAILED, INTERRUPTED, BROKEN_PIPE = 2, 1, 130, 141

ACTIONS = ("new", "send", "list", "history", "clean", "branch", "search", "export", "import_file", "stats")
BARE = "bare"  # a MESSAGE and no action: the original design's `ollama-chat MESSAGE`
# The options each action accepts besides itself; anything else is a usage error.
COMPANIONS = {
    "new": {"model", "client", "user", "system", "name", "template"},
    "send": {"model", "client", "user"},
    BARE: {"model", "client", "user", "system", "name", "template"},
    "list": {"client", "user", "limit", "hidden"},
    "history": {"user"},
    "clean": {"user", "dry_run"},
    "branch": {"user", "at", "name"},
    "search": {"user", "client", "limit"},
    "export": {"user", "output"},
    "import_file": {"user", "client"},
    "stats": {"user", "client"},
}
FLAG_NAMES = {
    "new": "-n",
    "send": "-s",
    "list": "-l",
    "history": "--history",
    "clean": "--clean",
    "branch": "--branch",
    "search": "--search",
    "export": "--export",
    "import_file": "--import",
    "stats": "--stats",
    "model": "-m",
    "client": "--client",
    "user": "--user",
    "system": "--system",
    "name": "--name",
    "at": "--at",
    "output": "-o",
    "dry_run": "--dry-run",
    "limit": "--limit",
    "template": "--template",
    "hidden": "--hidden",
    BARE: "MESSAGE",
}
NO_ACTION = (
    "Say what to do: MESSAGE, -n MESSAGE, -s ID MESSAGE, -l, --history ID, --clean HOURS, --branch ID, "
    "--search TEXT, --export ID, --import FILE or --stats (see --help)."
)
NO_USER = "Name the user with --user NAME or set CHAT_USER."
NO_CLIENT = "Name the client to bill with --client SLUG or set CHAT_CLIENT."
SEND_NEEDS_MESSAGE = "-s needs a session ID and a MESSAGE: -s ID [-m MODEL] MESSAGE."
ONE_MESSAGE = 'Give one MESSAGE (quote it: ollama-chat "two words"); got {count}: {words}.'
MESSAGE_WITH_ACTION = "A MESSAGE cannot be used with {flag}; to send one, use -n MESSAGE or -s ID MESSAGE."


def _positive_hours(raw: str) -> float:
    import argparse

    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"HOURS must be a number, got {raw!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"HOURS must be more than 0, got {raw!r}")
    return value


def _positive_int(raw: str) -> int:
    import argparse

    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {raw!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {raw!r}")
    return value


def dollars(value: Decimal | None) -> str:
    return format_cost(value, "USD")  # one formatter for money everywhere (billing.money)


def short(session_id) -> str:
    return str(session_id)[:8]


def local(value) -> str:
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S") if value else "—"


class _Interrupt:
    """Turns the first Ctrl-C into a cancellation of the streaming task (so the partial is stored)."""

    def __init__(self) -> None:
        self.loop = None
        self.task = None
        self.fired = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C stays a KeyboardInterrupt
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.fired or self.loop is None or self.task is None:
            raise KeyboardInterrupt
        self.fired = True
        self.loop.call_soon_threadsafe(self.task.cancel)


class Command(BaseCommand):
    help = (
        "Chat from the terminal in billable work sessions: start (-n), continue (-s), list (-l), "
        "show (--history), branch, search, export and import sessions, clean idle ones, and stats."
    )

    def add_arguments(self, parser):
        action = parser.add_mutually_exclusive_group()
        action.add_argument("-n", "--new", metavar="MESSAGE", help="start a session and send MESSAGE")
        action.add_argument(
            "-s",
            "--continue",
            dest="send",
            nargs="+",
            metavar=("ID", "MESSAGE"),
            help="send MESSAGE in session ID (UUID or unique prefix of 8+ characters); -m MODEL may come before or "
            "after the ID",
        )
        action.add_argument("-l", "--list", action="store_true", help="list sessions as a table")
        action.add_argument("--history", metavar="ID", help="print a session's messages with times, tokens, cost")
        action.add_argument(
            "--clean",
            metavar="HOURS",
            type=_positive_hours,
            help="end sessions idle longer than HOURS, remove empty ones (never invoiced ones)",
        )
        action.add_argument("--branch", metavar="ID", help="new session with the messages of ID (up to --at N)")
        action.add_argument("--search", metavar="TEXT", help="full-text search over your messages")
        action.add_argument("--export", metavar="ID", help="write a session as JSON (stdout, or -o FILE)")
        action.add_argument(
            "--import", dest="import_file", metavar="FILE", help="import an exported session ('-': stdin)"
        )
        action.add_argument("--stats", action="store_true", help="sessions, messages, averages, per client")
        parser.add_argument("-m", "--model", help=f"provider:model (default CHAT_MODEL or {DEFAULT_MODEL})")
        parser.add_argument("--client", metavar="SLUG", help="client to bill (new session, switch, filters)")
        parser.add_argument("--user", metavar="NAME", help="the consultant (default: CHAT_USER)")
        parser.add_argument("--system", metavar="TEXT", help="system prompt of a new session")
        parser.add_argument("--name", metavar="TEXT", help="name of a new session or branch")
        parser.add_argument("--at", metavar="N", type=_positive_int, help="with --branch: copy messages 1..N")
        parser.add_argument("-o", "--output", metavar="FILE", help="with --export: write to FILE")
        parser.add_argument("--dry-run", action="store_true", help="with --clean: show what would happen")
        parser.add_argument("--limit", metavar="N", type=_positive_int, help="rows for -l (50) and --search (20)")
        parser.add_argument("--template", metavar="NAME", help="start a new session from a conversation template")
        parser.add_argument("--hidden", action="store_true", help="with -l: list your hidden sessions")
        parser.add_argument(
            "message",
            nargs="*",
            metavar="MESSAGE",
            help="alone: continue your newest active session (on --client, if given) or start one, and send MESSAGE",
        )

    # --- dispatch -------------------------------------------------------------------------

    def handle(self, *args, **options):
        chosen = [name for name in ACTIONS if options.get(name) not in (None, False)]
        words = options.get("message") or []
        if not chosen and not words:
            raise CommandError(NO_ACTION, returncode=USAGE)
        action = chosen[0] if chosen else BARE
        options[BARE] = self._bare_message(action, words, options)
        stray = [
            FLAG_NAMES[name]
            for name in FLAG_NAMES
            if name not in (*ACTIONS, BARE)
            and name not in COMPANIONS[action]
            and options.get(name) not in (None, False)
        ]
        if stray:
            raise CommandError(
                f"{', '.join(stray)} cannot be used with {FLAG_NAMES[action]}.",
                returncode=USAGE,
            )
        self.options = options
        try:
            getattr(self, f"_{action}")(options[action])
        except KeyboardInterrupt:
            self.stderr.write("Interrupted.")
            raise CommandError("Stopped by Ctrl-C.", returncode=INTERRUPTED) from None
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, as Unix tools do.
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(BROKEN_PIPE) from None
        except SessionError as exc:
            raise CommandError(exc.message, returncode=FAILED) from None

    def _bare_message(self, action: str, words: list[str], options: dict) -> str | None:
        """The positional MESSAGE: alone (bare), or the message of `-s ID -m MODEL MESSAGE`."""
        if action == "send":
            pair = options["send"]
            if len(pair) + len(words) != 2:
                if len(pair) + len(words) < 2:
                    raise CommandError(SEND_NEEDS_MESSAGE, returncode=USAGE)
                extra = [*pair[1:], *words]
                raise CommandError(ONE_MESSAGE.format(count=len(extra), words=extra), returncode=USAGE)
            options["send"] = [pair[0], pair[1] if len(pair) == 2 else words[0]]
            return None
        if action != BARE:
            if words:
                raise CommandError(MESSAGE_WITH_ACTION.format(flag=FLAG_NAMES[action]), returncode=USAGE)
            return None
        if len(words) != 1:
            raise CommandError(ONE_MESSAGE.format(count=len(words), words=words), returncode=USAGE)
        return words[0]

    # --- resolving users and sessions ---------------------------------------------------------

    def _user_name(self) -> str | None:
        return self.options.get("user") or os.environ.get("CHAT_USER") or None

    def _user(self, *, required: bool = True):
        name = self._user_name()
        if not name:
            if required:
                raise CommandError(NO_USER, returncode=USAGE)
            return None
        user = get_user_model().objects.filter(**{get_user_model().USERNAME_FIELD: name}).first()
        if user is None or not user.is_active:
            raise CommandError(f"No active user named {name!r}.", returncode=FAILED)
        return user

    def _session(self, ident: str) -> tuple[ChatSession, Person]:
        """The session an ID names, and the user acting on it (the session's own, unless --user)."""
        user = self._user(required=False)
        try:
            session = conversation.session_resolve(ident=ident, user=user)
        except BadInput as exc:
            raise CommandError(exc.message, returncode=USAGE) from None
        return session, user or session.user

    # --- chatting -------------------------------------------------------------------------

    def _new(self, message: str) -> None:
        user = self._user()
        self._turn(self._start(user), user, message)

    def _start(self, user) -> ChatSession:
        template = self.options.get("template")
        client = self.options.get("client")
        model = self.options.get("model")
        common = {
            "user": user,
            "name": self.options.get("name") or "",
            "system_prompt": self.options.get("system") or "",
            "source": SessionSource.CLI,
        }
        if template:
            # A template's own client and model apply unless the command line names others; CHAT_CLIENT
            # is only a default, for templates offered to every client.
            preset = services.template_resolve(template=template, user=user, client=client)
            if not client and not preset.client_id:
                client = self._configured_client() or self._default_client(user)
            session = services.session_start_from_template(template=preset, client=client, model=model, **common)
        else:
            client = client or self._configured_client() or self._default_client(user)
            session = services.session_start(client=client, model=model or self._default_model(), **common)
        self.stderr.write(f"Session {session.session_id} · {session.domain.slug} · {session.current_model}")
        return session

    def _configured_client(self) -> str | None:
        return os.environ.get("CHAT_CLIENT") or settings.CHAT_CLIENT or None

    def _default_model(self) -> str:
        return os.environ.get("CHAT_MODEL") or settings.CHAT_MODEL or DEFAULT_MODEL

    def _default_client(self, user) -> str:
        clients = list(ClientDomain.objects.active().open_to(user).values_list("slug", flat=True)[:2])
        if len(clients) == 1:
            return clients[0]
        raise CommandError(NO_CLIENT, returncode=USAGE)

    def _bare(self, message: str) -> None:
        """Continue the user's newest active session (on --client/CHAT_CLIENT, if set), or start one."""
        user = self._user()
        client = self.options.get("client") or self._configured_client()
        sessions = ChatSession.objects.filter(user=user, status=SessionStatus.ACTIVE, api_token__isnull=True)
        if client:
            sessions = sessions.filter(domain__slug=client)
        session = sessions.select_related("domain").order_by("-started_at").first()
        if session is None:
            self._turn(self._start(user), user, message)
            return
        stray = [FLAG_NAMES[name] for name in ("system", "name", "template") if self.options.get(name)]
        if stray:
            raise CommandError(
                f"{', '.join(stray)} only apply to a new session; session {session.session_id} is still running "
                "(end it, or use -n MESSAGE for a new one).",
                returncode=USAGE,
            )
        self.stderr.write(f"Session {session.session_id} · {session.domain.slug} · {session.current_model} (continued)")
        self._switch_if_asked(session, user, client=None)
        self._turn(session, user, message)

    def _send(self, pair: list[str]) -> None:
        ident, message = pair
        session, user = self._session(ident)
        self._switch_if_asked(session, user, client=self.options.get("client"))
        self._turn(session, user, message)

    def _switch_if_asked(self, session: ChatSession, user, *, client: str | None) -> None:
        model = self.options.get("model")
        if (model and model != session.current_model) or (client and client != session.domain.slug):
            stream = services.session_switch(session_id=session.pk, user=user, client=client, model=model)
            session.refresh_from_db()
            self.stderr.write(
                f"Switched to {session.domain.slug} · {session.current_model} (carried {stream.message_count} messages)"
            )

    def _turn(self, session: ChatSession, user, message: str) -> None:
        """Stream one answer to stdout as it arrives; store everything through the service."""
        out = self.stdout
        wrote = False
        guard = _Interrupt()

        async def run() -> Done | None:
            nonlocal wrote
            guard.loop = asyncio.get_running_loop()
            guard.task = asyncio.current_task()
            done = None
            async with aclosing(services.session_chat(session_id=session.pk, user=user, message=message)) as events:
                async for event in events:
                    if isinstance(event, Token):
                        out.write(event.text, ending="")
                        out.flush()
                        wrote = wrote or bool(event.text)
                    elif isinstance(event, Done):
                        done = event
            return done

        try:
            with guard:
                done = async_to_sync(run)()
        except (asyncio.CancelledError, KeyboardInterrupt):
            if wrote:
                out.write("")
            raise CommandError(
                f"Stopped; the partial answer is stored in session {session.session_id}.", returncode=INTERRUPTED
            ) from None
        except ProviderFailed as exc:
            if wrote:
                out.write("")
            stored = " (the partial answer is stored)" if wrote else ""
            raise CommandError(f"{exc.message}{stored}", returncode=FAILED) from None
        if wrote:
            out.write("")
        else:
            self.stderr.write("(the model answered with nothing)")
        if done is not None:
            answer, totals = done.message, done.session
            self.stderr.write(
                f"[{short(totals.session_id)} · {answer.model} · {answer.tokens} tokens · {dollars(answer.cost_usd)}"
                f" · session {totals.total_tokens} tokens {dollars(totals.estimated_cost_usd)}]"
            )

    # --- reading --------------------------------------------------------------------------

    def _list(self, _flag) -> None:
        user = self._user()
        limit = self.options.get("limit") or 50
        hidden = "only" if self.options.get("hidden") else "exclude"
        qs = selectors.session_list(user=user, client=self.options.get("client"), hidden=hidden).select_related("user")
        total = qs.count()
        rows = [
            [
                short(s.session_id),
                s.status + (" (archived)" if s.archived_at else ""),
                s.domain.slug,
                s.current_model,
                local(s.started_at),
                str(s.total_messages),
                f"{s.total_tokens:,}",
                dollars(s.estimated_cost_usd),
                (s.name or "")
                + (f"  ↳ branch of {short(s.parent_id)}" if s.parent_id else "")
                + (f"  ↳ continues {short(s.continued_from_id)}" if s.continued_from_id else "")
                + (f"  (shared by {s.user.get_username()})" if s.user_id != user.pk else ""),
            ]
            for s in qs[:limit]
        ]
        if not rows:
            self.stdout.write("No sessions.")
            return
        self._table(
            ["ID", "STATUS", "CLIENT", "MODEL", "STARTED", "MSGS", "TOKENS", "COST", "NAME"], rows, right={5, 6, 7}
        )
        if total > limit:
            self.stdout.write(f"… {total - limit} more (use --limit N).")

    def _table(self, header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> None:
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

        def line(cells):
            parts = [
                str(cell).rjust(widths[i]) if i in right else str(cell).ljust(widths[i]) for i, cell in enumerate(cells)
            ]
            return "  ".join(parts).rstrip()

        self.stdout.write(line(header))
        for row in rows:
            self.stdout.write(line(row))

    def _history(self, ident: str) -> None:
        session, _user = self._session(ident)
        messages = stored_messages(session, related=("author",))
        w = self.stdout.write
        w(f"Session {session.session_id}" + (f" “{session.name}”" if session.name else ""))
        w(
            f"client {session.domain.slug} · model {session.current_model} · {session.status}"
            + (f" ({session.get_end_reason_display().lower()})" if session.end_reason else "")
            + (f" · archived {local(session.archived_at)}" if session.archived_at else "")
            + (f" · source {session.source}" if session.source != SessionSource.WEB else "")
        )
        w(
            f"started {local(session.started_at)} · ended {local(session.ended_at)} · "
            f"{session.total_messages} messages · {session.total_tokens:,} tokens · "
            f"{dollars(session.estimated_cost_usd)}"
        )
        if session.parent_id:
            w(f"branch of {session.parent_id} at message #{session.branched_at_seq}")
        branches = list(session.branches.values_list("session_id", "branched_at_seq"))
        for branch_id, at in branches:
            w(f"branched into {branch_id} at message #{at}")
        if session.continued_from_id:
            w(f"continues {session.continued_from_id}")
        for next_id in session.continuations.order_by("started_at").values_list("session_id", flat=True):
            w(f"continued in {next_id}")
        if session.system_prompt:
            w(f"system prompt: {session.system_prompt}")
        for m in messages:
            w("")
            flags = []
            if m.status != "complete":
                flags.append(m.status)
            if m.copied_from_id:
                flags.append("copy")
            if m.is_imported:
                flags.append("imported")
            # A question's tokens are billed on its answer, as the answer's prompt.
            meta = f" · {m.tokens} tokens · {dollars(m.cost_usd)}" if m.role != "user" else ""
            who = f" ({m.author.get_username()})" if m.author_id and m.author_id != session.user_id else ""
            w(
                f"#{m.seq} {m.role.upper()}{who} · {local(m.timestamp)} · {m.model or '—'}{meta}"
                + (f" · {', '.join(flags)}" if flags else "")
            )
            for text_line in (m.content or "").splitlines() or [""]:
                w(f"    {text_line}")
            if m.error_text:
                w(f"    [error: {m.error_text}]")

    def _search(self, text: str) -> None:
        user = self._user()
        hits = conversation.messages_search(
            user=user, query=text, limit=self.options.get("limit") or 20, client=self.options.get("client")
        )
        if not hits:
            self.stdout.write(f"No messages match {text!r}.")
            return
        tty = hasattr(sys.stdout, "isatty") and sys.stdout.isatty() and not self.options.get("no_color")
        start, stop = ("\x1b[1;33m", "\x1b[0m") if tty else ("[", "]")
        for hit in hits:
            self.stdout.write(
                f"{short(hit.session_id)} #{hit.seq} {hit.role} · {local(hit.timestamp)} · {hit.client} · "
                f"{hit.session_name} · rank {hit.rank:.4g}"
            )
            self.stdout.write(f"    {hit.snippet_marked(start, stop)}")

    def _stats(self, _flag) -> None:
        data = conversation.sessions_stats(user=self._user(), client=self.options.get("client"))
        w = self.stdout.write
        w(
            f"Sessions        {data['sessions']} ({data['active_sessions']} active, {data['archived_sessions']} archived)"
        )
        w(f"Messages        {data['messages']:,}")
        w(f"Average         {data['average_messages_per_session']:.2f} messages per session")
        w(f"Tokens          {data['tokens']:,}")
        w(f"Cost            ${data['cost_usd']}")
        for label, key in (("Oldest session", "oldest_session"), ("Most active", "most_active_session")):
            s = data[key]
            if s:
                w(
                    f"{label:<15} {short(s['session_id'])}  {s['started_at'][:10]}  {s['client']}  "
                    f"{s['total_messages']} messages  {s['name']}"
                )
        if data["by_client"]:
            w("")
            self._table(
                ["CLIENT", "SESSIONS", "MESSAGES", "AVG", "TOKENS", "COST"],
                [
                    [
                        row["client"],
                        str(row["sessions"]),
                        str(row["messages"]),
                        f"{row['average_messages_per_session']:.2f}",
                        f"{row['tokens']:,}",
                        f"${row['cost_usd']}",
                    ]
                    for row in data["by_client"]
                ],
                right={1, 2, 3, 4, 5},
            )

    # --- writing --------------------------------------------------------------------------

    def _branch(self, ident: str) -> None:
        session, user = self._session(ident)
        if session.archived_at is not None:
            raise CommandError(
                f"Session {session.session_id} is archived; restore it first "
                f"(manage.py archive_sessions --restore {short(session.session_id)}).",
                returncode=FAILED,
            )
        branch = services.session_branch(
            session_id=session.pk, user=user, at_seq=self.options.get("at"), name=self.options.get("name") or ""
        )
        self.stdout.write(
            f"Branched {short(session.session_id)} at message #{branch.branched_at_seq} into {branch.session_id} "
            f"({branch.total_messages} messages copied, not billed again)."
        )

    def _export(self, ident: str) -> None:
        session, _user = self._session(ident)
        text = transfer.session_export_json(session=session)
        target = self.options.get("output")
        if not target or target == "-":
            self.stdout.write(text, ending="")
            return
        path = Path(target)
        # Write beside the target and rename, so a failure never leaves half a file.
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent or ".", delete=False) as tmp:
            tmp.write(text)
        os.replace(tmp.name, path)
        self.stderr.write(f"Exported session {session.session_id} ({session.total_messages} messages) to {path}.")

    def _import_file(self, name: str) -> None:
        user = self._user()
        try:
            data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
        except OSError as exc:
            raise CommandError(f"Cannot read {name}: {exc.strerror}.", returncode=FAILED) from None
        result = transfer.session_import(user=user, data=data, client=self.options.get("client"))
        session = result.session
        self.stdout.write(
            f"Imported {session.total_messages} messages as session {session.session_id} "
            f"(client {session.domain.slug}; imported costs are not billed again)."
        )
        # An untrusted file's detail says so itself ("unverified: not sealed by a trusted key ...").
        self.stdout.write(f"Integrity: valid — {result.detail}." if result.valid else f"Integrity: {result.detail}.")

    def _clean(self, hours: float) -> None:
        user = self._user(required=False)
        dry = self.options.get("dry_run")
        cutoff = timezone.now() - timedelta(hours=hours)
        qs = ChatSession.objects.filter(invoice__isnull=True, last_activity_at__lt=cutoff).select_related("domain")
        if user is not None:
            qs = qs.filter(user=user)  # that consultant's own sessions, staff or not
        ended = removed = 0
        verb_end, verb_remove = ("Would end", "Would remove") if dry else ("Ended", "Removed")
        for session in qs.order_by("last_activity_at"):
            empty = not session.messages.exists() and session.archived_at is None
            idle = timezone.now() - session.last_activity_at
            label = f"{session.session_id}  {session.domain.slug:<14} idle {idle.total_seconds() / 3600:.1f} h"
            if empty and not LLMUsage.objects.filter(session=session).exists():
                removed += 1
                self.stdout.write(f"{verb_remove} empty session {label}")
                if not dry:
                    with transaction.atomic():
                        ChatSession.objects.filter(pk=session.pk, invoice__isnull=True).delete()
            elif session.status == SessionStatus.ACTIVE and not services.turn_is_live(session):
                ended += 1
                self.stdout.write(f"{verb_end} {label}  ({session.total_messages} messages)")
                if not dry:
                    services.session_end_idle(session=session)  # the guardian's rule
        prefix = "Dry run: would end" if dry else "Ended"
        self.stdout.write(
            f"{prefix} {ended} idle sessions and {'would remove' if dry else 'removed'} {removed} empty ones "
            f"(idle longer than {hours:g} h; invoiced sessions are never touched)."
        )
