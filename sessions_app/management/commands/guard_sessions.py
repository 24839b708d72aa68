"""The guardian (run from cron): end idle sessions at their last activity and list stuck ones."""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand

from sessions_app.services import sessions_end_idle, sessions_stuck


class Command(BaseCommand):
    help = (
        "End sessions idle longer than SESSION_IDLE_TIMEOUT with ended_at = their last activity "
        "(end_reason idle_timeout), and list sessions whose answer has been streaming longer than the "
        "provider timeouts allow. Cron: */5 * * * * cd /srv/app && .venv/bin/python manage.py guard_sessions"
    )

    def add_arguments(self, parser):
        parser.add_argument("--quiet", action="store_true", help="Print only problems.")

    def handle(self, *args, **options):
        ended = sessions_end_idle()
        for session in ended:
            self.stdout.write(
                f"ended {session.pk} ({session.domain.slug}, {session.user}) idle since "
                f"{session.ended_at.isoformat()}: {session.duration_seconds}s billed"
            )
        stuck = list(sessions_stuck())
        for session in stuck:
            self.stdout.write(
                self.style.WARNING(
                    f"stuck {session.pk} ({session.domain.slug}, {session.user}): answer claimed at "
                    f"{session.turn_started_at.isoformat()} and never stored; the next chat takes the claim over"
                )
            )
        if not options["quiet"] or stuck:
            self.stdout.write(
                f"{len(ended)} idle session(s) ended (timeout {settings.SESSION_IDLE_TIMEOUT}s), {len(stuck)} stuck"
            )
