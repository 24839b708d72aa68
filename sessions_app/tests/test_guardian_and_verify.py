"""verify_sessions, guard_sessions, branches and imported history."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone

from sessions_app import services
from sessions_app.errors import BadInput, SessionBusy
from sessions_app.models import ChatSession, SessionMessage, SessionSegment

pytestmark = pytest.mark.usefixtures("sound_sessions")


@pytest.fixture
def session(owner, client_acme, use_simulator):
    return services.session_start(user=owner, client="acme", model="ollama:llama3.2")


def run(*args) -> tuple[int, str]:
    out = StringIO()
    try:
        call_command(*args, stdout=out)
    except SystemExit as exc:
        return exc.code, out.getvalue()
    return 0, out.getvalue()


def test_verify_sessions_reports_valid_and_exits_1_naming_what_fails(owner, session, chat):
    chat(session, owner, "Hello")
    services.session_end(session_id=session.pk, user=owner)
    code, out = run("verify_sessions", str(session.pk))
    assert code == 0 and f"{session.pk} valid" in out

    answer = SessionMessage.objects.get(session=session, seq=2)
    SessionMessage.objects.filter(pk=answer.pk).update(completion_tokens=999, tokens=999)
    code, out = run("verify_sessions", "--all")
    assert code == 1 and "INVALID" in out and "message #2" in out
    SessionMessage.objects.filter(pk=answer.pk).update(completion_tokens=answer.completion_tokens, tokens=answer.tokens)
    ChatSession.objects.filter(pk=session.pk).update(total_messages=1)
    code, out = run("verify_sessions", str(session.pk)[:8])
    assert code == 1 and "total_messages: sealed 2, stored 1" in out
    ChatSession.objects.filter(pk=session.pk).update(total_messages=2)
    assert run("verify_sessions")[0] == 0


def test_verify_sessions_checks_active_chains_with_all(owner, session, chat):
    chat(session, owner, "Hello")
    code, out = run("verify_sessions", "--all")
    assert code == 0 and "not sealed yet" in out and "1 checked, 0 failed" in out


def test_guardian_ends_idle_sessions_at_their_last_activity(owner, session, chat, settings):
    chat(session, owner, "Hello")
    settings.SESSION_IDLE_TIMEOUT = 600
    last = timezone.now() - timedelta(hours=2)
    started = last - timedelta(minutes=20, seconds=30)
    ChatSession.objects.filter(pk=session.pk).update(started_at=started, last_activity_at=last)
    SessionSegment.objects.filter(session=session).update(started_at=started)
    SessionMessage.objects.filter(session=session).update(timestamp=last)  # breaks the chain: rebuild it
    _relink(session)
    fresh = services.session_start(user=owner, client="acme", model="ollama:llama3.2")

    code, out = run("guard_sessions")
    assert code == 0 and f"ended {session.pk}" in out and "1 idle session(s) ended" in out
    session.refresh_from_db()
    assert session.status == "ended" and session.end_reason == "idle_timeout"
    assert session.ended_at == last and session.duration_seconds == 20 * 60 + 30
    fresh.refresh_from_db()
    assert fresh.status == "active"


def test_guardian_lists_stuck_sessions(owner, session, settings):
    # Stuck means stale by the one setting the monitoring page and the claim takeover read too.
    stuck_since = timezone.now() - services.turn_stale_after() - timedelta(seconds=1)
    ChatSession.objects.filter(pk=session.pk).update(turn_started_at=stuck_since)
    code, out = run("guard_sessions")
    assert code == 0 and f"stuck {session.pk}" in out and "1 stuck" in out
    ChatSession.objects.filter(pk=session.pk).update(turn_started_at=None)


def test_branch_copies_messages_without_billing_them_again(owner, session, chat):
    chat(session, owner, "One")
    chat(session, owner, "Two")
    branch = services.session_branch(session_id=session.pk, user=owner, at_seq=2, name="Alternative")
    copies = list(branch.messages.order_by("seq"))
    assert [m.content for m in copies] == [m.content for m in session.messages.order_by("seq")[:2]]
    assert all(m.copied_from_id for m in copies)
    assert branch.parent == session and branch.branched_at_seq == 2 and branch.source == "branch"
    assert branch.total_messages == 2 and branch.total_tokens == 0
    with pytest.raises(BadInput):
        services.session_branch(session_id=session.pk, user=owner, at_seq=99)


def test_append_history_stores_messages_unbilled_and_refuses_during_an_answer(owner, session):
    services.session_append_history(
        session_id=session.pk,
        user=owner,
        messages=[{"role": "user", "content": "old q"}, {"role": "assistant", "content": "old a"}],
    )
    session.refresh_from_db()
    assert session.total_messages == 2 and session.total_tokens == 0
    assert list(session.messages.values_list("is_imported", flat=True)) == [True, True]
    with pytest.raises(BadInput):
        services.session_append_history(session_id=session.pk, user=owner, messages=[{"role": "robot", "content": "x"}])
    ChatSession.objects.filter(pk=session.pk).update(turn_started_at=timezone.now())
    with pytest.raises(SessionBusy):
        services.session_append_history(session_id=session.pk, user=owner, messages=[{"role": "user", "content": "x"}])
    ChatSession.objects.filter(pk=session.pk).update(turn_started_at=None)


def _relink(session) -> None:
    from sessions_app.integrity import GENESIS, link_hash

    previous = GENESIS
    for message in session.messages.order_by("seq"):
        message.hash = link_hash(previous, message)
        message.save(update_fields=["hash"])
        previous = message.hash
