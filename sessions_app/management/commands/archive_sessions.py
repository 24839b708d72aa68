"""Archive old ended sessions' messages out of the hot table, or restore one session."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from sessions_app import archive
from sessions_app.conversation import session_resolve
from sessions_app.errors import SessionError


class Command(BaseCommand):
    help = (
        "Move the messages of sessions that ended longer ago than --older-than into a compressed "
        "archive on the session (invoiced sessions are never archived); --restore ID puts them back."
    )

    def add_arguments(self, parser):
        action = parser.add_mutually_exclusive_group(required=True)
        action.add_argument("--older-than", metavar="AGE", help="e.g. 90d, 12w, 36h; a bare number is days")
        action.add_argument("--restore", metavar="ID", help="session UUID or unique prefix (8+ characters)")
        parser.add_argument("--dry-run", action="store_true", help="list what would be archived, change nothing")

    def handle(self, *args, **options):
        try:
            if options["restore"]:
                if options["dry_run"]:
                    raise CommandError("--dry-run goes with --older-than, not --restore.", returncode=2)
                self._restore(options["restore"])
            else:
                self._archive(options["older_than"], options["dry_run"])
        except SessionError as exc:
            raise CommandError(exc.message, returncode=2 if exc.status == 400 else 1) from None

    def _restore(self, ident: str) -> None:
        session = session_resolve(ident=ident)
        count = archive.session_restore(session_id=session.pk)
        self.stdout.write(f"Restored {count} messages to session {session.pk}.")

    def _archive(self, raw_age: str, dry_run: bool) -> None:
        age = archive.parse_age(raw_age)
        result = archive.sessions_archive(older_than=age, dry_run=dry_run)
        verb = "Would archive" if dry_run else "Archived"
        for session in result.archived:
            self.stdout.write(
                f"{verb} {session.pk}  {session.domain.slug:<16} ended {session.ended_at:%Y-%m-%d}  "
                f"{session.total_messages} messages"
            )
        summary = f"{verb} {len(result.archived)} sessions, {result.messages} messages."
        if not dry_run and result.bytes_before:
            summary += f" {result.bytes_before:,} bytes compressed to {result.bytes_after:,}."
        self.stdout.write(summary)
        skipped = archive.skipped_candidates(older_than=age)
        invoiced = skipped.filter(invoice__isnull=False).count()
        branched = skipped.filter(invoice__isnull=True).count()
        if invoiced:
            self.stdout.write(f"Kept {invoiced} invoiced sessions in place (invoiced sessions are never archived).")
        if branched:
            self.stdout.write(f"Kept {branched} sessions whose messages were copied into branches.")
