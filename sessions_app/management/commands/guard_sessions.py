"""The guardian: settle answers whose process is gone, and end idle sessions at their last activity.

One pass by default (for cron); `--every SECONDS` keeps running, one pass every SECONDS, until
SIGTERM or Ctrl-C: `make run` runs it so beside daphne, and docs/OPERATIONS.md shows it as a
process of its own in production.
"""

from __future__ import annotations

import signal
import threading

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError, close_old_connections

from sessions_app.services import sessions_end_idle, sessions_settle_abandoned

BAD_INTERVAL = "--every takes a number of seconds greater than 0, got {value}."
DATABASE_DOWN = "guardian: the database did not answer ({error}); trying again in {every:g}s"


class Command(BaseCommand):
    help = (
        "Settle answers whose process is gone (stale for TURN_STALE_SECONDS, or their process dead on this "
        "host) as partial from their checkpoint, and end sessions idle longer than SESSION_IDLE_TIMEOUT with "
        "ended_at = their last activity (end_reason idle_timeout). With --every N, repeat every N seconds "
        "until stopped; without it, one pass (cron: */5 * * * * .venv/bin/python manage.py guard_sessions)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--quiet", action="store_true", help="Print only what was settled or ended.")
        parser.add_argument("--every", type=float, metavar="SECONDS", help="Keep running: one pass every SECONDS.")

    def handle(self, *args, quiet: bool = False, every: float | None = None, **options):
        if every is None:
            self._pass(quiet=quiet)
            return
        if every <= 0:
            raise CommandError(BAD_INTERVAL.format(value=every))
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        while not stop.is_set():
            try:
                self._pass(quiet=quiet)
            except DatabaseError as exc:
                # A guardian outlives database restarts: say so once a pass, and try again.
                self.stderr.write(DATABASE_DOWN.format(error=str(exc).strip().splitlines()[0], every=every))
            finally:
                close_old_connections()  # a long-lived process must not keep a dead connection
            stop.wait(every)

    def _pass(self, *, quiet: bool) -> None:
        settled = sessions_settle_abandoned()
        for session, message in settled:
            self.stdout.write(
                self.style.WARNING(
                    f"stuck {session.pk} ({session.domain.slug}, {session.user}): the process streaming its answer "
                    f"is gone; settled as {message.status} with {len(message.content)} characters kept "
                    f"(message #{message.seq})"
                )
            )
        ended = sessions_end_idle()
        for session in ended:
            self.stdout.write(
                f"ended {session.pk} ({session.domain.slug}, {session.user}) idle since "
                f"{session.ended_at.isoformat()}: {session.duration_seconds}s billed"
            )
        if not quiet or settled or ended:
            self.stdout.write(
                f"{len(ended)} idle session(s) ended (timeout {settings.SESSION_IDLE_TIMEOUT}s), "
                f"{len(settled)} stuck turn(s) settled (stale after {settings.TURN_STALE_SECONDS}s)"
            )
