"""Several daphne processes behind HAProxy (scripts/serve_multi.py), as docs/OPERATIONS.md serves them.

The front must pass WebSocket upgrades, forward streamed answers as they arrive, and spread
calls over every process. The deployment tests need HAProxy (`make install-front`),
PostgreSQL and Redis, and skip, saying which is missing, elsewhere; the configuration and the
refusals are checked in every pass.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from sessions_app.tests.processes import ROOT, free_port
from tests.wsclient import Socket

sys.path.insert(0, str(ROOT / "scripts"))
import serve_multi

DATABASE_URL = os.environ.get("DATABASE_URL", "")
REDIS_URL = os.environ.get("REDIS_URL", "")
HAPROXY = shutil.which("haproxy")
SEED = """
from django.core.management import call_command
call_command("migrate", verbosity=0)
from django.conf import settings
from django.test import Client
from sessions_app.models import ApiToken
from tests.factories import BrandFactory, ClientFactory, UserFactory
user = UserFactory(username="olivia")
acme = ClientFactory(slug="acme", name="Acme Corp")
BrandFactory(client=acme, name="Acme")
print(ApiToken.issue(user=user, client=acme)[1])
browser = Client()
browser.force_login(user)
print(f"{settings.SESSION_COOKIE_NAME}={browser.cookies[settings.SESSION_COOKIE_NAME].value}")
"""
# 40 words at 20 tokens a second: two seconds of streaming, so a buffering front would show.
PACED_MODEL = "llama3.2-rate-20-words-40"


def test_haproxy_config_balances_unix_socket_daphnes_and_keeps_long_streams_open(tmp_path):
    sockets = [tmp_path / "daphne1.sock", tmp_path / "daphne2.sock"]
    config = serve_multi.haproxy_config(
        host="127.0.0.1", port=8000, sockets=sockets, stats_socket=tmp_path / "haproxy.sock"
    )
    assert "bind 127.0.0.1:8000" in config
    assert f"server daphne1 unix@{sockets[0]} check" in config and f"server daphne2 unix@{sockets[1]} check" in config
    assert "balance leastconn" in config and "option forwardfor" in config
    # A gateway token's calls prefer one daphne (its remembered conversation), spilling over under load.
    assert "use_backend gateway if { var(txn.token) -m found }" in config
    assert "balance hash var(txn.token)" in config and "hash-balance-factor 101" in config
    assert "option http-no-delay" in config  # a token is sent when it arrives, never corked
    assert "timeout tunnel 1h" in config  # WebSockets
    assert "http-buffer-request" not in config and "compression" not in config  # nothing held back


@pytest.mark.parametrize(
    ("processes", "environ", "message"),
    [
        (0, {}, serve_multi.BAD_PROCESSES.format(processes=0)),
        (2, {"REDIS_URL": "redis://127.0.0.1:1/0"}, serve_multi.NEEDS_POSTGRES),
        (2, {"DATABASE_URL": "sqlite:///db.sqlite3", "REDIS_URL": "redis://x/0"}, serve_multi.NEEDS_POSTGRES),
        (2, {"DATABASE_URL": "postgres://app@db/app"}, serve_multi.NEEDS_REDIS),
    ],
)
def test_a_deployment_whose_processes_could_not_share_state_is_refused_clearly(processes, environ, message):
    if HAPROXY is None and processes > 0:
        pytest.skip("HAProxy is not installed (make install-front); it is checked before the environment")
    with pytest.raises(serve_multi.FrontError) as caught:
        serve_multi.check_environment(processes=processes, environ=environ)
    assert str(caught.value) == message


def test_one_process_needs_neither_postgres_nor_redis():
    if HAPROXY is None:
        pytest.skip("HAProxy is not installed (make install-front)")
    serve_multi.check_environment(processes=1, environ={})


def test_without_haproxy_the_command_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setattr(serve_multi.shutil, "which", lambda name: None)
    assert serve_multi.main(["--processes", "1", "--port", str(free_port())]) == 2
    assert serve_multi.NO_HAPROXY in capsys.readouterr().err


_DEPLOYMENT_MARKS = (
    pytest.mark.slow,
    pytest.mark.skipif(HAPROXY is None, reason="HAProxy is not installed (make install-front)"),
    pytest.mark.skipif(
        not (DATABASE_URL.startswith("postgres") and REDIS_URL),
        reason="several processes need PostgreSQL and Redis (set DATABASE_URL and REDIS_URL)",
    ),
)


def needs_deployment(test):
    for mark in _DEPLOYMENT_MARKS:
        test = mark(test)
    return test


@dataclass
class Deployment:
    """Two daphnes behind HAProxy, a consultant's gateway token and a signed-in browser's cookie."""

    front: serve_multi.Front
    token: str = ""
    cookie: str = ""

    @property
    def url(self) -> str:
        return self.front.url


@pytest.fixture(scope="module")
def front(simulator, tmp_path_factory):
    import psycopg

    parts = urlsplit(DATABASE_URL)
    name = f"front_{secrets.token_hex(4)}"
    server = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    env = {key: value for key, value in os.environ.items() if key != "PYTEST_XDIST_WORKER"}
    env.update(
        DJANGO_SETTINGS_MODULE="config.settings",
        DEBUG="0",
        SECRET_KEY="front-test-" + secrets.token_hex(16),
        SESSION_SIGNING_KEY=base64.b64encode(b"f" * 32).decode(),
        ALLOWED_HOSTS="127.0.0.1,localhost",
        DATABASE_URL=urlunsplit(parts._replace(path=f"/{name}")),
        REDIS_URL=REDIS_URL,
        OLLAMA_HOST=simulator.ollama_url,
        LOG_LEVEL="WARNING",
    )
    deployment = Deployment(
        serve_multi.Front(processes=2, port=free_port(), environ=env, log_dir=tmp_path_factory.mktemp("front-logs"))
    )
    try:
        seeded = subprocess.run(
            [sys.executable, "manage.py", "shell", "-v", "0", "-c", SEED],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert seeded.returncode == 0, seeded.stderr
        deployment.token, deployment.cookie = seeded.stdout.strip().splitlines()[-2:]
        deployment.front.start()
        yield deployment
    finally:
        deployment.front.stop()
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Streaming:
    """A gateway answer read up to its first token; `lines` goes on from there."""

    first: dict
    lines: Iterator[str]
    response: httpx.Response
    client: httpx.Client

    def close(self) -> None:
        self.response.close()
        self.client.close()


def stream_first_token(front: Deployment, model: str) -> Streaming:
    client = httpx.Client(base_url=front.url, headers={"Authorization": f"Bearer {front.token}"}, timeout=30)
    body = {"model": model, "messages": [{"role": "user", "content": "Through the front, please."}]}
    response = client.send(client.build_request("POST", "/api/chat", json=body), stream=True)
    lines = response.iter_lines()
    for line in lines:
        chunk = json.loads(line)
        if chunk.get("message", {}).get("content"):
            return Streaming(chunk, lines, response, client)
    raise AssertionError(f"the answer had no content: {response.status_code}")


@needs_deployment
def test_a_streamed_answer_passes_the_front_as_it_is_generated(front, simulator):
    streaming = stream_first_token(front, PACED_MODEL)
    try:
        assert streaming.response.status_code == 200 and streaming.first["done"] is False
        upstream = simulator.last_request(model=PACED_MODEL)
        # The first token reached us while the simulator was still generating the rest.
        assert upstream is not None and not upstream["finished"]
        rest = [json.loads(line) for line in streaming.lines if line]
        assert rest[-1]["done"] is True and len(rest) == 40  # 39 more tokens, then the final line
    finally:
        streaming.close()


@needs_deployment
def test_a_chat_page_socket_upgrades_through_the_front_and_streams(front):
    with httpx.Client(base_url=front.url, headers={"Authorization": f"Bearer {front.token}"}, timeout=30) as api:
        started = api.post("/api/ollama/session/start", json={"client": "acme", "model": "ollama:llama3.2"})
    assert started.status_code == 201, started.text
    sid = started.json()["session_id"]

    async def scenario() -> list[dict]:
        socket = await Socket.open(front.front.host, front.front.port, f"/ws/sessions/{sid}/", front.cookie)
        try:
            await socket.until("ready")
            await socket.send({"type": "chat", "message": "Hello through HAProxy"})
            frames: list[dict] = []
            while not frames or frames[-1]["type"] != "message.done":
                frames.append(await asyncio.wait_for(socket.receive(), 20))
            return frames
        finally:
            socket.close()

    frames = asyncio.run(scenario())
    tokens = "".join(frame["text"] for frame in frames if frame["type"] == "token")
    assert 'Simulated answer to "Hello through HAProxy"' in tokens
    assert frames[-1]["message"]["content"] == tokens and frames[-1]["message"]["status"] == "complete"


@needs_deployment
def test_a_tokens_calls_one_after_another_go_to_the_same_daphne(front):
    """So the daphne that answered the last call, which remembers the conversation, gets the next."""
    before = front.front.server_sessions()
    for _ in range(4):
        stream_first_token(front, "llama3.2").close()
    after = front.front.server_sessions()
    assert sorted(after[name] - before[name] for name in after) == [0, 4], (before, after)


@needs_deployment
def test_concurrent_calls_are_spread_over_every_daphne(front):
    before = front.front.server_sessions()
    # Answers streaming at once: the token's daphne takes no more than its share of them (HAProxy's
    # bounded load rounds the share up, so the third of one token's answers is sure to go elsewhere).
    streams = [stream_first_token(front, PACED_MODEL) for _ in range(3)]
    for streaming in streams:
        streaming.close()
    after = front.front.server_sessions()
    assert sorted(after) == ["daphne1", "daphne2"]
    assert all(after[name] > before[name] for name in after), (before, after)
