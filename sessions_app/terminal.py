"""The original terminal design's commands, `ollama-chat` and `ollama-session`, and Django set-up
for scripts that use `OllamaSessionManager` outside `manage.py`.

Both commands are `manage.py chat` under the original names (one parser, one set of actions,
the same services): `ollama-chat` accepts every spelling of the chat command, `ollama-session`
the session-keeping ones (`--history ID`, `--clean HOURS`). `scripts/ollama-chat` and
`scripts/ollama-session` run them from a checkout; `make install` puts wrappers for both in the
venv's `bin/`. Nothing here imports a model at module level: it runs before Django is set up.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SESSION_HELP = (
    "Keep your billable chat sessions: show one's history, or end idle ones and remove empty ones. "
    "Chat with ollama-chat."
)


def setup_django() -> None:
    """Configure Django as `manage.py` would (an unconfigured checkout runs with DEBUG on)."""
    from django.apps import apps

    if apps.ready:
        return
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    from manage import development_by_default

    development_by_default()
    import django

    django.setup()


def _configured_or_exit(prog: str) -> None:
    from django.core.exceptions import ImproperlyConfigured

    try:
        setup_django()
    except ImproperlyConfigured as exc:
        sys.exit(f"{prog}: configuration error: {exc}. See .env.example and docs/CONFIGURATION.md.")


def _run_chat(prog: str, argv: list[str]) -> int:
    from sessions_app.management.commands.chat import Command

    class Named(Command):
        def create_parser(self, prog_name, subcommand, **kwargs):
            parser = super().create_parser(prog_name, subcommand, **kwargs)
            parser.prog = prog  # "ollama-chat", not "ollama-chat chat"
            return parser

    Named().run_from_argv([prog, "chat", *argv])
    return 0


def ollama_chat(argv: list[str] | None = None) -> int:
    """`ollama-chat [-n MESSAGE | -s ID [-m MODEL] MESSAGE | -l | MESSAGE] ...`: the chat command."""
    _configured_or_exit("ollama-chat")
    return _run_chat("ollama-chat", list(sys.argv[1:] if argv is None else argv))


def session_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ollama-session", description=SESSION_HELP)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--history", metavar="ID", help="print a session's messages with times, tokens and cost")
    action.add_argument(
        "--clean",
        metavar="HOURS",
        help="end sessions idle longer than HOURS (at their last activity), remove empty ones",
    )
    parser.add_argument("--user", metavar="NAME", help="the consultant (default: CHAT_USER)")
    parser.add_argument("--dry-run", action="store_true", help="with --clean: show what would happen")
    return parser


def ollama_session(argv: list[str] | None = None) -> int:
    """`ollama-session --history ID` / `ollama-session --clean HOURS [--dry-run]`."""
    options = session_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    _configured_or_exit("ollama-session")
    forwarded = ["--history", options.history] if options.history else ["--clean", options.clean]
    if options.user:
        forwarded += ["--user", options.user]
    if options.dry_run:
        if options.history:
            session_parser().error("--dry-run goes with --clean only")
        forwarded.append("--dry-run")
    return _run_chat("ollama-session", forwarded)
