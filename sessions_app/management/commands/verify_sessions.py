"""Verify sessions' hash chains, seals and invariants: `manage.py verify_sessions [ID ...|--all]`."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from sessions_app.conversation import session_resolve
from sessions_app.errors import SessionError
from sessions_app.invariants import session_verdict
from sessions_app.models import ChatSession, SessionStatus


class Command(BaseCommand):
    help = (
        "Check each session's hash chain, Ed25519 seal and docs/DESIGN.md invariants; print valid or exactly "
        "what fails. Exits 1 when any session fails. Without IDs (or with --all): every session; "
        "--ended: only ended ones."
    )

    def add_arguments(self, parser):
        parser.add_argument("ids", nargs="*", help="Session UUIDs (or unique prefixes of at least 8 characters).")
        parser.add_argument("--all", action="store_true", help="Every session (the default without IDs).")
        parser.add_argument("--ended", action="store_true", help="Only ended (sealed) sessions.")

    def _resolve(self, ids: list[str]):
        sessions = []
        for raw in ids:
            try:
                sessions.append(session_resolve(ident=raw))
            except SessionError as exc:
                raise CommandError(exc.message) from None
        return sessions

    def handle(self, *args, **options):
        if options["ids"]:
            sessions = self._resolve(options["ids"])
        else:
            qs = ChatSession.objects.order_by("started_at")
            if options["ended"]:
                qs = qs.filter(status=SessionStatus.ENDED)
            sessions = qs.iterator()
        failed = checked = 0
        for session in sessions:
            checked += 1
            detail, problems = session_verdict(session)
            if not problems:
                self.stdout.write(f"{session.pk} valid: {detail}")
                continue
            failed += 1
            self.stdout.write(self.style.ERROR(f"{session.pk} INVALID: " + "; ".join(problems)))
        self.stdout.write(f"{checked} checked, {failed} failed")
        if failed:
            raise SystemExit(1)
