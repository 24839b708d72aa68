"""`manage.py chat`: every flag through call_command, and the streaming terminal as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from billing.models import Invoice, LLMUsage
from sessions_app.models import ChatSession, SessionMessage
from sessions_app.tests.processes import database_for_a_subprocess
from tests.factories import MessageFactory, SegmentFactory, SessionFactory

MANAGE = Path(settings.BASE_DIR) / "manage.py"
SLOW_MODEL = "ollama:llama3.2-fault-slow-words-40"


def chat(*args, **env) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("chat", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def chat_fails(*args) -> tuple[CommandError, str]:
    out = StringIO()
    with pytest.raises(CommandError) as caught:
        call_command("chat", *args, stdout=out, stderr=StringIO())
    return caught.value, out.getvalue()


@pytest.fixture
def acme_session(owner, client_acme, use_simulator):
    chat("-n", "What is a ledger?", "--user", "olivia", "--client", "acme")
    return ChatSession.objects.get(user=owner)


# --- chatting -----------------------------------------------------------------------------


def test_new_session_streams_the_answer_and_stores_both_messages(owner, client_acme, use_simulator):
    out, err = chat("-n", "Hello there", "--user", "olivia", "--client", "acme", "--system", "Be brief.")

    session = ChatSession.objects.get(user=owner)
    answer = session.messages.get(seq=2)
    assert out.strip() == answer.content.strip()
    assert answer.content.startswith("Simulated answer to")
    assert [m.role for m in session.messages.order_by("seq")] == ["user", "assistant"]
    assert session.source == "cli"
    assert session.system_prompt == "Be brief."
    assert session.domain == client_acme
    assert f"Session {session.session_id}" in err
    assert f"{answer.tokens} tokens" in err


def test_the_user_can_come_from_chat_user(owner, client_acme, use_simulator, monkeypatch):
    monkeypatch.setenv("CHAT_USER", "olivia")
    chat("-n", "Hi", "--client", "acme")
    assert ChatSession.objects.filter(user=owner).count() == 1


def test_the_only_open_client_is_used_when_none_is_named(owner, client_acme, use_simulator):
    chat("-n", "Hi", "--user", "olivia")
    assert ChatSession.objects.get(user=owner).domain == client_acme


def test_continuing_by_prefix_takes_user_and_client_from_the_session(acme_session, client_globex):
    out, _ = chat("-s", str(acme_session.session_id)[:8], "And a journal?")

    acme_session.refresh_from_db()
    assert acme_session.total_messages == 4
    assert acme_session.messages.get(seq=3).content == "And a journal?"
    assert "Simulated answer" in out


def test_continuing_with_another_model_switches_first(acme_session):
    _, err = chat("-s", str(acme_session.session_id), "Again", "-m", "ollama:qwen2.5:7b")

    acme_session.refresh_from_db()
    assert acme_session.current_model == "ollama:qwen2.5:7b"
    assert acme_session.context_streams.count() == 1
    assert acme_session.messages.get(seq=4).model == "ollama:qwen2.5:7b"
    assert "Switched to acme · ollama:qwen2.5:7b" in err


def test_a_provider_failure_exits_1_and_keeps_the_user_message_and_partial_answer(owner, client_acme, use_simulator):
    error, out = chat_fails(
        "-n", "Break please", "--user", "olivia", "--client", "acme", "-m", "ollama:x-fault-midstream"
    )

    assert error.returncode == 1
    assert "\n" not in str(error)
    session = ChatSession.objects.get(user=owner)
    user_message, answer = session.messages.order_by("seq")
    assert user_message.content == "Break please"
    assert answer.status == "partial"
    assert answer.content and out.startswith(answer.content)
    assert "partial answer is stored" in str(error)


def test_an_ended_session_cannot_be_continued(acme_session):
    call_command("chat", "--clean", "0.000001", stdout=StringIO())
    error, _ = chat_fails("-s", str(acme_session.session_id), "More")
    assert error.returncode == 1
    assert str(error) == "This session has ended."


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), "Say what to do"),
        (("-l", "--at", "3"), "--at cannot be used with -l"),
        (("--stats", "--dry-run"), "--dry-run cannot be used with --stats"),
        (("--history", "12ab"), "at least 8 characters"),
        (("--history", "not-a-uuid!"), "is not a session id"),
        (("-l",), "Name the user with --user NAME or set CHAT_USER."),
    ],
)
def test_bad_usage_exits_2_with_one_line(db, args, expected, monkeypatch):
    monkeypatch.delenv("CHAT_USER", raising=False)
    error, _ = chat_fails(*args)
    assert error.returncode == 2
    assert expected in str(error)


def test_an_unknown_session_exits_1(owner):
    error, _ = chat_fails("--history", "0123456789abcdef", "--user", "olivia")
    assert error.returncode == 1
    assert "No session matches" in str(error)


def test_another_consultants_session_is_not_found(acme_session, colleague):
    error, _ = chat_fails("--history", str(acme_session.session_id), "--user", "colin")
    assert error.returncode == 1


# --- reading ------------------------------------------------------------------------------


def test_list_prints_a_table_of_the_users_sessions(acme_session, colleague):
    SessionFactory(user=colleague, name="Not mine")
    out, _ = chat("-l", "--user", "olivia")

    header, row = out.strip().splitlines()
    assert header.split() == ["ID", "STATUS", "CLIENT", "MODEL", "STARTED", "MSGS", "TOKENS", "COST", "NAME"]
    assert row.startswith(str(acme_session.session_id)[:8])
    assert "acme" in row and "active" in row
    assert "Not mine" not in out


def test_list_shows_the_newest_sessions_up_to_the_limit(owner, client_acme):
    for n in range(3):
        SessionFactory(user=owner, domain=client_acme, name=f"Numbered {n}")
    out, _ = chat("-l", "--user", "olivia", "--limit", "2")
    lines = out.strip().splitlines()
    assert len(lines) == 4  # header, two rows, the "more" line
    assert lines[-1] == "… 1 more (use --limit N)."


def test_history_prints_roles_times_tokens_and_cost(acme_session):
    out, _ = chat("--history", str(acme_session.session_id)[:10])

    answer = acme_session.messages.get(seq=2)
    assert f"Session {acme_session.session_id}" in out
    assert "#1 USER" in out and "What is a ledger?" in out
    local = timezone.localtime(answer.timestamp).strftime("%Y-%m-%d %H:%M:%S")
    assert f"#2 ASSISTANT · {local} · ollama:llama3.2 · {answer.tokens} tokens · 0.00 USD" in out
    assert "#1 USER · " in out and "#1 USER · 0 tokens" not in out


def test_history_reads_an_archived_session(acme_session):
    from sessions_app.archive import session_archive
    from sessions_app.services import session_end

    session_end(session_id=acme_session.pk, user=acme_session.user)
    session_archive(session_id=acme_session.pk)
    out, _ = chat("--history", str(acme_session.session_id))
    assert "archived" in out and "What is a ledger?" in out


def test_search_prints_ranked_hits_with_marked_matches(acme_session):
    out, _ = chat("--search", "ledger", "--user", "olivia")
    assert f"{str(acme_session.session_id)[:8]} #1 user" in out
    assert "[ledger]" in out


def test_stats_prints_totals_and_a_per_client_table(acme_session):
    out, _ = chat("--stats", "--user", "olivia")
    assert "Sessions        1 (1 active, 0 archived)" in out
    assert "Messages        2" in out
    assert "Average         2.00 messages per session" in out
    assert "CLIENT" in out and "acme" in out


# --- branching ----------------------------------------------------------------------------


def test_branch_copies_messages_up_to_n_and_bills_only_new_messages(owner, client_acme, use_simulator):
    chat("-n", "First question", "--user", "olivia", "--client", "acme", "-m", "openai:gpt-4o")
    parent = ChatSession.objects.get(user=owner)
    chat("-s", str(parent.pk), "Second question")
    parent.refresh_from_db()
    assert parent.estimated_cost_usd > 0
    billed_before = LLMUsage.objects.count()

    out, _ = chat("--branch", str(parent.pk)[:8], "--at", "2", "--name", "Alternative")

    branch = ChatSession.objects.get(parent=parent)
    assert str(branch.session_id) in out
    assert branch.name == "Alternative"
    assert branch.branched_at_seq == 2
    assert branch.total_messages == 2
    assert branch.total_tokens == 0 and branch.estimated_cost_usd == 0
    assert all(m.copied_from_id for m in branch.messages.all())
    assert LLMUsage.objects.count() == billed_before

    chat("-s", str(branch.pk), "Go another way")
    branch.refresh_from_db()
    new = branch.messages.filter(copied_from__isnull=True)
    assert branch.total_messages == 4
    assert branch.total_tokens == sum(m.tokens for m in new)
    assert branch.estimated_cost_usd == sum((m.cost_usd for m in new), Decimal(0))
    assert "branched into" in chat("--history", str(parent.pk))[0]


# --- export and import --------------------------------------------------------------------


def test_export_to_a_file_and_import_it_back(acme_session, tmp_path):
    from sessions_app.services import session_end

    session_end(session_id=acme_session.pk, user=acme_session.user)
    target = tmp_path / "session.json"
    _, err = chat("--export", str(acme_session.pk)[:8], "-o", str(target))
    document = json.loads(target.read_text())
    assert document["format"] == "billable-sessions/session"
    assert str(target) in err

    out, _ = chat("--import", str(target), "--user", "olivia")
    imported = ChatSession.objects.get(source="import")
    assert str(imported.session_id) in out
    assert "Integrity: valid" in out and "seal signature valid" in out


def test_export_goes_to_stdout_by_default(acme_session):
    out, _ = chat("--export", str(acme_session.pk))
    assert json.loads(out)["session"]["session_id"] == str(acme_session.pk)


def test_importing_a_tampered_file_exits_1_naming_the_message(acme_session, tmp_path):
    document = json.loads(chat("--export", str(acme_session.pk))[0])
    document["messages"][1]["content"] = "Something else entirely"
    target = tmp_path / "tampered.json"
    target.write_text(json.dumps(document))

    error, _ = chat_fails("--import", str(target), "--user", "olivia")
    assert error.returncode == 1
    assert "messages[1] (seq 2)" in str(error)
    assert not ChatSession.objects.filter(source="import").exists()


def test_importing_a_missing_file_exits_1(owner, tmp_path):
    error, _ = chat_fails("--import", str(tmp_path / "nope.json"), "--user", "olivia")
    assert error.returncode == 1
    assert "Cannot read" in str(error)


# --- clean --------------------------------------------------------------------------------


def _idle(session, hours):
    ChatSession.objects.filter(pk=session.pk).update(last_activity_at=timezone.now() - timedelta(hours=hours))


def test_clean_ends_idle_sessions_at_their_last_activity_and_removes_empty_ones(owner, client_acme, staff):
    busy = SessionFactory(user=owner, domain=client_acme, started_at=timezone.now() - timedelta(hours=30))
    SegmentFactory(session=busy)
    MessageFactory(session=busy, seq=1)
    empty = SessionFactory(user=owner, domain=client_acme)
    fresh = SessionFactory(user=owner, domain=client_acme)
    invoice = Invoice.objects.create(client=client_acme, period_start="2026-01-01", period_end="2026-01-31")
    invoiced = SessionFactory(user=owner, domain=client_acme, invoice=invoice)
    for session in (busy, empty, invoiced):
        _idle(session, 25)
    busy.refresh_from_db()

    out, _ = chat("--clean", "24", "--dry-run")
    assert f"Would end {busy.session_id}" in out
    assert f"Would remove empty session {empty.session_id}" in out
    assert str(invoiced.session_id) not in out and str(fresh.session_id) not in out
    assert ChatSession.objects.filter(status="active").count() == 4

    out, _ = chat("--clean", "24")
    busy.refresh_from_db()
    assert busy.status == "ended" and busy.end_reason == "idle_timeout"
    assert busy.ended_at == busy.last_activity_at
    assert busy.soulfra_hash
    assert not ChatSession.objects.filter(pk=empty.pk).exists()
    assert ChatSession.objects.get(pk=invoiced.pk).status == "active"
    assert ChatSession.objects.get(pk=fresh.pk).status == "active"
    assert "Ended 1 idle sessions and removed 1 empty ones" in out


def test_clean_with_a_user_touches_only_their_sessions(owner, colleague, client_acme):
    mine = SessionFactory(user=owner, domain=client_acme)
    theirs = SessionFactory(user=colleague, domain=client_acme)
    _idle(mine, 5)
    _idle(theirs, 5)
    chat("--clean", "1", "--user", "colin")
    assert ChatSession.objects.filter(pk=mine.pk).exists()
    assert not ChatSession.objects.filter(pk=theirs.pk).exists()


# --- the terminal as a real process -------------------------------------------------------


@pytest.fixture
def terminal(transactional_db, use_simulator, owner, client_acme, tmp_path):
    """Run `manage.py chat` as a subprocess on the test database; yield (run, query)."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings_test", "PYTHONUNBUFFERED": "1"}
    env["DATABASE_URL"], query = database_for_a_subprocess(tmp_path, "cli.sqlite3")

    def run(*args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(MANAGE), "chat", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=settings.BASE_DIR,
        )

    return run, query


def _first_output(process: subprocess.Popen) -> bytes:
    chunk = b""
    while not chunk:
        chunk = os.read(process.stdout.fileno(), 4096)
        if not chunk and process.poll() is not None:
            break
    return chunk


def test_tokens_reach_stdout_before_the_answer_ends(terminal):
    run, query = terminal
    process = run("-n", "Stream to me", "--user", "olivia", "--client", "acme", "-m", SLOW_MODEL)
    try:
        first = _first_output(process)
        still_streaming = process.poll() is None
        rest, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert first.startswith(b"Simulated")
    assert still_streaming, "the first tokens should arrive while the answer is still streaming"
    assert process.returncode == 0, err.decode()
    [(content,)] = query("SELECT content FROM ollama_session_messages WHERE role = 'assistant'")
    assert (first + rest).decode().strip() == content.strip()
    assert len(content.split()) > len(first.decode().split())


def test_ctrl_c_stores_the_partial_answer_and_exits_130(terminal):
    run, query = terminal
    process = run("-n", "Long answer please", "--user", "olivia", "--client", "acme", "-m", SLOW_MODEL)
    try:
        first = _first_output(process)
        assert first
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err.decode()
    assert b"Traceback" not in err
    assert b"partial answer is stored" in err
    [(status, content)] = query("SELECT status, content FROM ollama_session_messages WHERE role = 'assistant'")
    assert status == "partial"
    assert content.startswith("Simulated") and len(content.split()) < 40
    assert query("SELECT status FROM user_llm_usage") == [("cancelled",)]


def command_line(capsys, *args: str) -> tuple[int, str, str]:
    """Run `manage.py chat ARGS` as the shell would (argv parsing, exit status), in-process.

    `run_from_argv` closes every connection when it is done, so the tests that use this run
    outside a test transaction.
    """
    from django.core.management import execute_from_command_line

    with pytest.raises(SystemExit) as caught:
        execute_from_command_line(["manage.py", "chat", *args])
    captured = capsys.readouterr()
    return caught.value.code, captured.out, captured.err


@pytest.mark.django_db(transaction=True)
def test_conflicting_flags_exit_2_on_the_command_line(owner, capsys):
    code, _, err = command_line(capsys, "-l", "--stats", "--user", "olivia")
    assert code == 2
    assert "not allowed with argument" in err


@pytest.mark.django_db(transaction=True)
def test_a_stray_flag_exits_2_on_the_command_line(owner, capsys):
    code, _, err = command_line(capsys, "-l", "-o", "x.json", "--user", "olivia")
    assert code == 2
    assert err.strip() == "CommandError: -o cannot be used with -l."


@pytest.mark.django_db(transaction=True)
def test_a_provider_failure_exits_1_with_one_line_and_no_traceback(owner, client_acme, use_simulator, capsys):
    code, _, err = command_line(
        capsys, "-n", "Fail", "--user", "olivia", "--client", "acme", "-m", "ollama:x-fault-status-500"
    )
    assert code == 1
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("CommandError")] == [err.splitlines()[-1]]
    session = ChatSession.objects.get(user=owner)
    assert [(m.role, m.status) for m in session.messages.order_by("seq")] == [
        ("user", "complete"),
        ("assistant", "error"),
    ]


def test_every_message_stays_linked_in_the_chain(acme_session):
    from sessions_app.integrity import verify_session

    assert verify_session(acme_session)[0]
    assert SessionMessage.objects.filter(session=acme_session).count() == 2


def test_branching_an_archived_session_says_to_restore_it_first(acme_session):
    from sessions_app.archive import session_archive
    from sessions_app.services import session_end

    session_end(session_id=acme_session.pk, user=acme_session.user)
    session_archive(session_id=acme_session.pk)
    error, _ = chat_fails("--branch", str(acme_session.pk))
    assert error.returncode == 1
    assert "archive_sessions --restore" in str(error)
