"""Two daphne processes over one PostgreSQL and one Redis, as docs/DESIGN.md deploys the product.

"Nothing in the code may assume one process": an answer streaming in one process is stopped
and stored when another process ends its session, a socket on one process watches (through
Redis) and stops an answer asked on another, and what is stored verifies.
Runs where PostgreSQL and Redis are configured (the CI's second pass); skips elsewhere.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from sessions_app.tests.processes import ROOT, daphne, stop, wait_for
from tests.wsclient import Socket

DATABASE_URL = os.environ.get("DATABASE_URL", "")
REDIS_URL = os.environ.get("REDIS_URL", "")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (DATABASE_URL.startswith("postgres") and REDIS_URL),
        reason="several processes need PostgreSQL and Redis (set DATABASE_URL and REDIS_URL)",
    ),
]
SEED = """
from django.core.management import call_command
call_command("migrate", verbosity=0)
from billing.pricing import load_price_list
from sessions_app.models import ApiToken
from tests.factories import BrandFactory, ClientFactory, UserFactory
load_price_list()
user = UserFactory(username="olivia")
BrandFactory(client=ClientFactory(slug="acme", name="Acme Corp"), name="Acme")
print(ApiToken.issue(user=user)[1])
from django.conf import settings
from django.test import Client
browser = Client()
browser.force_login(user)
print(f"{settings.SESSION_COOKIE_NAME}={browser.cookies[settings.SESSION_COOKIE_NAME].value}")
"""
# 400 words at 40 tokens a second: ten seconds, so the answer is surely mid-stream when ended.
SLOW_MODEL = "ollama:llama3.2-rate-40-words-400"


@dataclass
class Deployment:
    """Two daphne processes serving one database and one Redis."""

    env: dict[str, str]
    ports: list[int]
    token: str
    cookie: str

    def manage(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=120
        )

    def api(self, index: int) -> httpx.Client:
        return httpx.Client(
            base_url=f"http://127.0.0.1:{self.ports[index]}/api/ollama",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
        )

    def stored_answer(self, sid: str) -> tuple[str, str]:
        """(status, content) of the session's stored answer (message #2)."""
        out = self.manage(
            "shell",
            "-v",
            "0",
            "-c",
            "from sessions_app.models import SessionMessage as M;"
            f"m = M.objects.get(session_id='{sid}', seq=2); print(m.status); print(m.content)",
        )
        status, _, content = out.stdout.partition("\n")
        return status, content.rstrip("\n")


@pytest.fixture(scope="module")
def deployment(simulator, tmp_path_factory):
    import psycopg

    parts = urlsplit(DATABASE_URL)
    name = f"two_processes_{secrets.token_hex(4)}"
    server = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    env = {key: value for key, value in os.environ.items() if key != "PYTEST_XDIST_WORKER"}
    env.update(
        DJANGO_SETTINGS_MODULE="config.settings",
        DEBUG="1",
        SECRET_KEY="two-processes-test",
        SESSION_SIGNING_KEY=base64.b64encode(b"t" * 32).decode(),
        DATABASE_URL=urlunsplit(parts._replace(path=f"/{name}")),
        REDIS_URL=REDIS_URL,
        OLLAMA_HOST=simulator.ollama_url,
        LOG_LEVEL="WARNING",
    )
    servers: list[subprocess.Popen] = []
    try:
        setup = Deployment(env=env, ports=[], token="", cookie="")
        seeded = setup.manage("shell", "-v", "0", "-c", SEED)
        assert seeded.returncode == 0, seeded.stderr
        setup.token, setup.cookie = seeded.stdout.strip().splitlines()[-2:]
        logs = tmp_path_factory.mktemp("daphne")
        for index in range(2):
            process, port = daphne(env, (logs / f"daphne-{index}.log").open("w"))
            servers.append(process)
            setup.ports.append(port)
        for port, process in zip(setup.ports, servers, strict=True):
            wait_for(f"http://127.0.0.1:{port}/api/version", process)
        yield setup
    finally:
        for process in servers:
            stop(process)
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_ending_in_one_process_stops_and_stores_the_answer_streaming_in_another(deployment):
    first, second = deployment.api(0), deployment.api(1)
    started = first.post("/session/start", json={"client": "acme", "model": SLOW_MODEL})
    assert started.status_code == 201, started.text
    sid = started.json()["session_id"]

    lines: list[dict] = []
    tokens_seen = threading.Event()

    def read_answer() -> None:
        body = {"message": "Tell me a long story.", "stream": True}
        with first.stream("POST", f"/session/{sid}/chat", json=body) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(json.loads(line))
                    if sum(item["type"] == "token" for item in lines) >= 5:
                        tokens_seen.set()
        tokens_seen.set()

    reader = threading.Thread(target=read_answer, daemon=True)
    reader.start()
    assert tokens_seen.wait(timeout=30), "the answer never started streaming"

    began = time.monotonic()
    ended = second.post(f"/session/{sid}/end")  # the other process
    assert ended.status_code == 200, ended.text
    reader.join(timeout=30)
    assert not reader.is_alive(), "the streaming answer was not stopped"
    assert time.monotonic() - began < 8, "the end waited for the whole answer instead of stopping it"

    summary = ended.json()
    assert summary["status"] == "ended" and summary["integrity"]["valid"]
    assert lines[-1]["type"] == "error", lines[-1]
    assert second.get(f"/session/{sid}/summary").json()["total_messages"] == 2
    received = "".join(item["text"] for item in lines if item["type"] == "token")
    status, content = deployment.stored_answer(sid)
    assert status == "partial" and content.startswith(received) and 0 < len(content.split()) < 400

    verified = deployment.manage("verify_sessions", "--all")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_socket_in_one_process_watches_and_stops_an_answer_asked_in_another(deployment):
    sid = deployment.api(0).post("/session/start", json={"client": "acme", "model": SLOW_MODEL}).json()["session_id"]

    async def scenario() -> tuple[list[dict], list[dict]]:
        path = f"/ws/sessions/{sid}/"
        asker = await Socket.open("127.0.0.1", deployment.ports[0], path, deployment.cookie)
        watcher = await Socket.open("127.0.0.1", deployment.ports[1], path, deployment.cookie)
        try:
            await asker.until("ready")
            await watcher.until("ready")
            await asker.send({"type": "chat", "message": "Tell me a long story."})
            watched: list[dict] = []
            while sum(frame["type"] == "token" for frame in watched) < 3:  # relayed through Redis
                watched.append(await asyncio.wait_for(watcher.receive(), 20))
            await watcher.send({"type": "stop"})
            asked: list[dict] = []
            while not asked or asked[-1]["type"] != "stopped":
                asked.append(await asyncio.wait_for(asker.receive(), 20))
            return watched, asked
        finally:
            asker.close()
            watcher.close()

    watched, asked = asyncio.run(scenario())
    assert watched[0]["type"] == "turn.started"
    stopped = asked[-1]
    assert stopped["stored"]["status"] == "partial"
    status, content = deployment.stored_answer(sid)
    assert status == "partial" and content == stopped["stored"]["content"]
    assert 0 < len(content.split()) < 400


def test_a_tab_opened_in_another_process_mid_answer_resumes_with_the_text_so_far(deployment):
    sid = deployment.api(0).post("/session/start", json={"client": "acme", "model": SLOW_MODEL}).json()["session_id"]

    async def scenario() -> tuple[list[dict], list[dict]]:
        path = f"/ws/sessions/{sid}/"
        asker = await Socket.open("127.0.0.1", deployment.ports[0], path, deployment.cookie)
        try:
            await asker.until("ready")
            await asker.send({"type": "chat", "message": "Tell me a long story.", "turn": "far"})
            asked: list[dict] = []
            while sum(frame["type"] == "token" for frame in asked) < 5:
                asked.append(await asyncio.wait_for(asker.receive(), 20))
            # A tab opened on the other process: it asks the owning process for the text so far.
            late = await Socket.open("127.0.0.1", deployment.ports[1], path, deployment.cookie)
            try:
                await late.until("ready")
                await late.send({"type": "resume", "turn": None, "after": 0})
                seen: list[dict] = []
                while not seen or seen[-1]["type"] != "resumed":
                    seen.append(await asyncio.wait_for(late.receive(), 20))
                assert seen[-1]["turn"] == "far" and seen[-1]["n"] >= 5
                while sum(frame["type"] == "token" for frame in seen) < 12:  # and then live, through Redis
                    seen.append(await asyncio.wait_for(late.receive(), 20))
                await late.send({"type": "stop"})
                while seen[-1]["type"] != "stopped":
                    seen.append(await asyncio.wait_for(late.receive(), 20))
            finally:
                late.close()
            while asked[-1]["type"] != "stopped":
                asked.append(await asyncio.wait_for(asker.receive(), 20))
            return asked, seen
        finally:
            asker.close()

    asked, seen = asyncio.run(scenario())
    assert seen[0] == {"type": "turn.started", "turn": "far", "message": "Tell me a long story.", "resumed": True}
    text = lambda frames: "".join(f["text"] for f in frames if f["type"] == "token")  # noqa: E731
    assert text(seen) == text(asked) == asked[-1]["stored"]["content"]  # nothing missing, nothing doubled
    numbers = [f["n"] for f in seen if f["type"] == "token"]
    assert numbers == sorted(set(numbers))
