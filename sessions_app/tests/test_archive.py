"""Retention: archive old ended sessions out of the hot table, and restore them exactly."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from billing.models import Invoice, LLMUsage
from sessions_app import archive, services
from sessions_app.archive import parse_age, session_archive, session_restore, sessions_archive
from sessions_app.errors import BadInput
from sessions_app.integrity import verify_session
from sessions_app.invariants import check_session
from sessions_app.models import ChatSession, SessionMessage
from sessions_app.selectors import session_summary
from sessions_app.toolkit import SessionManager
from sessions_app.transfer import session_export
from tests.factories import MessageFactory, SessionFactory, UsageFactory

FIELDS = [f.attname for f in SessionMessage._meta.concrete_fields]


def rows(session) -> list[dict]:
    return [{name: getattr(m, name) for name in FIELDS} for m in session.messages.order_by("seq")]


def run(*args) -> str:
    out = StringIO()
    call_command("archive_sessions", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def old_session(user, client, *, days=100, messages=3, **extra):
    ended = timezone.now() - timedelta(days=days)
    session = SessionFactory(
        user=user,
        domain=client,
        started_at=ended - timedelta(hours=1),
        ended_at=ended,
        duration_seconds=3600,
        status="ended",
        total_messages=messages,
        **extra,
    )
    for seq in range(1, messages + 1):
        MessageFactory(session=session, seq=seq, role="user" if seq % 2 else "assistant", content=f"Old note {seq}")
    return session


@pytest.fixture
def real(owner, client_acme, use_simulator):
    """A real, sealed session with answers, usage rows and a hash chain."""
    sm = SessionManager(owner, client="acme", model="openai:gpt-4o")
    sm.chat("Keep this for the audit.")
    sm.chat("And this too.")
    sm.end()
    return ChatSession.objects.get(pk=sm.session.pk)


@pytest.mark.parametrize(("raw", "expected"), [("90d", 90 * 24), ("2w", 14 * 24), ("36h", 36), ("30", 30 * 24)])
def test_ages_read_as_days_weeks_or_hours(raw, expected):
    assert parse_age(raw) == timedelta(hours=expected)


@pytest.mark.parametrize("raw", ["", "0d", "ninety", "-5d", "5y"])
def test_a_bad_age_is_refused(raw):
    with pytest.raises(BadInput, match="Give an age like"):
        parse_age(raw)


def test_archiving_moves_old_ended_sessions_out_of_the_hot_table(owner, client_acme):
    old = old_session(owner, client_acme)
    recent = old_session(owner, client_acme, days=10)
    running = SessionFactory(user=owner, domain=client_acme, started_at=timezone.now() - timedelta(days=200))
    MessageFactory(session=running, seq=1)

    out = run("--older-than", "90d")

    old.refresh_from_db()
    assert old.archived_at is not None and old.archive_blob
    assert not SessionMessage.objects.filter(session=old).exists()
    assert old.total_messages == 3  # the row and its totals stay
    assert SessionMessage.objects.filter(session=recent).count() == 3
    assert SessionMessage.objects.filter(session=running).count() == 1
    assert f"Archived {old.session_id}" in out
    assert "Archived 1 sessions, 3 messages." in out


def test_a_dry_run_lists_and_changes_nothing(owner, client_acme):
    old = old_session(owner, client_acme)
    out = run("--older-than", "90d", "--dry-run")
    assert f"Would archive {old.session_id}" in out
    assert SessionMessage.objects.filter(session=old).count() == 3
    assert ChatSession.objects.get(pk=old.pk).archived_at is None


def test_invoiced_sessions_are_never_archived(owner, client_acme):
    invoice = Invoice.objects.create(client=client_acme, period_start="2026-01-01", period_end="2026-01-31")
    invoiced = old_session(owner, client_acme, invoice=invoice)

    out = run("--older-than", "90d")

    assert SessionMessage.objects.filter(session=invoiced).count() == 3
    assert "Kept 1 invoiced sessions in place" in out
    with pytest.raises(BadInput, match="never archived"):
        session_archive(session_id=invoiced.pk)


def test_a_session_whose_messages_were_branched_stays_so_copies_stay_unbilled(owner, client_acme):
    parent = old_session(owner, client_acme)
    services.session_branch(session_id=parent.pk, user=owner, at_seq=2)

    out = run("--older-than", "90d")

    assert SessionMessage.objects.filter(session=parent).count() == 3
    assert "copied into branches" in out
    assert SessionMessage.objects.billable().filter(session__parent=parent).count() == 0


def test_restore_puts_every_message_back_exactly(owner, client_acme):
    old = old_session(owner, client_acme)
    answer = old.messages.get(seq=2)
    usage = UsageFactory(user=owner, session=old, message=answer, client=client_acme)
    before = rows(old)

    run("--older-than", "90d")
    assert LLMUsage.objects.get(pk=usage.pk).message_id is None
    out = run("--restore", str(old.pk)[:8])

    old.refresh_from_db()
    assert rows(old) == before
    assert old.archived_at is None and old.archive_blob is None
    assert LLMUsage.objects.get(pk=usage.pk).message_id == answer.message_id
    assert "Restored 3 messages" in out


def test_a_sealed_session_verifies_while_archived_and_after_restore(real):
    before = rows(real)
    result = sessions_archive(older_than=timedelta(days=90), now=timezone.now() + timedelta(days=91))
    assert [s.pk for s in result.archived] == [real.pk]
    real.refresh_from_db()
    assert result.bytes_after < result.bytes_before

    assert verify_session(real)[0]
    assert check_session(real) == []
    summary = session_summary(session=real)
    assert summary["integrity"]["valid"]
    assert sum(row["messages"] for row in summary["by_client"]) == 4
    exported = session_export(session=real)
    assert [m["hash"] for m in exported["messages"]] == [r["hash"] for r in before]

    session_restore(session_id=real.pk)
    real.refresh_from_db()
    assert rows(real) == before
    assert check_session(real) == []


def test_restoring_a_session_that_is_not_archived_is_refused(real):
    with pytest.raises(CommandError) as caught:
        call_command("archive_sessions", "--restore", str(real.pk), stdout=StringIO())
    assert "is not archived" in str(caught.value)


def test_the_command_needs_an_age_or_a_session(db):
    with pytest.raises(CommandError):
        call_command("archive_sessions", stdout=StringIO())
    with pytest.raises(CommandError) as caught:
        call_command("archive_sessions", "--older-than", "soon", stdout=StringIO())
    assert caught.value.returncode == 2


def test_the_archive_is_compressed_json(owner, client_acme):
    old = old_session(owner, client_acme, messages=20)
    session_archive(session_id=old.pk)
    old.refresh_from_db()
    records = archive.unpack_archive(old.archive_blob)
    assert [r["seq"] for r in records] == list(range(1, 21))
    assert records[0]["content"] == "Old note 1"


def test_verify_sessions_passes_for_archived_imported_and_branched_sessions(real, owner):
    from sessions_app.transfer import session_import

    services.session_branch(session_id=real.pk, user=owner, at_seq=2)
    session_import(user=owner, data=session_export(session=real))
    other = SessionManager(owner, client="acme", model="ollama:llama3.2")
    other.chat("To be archived")
    other.end()
    sessions_archive(older_than=timedelta(days=90), now=timezone.now() + timedelta(days=91))
    # The imported and the other session are archived; the branched original stays.
    assert ChatSession.objects.filter(archived_at__isnull=False).count() == 2
    assert ChatSession.objects.get(pk=real.pk).archived_at is None

    out = StringIO()
    call_command("verify_sessions", stdout=out, stderr=StringIO())
    assert ChatSession.objects.count() == 4
    assert all(check_session(s) == [] for s in ChatSession.objects.all())
