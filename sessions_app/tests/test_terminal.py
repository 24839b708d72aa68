"""The original terminal design's spellings: every `ollama-chat` / `ollama-session` form, CHAT_CLIENT,
templates from the terminal, shared sessions in the terminal, and `OllamaSessionManager`.

Most spellings run through `call_command("chat", ...)` (the same parser and command the scripts
run); a few run the real scripts as processes, and the documented Python example runs verbatim.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError

from billing.models import SessionTemplate
from sessions_app.management.commands import chat as chat_command
from sessions_app.models import ChatSession, ContextStream, SessionInvitation, SessionMessage
from sessions_app.tests.processes import database_for_a_subprocess

ROOT = Path(settings.BASE_DIR)
SESSION_LINE = re.compile(r"Session ([0-9a-f-]{36}) · (\S+) · (\S+)")


def chat(*args) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("chat", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def fails(*args) -> CommandError:
    with pytest.raises(CommandError) as caught:
        call_command("chat", *args, stdout=StringIO(), stderr=StringIO())
    return caught.value


@pytest.fixture
def consultant(owner, client_acme, client_globex, use_simulator, monkeypatch):
    """olivia, who may bill acme and globex; CHAT_USER and CHAT_CLIENT set as the original design does."""
    monkeypatch.setenv("CHAT_USER", "olivia")
    monkeypatch.setenv("CHAT_CLIENT", "acme")
    monkeypatch.delenv("CHAT_MODEL", raising=False)
    return owner


# --- ollama-chat spellings ------------------------------------------------------------------


def test_new_prints_the_session_id_that_continuing_takes(consultant):
    out, err = chat("-n", "What is a ledger?")
    sid, client, model = SESSION_LINE.search(err).groups()
    assert (client, model) == ("acme", settings.CHAT_MODEL)
    assert out.startswith("Simulated answer")
    chat("-s", sid[:8], "And a journal?")
    assert ChatSession.objects.get(pk=sid).total_messages == 4


@pytest.mark.parametrize(
    "spelling",
    [
        ("-s", "{id}", "-m", "ollama:mistral", "Again"),  # the original order: -m between id and message
        ("-m", "ollama:mistral", "-s", "{id}", "Again"),
        ("-s", "{id}", "Again", "-m", "ollama:mistral"),
    ],
)
def test_the_model_may_come_before_or_after_the_id(consultant, spelling):
    _, err = chat("-n", "Hello")
    sid = SESSION_LINE.search(err).group(1)
    _, err = chat(*(part.format(id=sid[:8]) for part in spelling))
    session = ChatSession.objects.get(pk=sid)
    assert session.current_model == "ollama:mistral" and session.total_messages == 4
    assert session.messages.get(seq=3).content == "Again"
    assert ContextStream.objects.filter(session=session).count() == 1
    assert "Switched to acme · ollama:mistral" in err


def test_a_bare_message_continues_the_newest_active_session_or_starts_one(consultant):
    _, err = chat("Where do we stand?")
    first = SESSION_LINE.search(err).group(1)
    _, err = chat("And next?")
    assert SESSION_LINE.search(err).group(1) == first and "(continued)" in err
    assert ChatSession.objects.get(pk=first).total_messages == 4

    # -m switches the continued session; --client looks for (or starts) a session on that client.
    chat("Try Mistral", "-m", "ollama:mistral")
    assert ChatSession.objects.get(pk=first).current_model == "ollama:mistral"
    _, err = chat("For Globex", "--client", "globex")
    globex = SESSION_LINE.search(err).group(1)
    assert globex != first and ChatSession.objects.get(pk=globex).domain.slug == "globex"

    # Ended sessions and gateway sessions are never picked.
    call_command("chat", "--clean", "0.000001", stdout=StringIO())
    _, err = chat("Fresh start")
    assert SESSION_LINE.search(err).group(1) not in (first, globex)


def test_a_bare_message_will_not_reset_a_running_sessions_prompt(consultant):
    chat("Hello")
    error = fails("Again", "--system", "Be terse.")
    assert error.returncode == 2 and "--system only apply to a new session" in str(error)


def test_chat_client_is_the_default_client_and_its_absence_is_explained(consultant, monkeypatch):
    _, err = chat("-n", "Hi")
    assert SESSION_LINE.search(err).group(2) == "acme"
    monkeypatch.delenv("CHAT_CLIENT")
    error = fails("-n", "Hi")  # two clients are open to olivia: say which
    assert error.returncode == 2 and str(error) == chat_command.NO_CLIENT


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("-s", "0123abcd"), chat_command.SEND_NEEDS_MESSAGE),
        (("-s", "0123abcd", "one", "two"), "Give one MESSAGE"),
        (("two", "words"), "Give one MESSAGE"),
        (("-l", "stray"), "A MESSAGE cannot be used with -l"),
        (("-n", "Hi", "stray"), "A MESSAGE cannot be used with -n"),
        (("--history", "0123abcd", "--template", "x"), "--template cannot be used with --history"),
    ],
)
def test_bad_spellings_exit_2_with_one_line(consultant, args, message):
    error = fails(*args)
    assert error.returncode == 2 and message in str(error) and "\n" not in str(error)


def test_new_from_a_template_takes_its_client_model_and_prompt(consultant, client_globex):
    SessionTemplate.objects.create(
        client=client_globex, name="Research", system_prompt="Cite sources.", default_model="ollama:gemma3:1b"
    )
    _, err = chat("-n", "Start", "--template", "Research")
    session = ChatSession.objects.get(pk=SESSION_LINE.search(err).group(1))
    assert (session.domain.slug, session.current_model, session.system_prompt, session.name) == (
        "globex",
        "ollama:gemma3:1b",
        "Cite sources.",
        "Research",
    )
    assert session.template.name == "Research"
    error = fails("-n", "Start", "--template", "Nope")
    assert error.returncode == 1 and "Unknown template 'Nope'" in str(error)


def test_list_and_history_show_shared_sessions_and_who_typed(consultant, colleague, chat_as=None):
    _, err = chat("-n", "Olivia asks")
    sid = SESSION_LINE.search(err).group(1)
    SessionInvitation.objects.create(session_id=sid, user=colleague, invited_by=consultant)
    chat("-s", sid, "Colin asks", "--user", "colin")
    listing, _ = chat("-l", "--user", "colin")
    assert sid[:8] in listing and "(shared by olivia)" in listing
    history, _ = chat("--history", sid[:8])
    assert "#3 USER (colin) · " in history and "#1 USER · " in history
    assert list(
        SessionMessage.objects.filter(session_id=sid, role="user").values_list("author__username", flat=True)
    ) == [
        "olivia",
        "colin",
    ]
    # Hidden sessions leave the list; --hidden lists them.
    ChatSession.objects.filter(pk=sid).update(hidden_at=ChatSession.objects.get(pk=sid).started_at)
    assert sid[:8] not in chat("-l")[0]
    assert sid[:8] in chat("-l", "--hidden")[0]


# --- the real commands ----------------------------------------------------------------------


@pytest.fixture
def shell(transactional_db, consultant, tmp_path):
    """Run a program on a copy of the test database (SQLite) or on it (PostgreSQL); yield (run, query)."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings_test", "PYTHONUNBUFFERED": "1"}
    env["DATABASE_URL"], query = database_for_a_subprocess(tmp_path, "terminal.sqlite3")

    def run(program: list[str], *args: str, stdin: str | None = None, cwd: Path = ROOT):
        return subprocess.run(
            [*program, *args], capture_output=True, text=True, env=env, cwd=cwd, input=stdin, timeout=120
        )

    return run, query


def installed(name: str) -> list[str]:
    """The command `make install` put in the venv's bin/, else the checkout's script (same code)."""
    wrapper = Path(sys.executable).parent / name
    return [str(wrapper)] if wrapper.exists() else [sys.executable, str(ROOT / "scripts" / name)]


def test_the_commands_run_as_spelled(shell, tmp_path):
    """From a checkout (scripts/) and as `make install` put them in the venv (same code, every spelling above)."""
    run, _query = shell
    new = run(
        [sys.executable, str(ROOT / "scripts" / "ollama-chat")], "-n", "Draft the Q3 summary", "-m", "ollama:mistral"
    )
    assert new.returncode == 0, new.stderr
    sid = SESSION_LINE.search(new.stderr).group(1)
    assert new.stdout.startswith("Simulated answer")

    history = run(installed("ollama-session"), "--history", sid[:8], cwd=tmp_path)
    assert history.returncode == 0, history.stderr
    assert "#1 USER · " in history.stdout and "Draft the Q3 summary" in history.stdout
    assert "model ollama:mistral · " in history.stdout


def test_ollama_session_takes_only_its_own_spellings(capsys):
    from sessions_app.terminal import ollama_session

    for args in (["--history", "1f0c9a2e", "--dry-run"], ["-n", "Hello"], []):
        with pytest.raises(SystemExit) as caught:
            ollama_session(args)
        assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "--dry-run goes with --clean only" in err and "Traceback" not in err
    assert err.count("usage: ollama-session") == 3


# --- OllamaSessionManager -------------------------------------------------------------------


def documented_example() -> str:
    text = (ROOT / "docs" / "CLI.md").read_text()
    block = text.split("<!-- original-example -->", 1)[1]
    return block.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_documented_original_example_runs_verbatim(consultant):
    out = io.StringIO()
    with redirect_stdout(out):
        exec(compile(documented_example(), "docs/CLI.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("Simulated answer")
    assert lines[-2].startswith("user: What should I check first") and lines[-1].startswith("assistant: Simulated")
    session = ChatSession.objects.get(user=consultant)
    assert (session.name, session.system_prompt, session.domain.slug, session.source) == (
        "Code Review",
        "You are a senior Python reviewer.",
        "acme",
        "cli",
    )


def test_the_example_runs_in_a_plain_python_process(shell):
    run, query = shell
    result = run([sys.executable, "-"], stdin=documented_example())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Simulated answer")
    assert query("SELECT name FROM ollama_streaming_sessions") == [("Code Review",)]


def test_the_manager_accepts_the_seeds_positional_and_keyword_forms(consultant):
    from sessions_app import OllamaSessionManager

    manager = OllamaSessionManager()
    plain = manager.create_session()
    named = manager.create_session("Named")
    both = manager.create_session(name="Kw", system_prompt="Be kind.", client="globex", model="ollama:mistral")
    sessions = {str(s.pk): s for s in ChatSession.objects.all()}
    assert sessions[plain].name == "" and sessions[named].name == "Named"
    assert (sessions[both].system_prompt, sessions[both].domain.slug, sessions[both].current_model) == (
        "Be kind.",
        "globex",
        "ollama:mistral",
    )

    reply = manager.chat(both[:8], "Hello")
    assert isinstance(reply, str) and reply.startswith("Simulated answer")
    assert reply.tokens > 0 and reply.session_id == both and reply.cost_usd is not None
    switched = manager.chat(both, "Again", model="ollama:gemma3:1b")
    assert switched.message.model == "ollama:gemma3:1b"
    history = manager.get_conversation_history(both)
    assert [(m["role"], m["author"]) for m in history] == [
        ("user", "olivia"),
        ("assistant", None),
        ("user", "olivia"),
        ("assistant", None),
    ]
    summary = manager.end_session(both)
    assert summary["status"] == "ended" and summary["total_messages"] == 4
    with pytest.raises(Exception, match="unknown arguments: colour"):
        manager.create_session("x", colour="blue")


def test_the_manager_needs_a_user(db, monkeypatch):
    from sessions_app import OllamaSessionManager
    from sessions_app.errors import BadInput
    from sessions_app.toolkit import NO_USER

    monkeypatch.delenv("CHAT_USER", raising=False)
    with pytest.raises(BadInput, match=re.escape(NO_USER)):
        OllamaSessionManager()


@pytest.mark.parametrize(("name", "value"), [("CHAT_MODEL", "two words"), ("CHAT_CLIENT", "acme; rm")])
def test_bad_chat_defaults_stop_start_up_by_name(tmp_path, name, value):
    from tests.test_settings import GOOD_KEY, assert_refused, import_settings

    assert_refused(import_settings(tmp_path, DEBUG="0", SESSION_SIGNING_KEY=GOOD_KEY, **{name: value}), name)
