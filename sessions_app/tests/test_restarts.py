"""Real daphne processes through a Redis outage and a SIGTERM.

- Redis stopped mid-test (a Redis this test starts on a port of its own): pages stay 200 and
  the outage is logged once, chat goes on on the asking socket, and fan-out to another daphne
  resumes by itself when Redis is back.
- SIGTERM: daphne takes no new answer (503), lets a short one finish, stores a long one as
  partial when its grace period runs out, and exits.

(A daphne killed mid-answer and started again is in test_browser.py, with the page open;
settling from a checkpoint is unit-tested in test_recovery.py.) The servers run on a copy of a
migrated SQLite database (on tmpfs when there is one), against the suite's provider simulator.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from sessions_app.tests.processes import ROOT, daphne, free_port, process_log, stop, wait_for
from tests.wsclient import Socket

pytestmark = pytest.mark.slow

SEED = """
import json
from django.conf import settings
from django.test import Client
from billing.pricing import load_price_list
from sessions_app import services
from sessions_app.models import ApiToken
from tests.factories import BrandFactory, ClientFactory, UserFactory
load_price_list()
user = UserFactory(username="olivia")
client = ClientFactory(slug="acme", name="Acme Corp")
BrandFactory(client=client, name="Acme")
models = {models!r}
sessions = {{name: str(services.session_start(user=user, client=client, model=model).pk) for name, model in models.items()}}
browser = Client()
browser.force_login(user)
cookie = f"{{settings.SESSION_COOKIE_NAME}}={{browser.cookies[settings.SESSION_COOKIE_NAME].value}}"
print(json.dumps({{"cookie": cookie, "sessions": sessions, "token": ApiToken.issue(user=user)[1]}}))
"""


@dataclass
class Site:
    """A database of its own, seeded, and the environment daphne runs with."""

    env: dict[str, str]
    cookie: str
    token: str
    sessions: dict[str, str]
    logs: Path

    def manage(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=120
        )

    def daphne(self, name: str) -> tuple[subprocess.Popen, int]:
        process, port = daphne(self.env, (self.logs / f"{name}.log").open("a"))
        wait_for(f"http://127.0.0.1:{port}/api/version", process)
        return process, port

    def report(self) -> tuple[dict[str, list[dict]], dict[str, list[str]]]:
        """Every session's stored messages, and what fails verification (one process start)."""
        out = self.manage("shell", "-v", "0", "-c", REPORT.format(sessions=self.sessions))
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout.strip().splitlines()[-1])
        return data["messages"], {sid: problems for sid, problems in data["problems"].items() if problems}


REPORT = """
import json
from sessions_app.invariants import check_session
from sessions_app.models import ChatSession, SessionMessage
sessions = {sessions!r}
messages = {{
    name: list(SessionMessage.objects.filter(session_id=sid).order_by("seq").values("role", "status", "content", "error_text"))
    for name, sid in sessions.items()
}}
problems = {{str(s.pk): check_session(s) for s in ChatSession.objects.all()}}
print(json.dumps({{"messages": messages, "problems": problems}}))
"""


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """One migrated SQLite database, copied for each scenario."""
    shm = Path("/dev/shm")
    folder = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() else tmp_path_factory.mktemp("restarts")
    env = base_env(folder / "template.sqlite3")
    done = subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, capture_output=True
    )
    assert done.returncode == 0, done.stderr
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def base_env(database: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTEST_XDIST_WORKER", "REDIS_URL")}
    env.update(
        DJANGO_SETTINGS_MODULE="config.settings",
        DEBUG="1",
        SECRET_KEY="restarts-test",
        SESSION_SIGNING_KEY=base64.b64encode(b"r" * 32).decode(),
        DATABASE_URL=f"sqlite:///{database}",
        LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    return env


def make_site(template: Path, simulator, name: str, models: dict[str, str], **extra: str) -> Site:
    database = template / f"{name}.sqlite3"
    shutil.copy(template / "template.sqlite3", database)
    env = base_env(database)
    env.update(OLLAMA_HOST=simulator.ollama_url, **extra)
    logs = template / f"{name}-logs"
    logs.mkdir(exist_ok=True)
    seeded = subprocess.run(
        [sys.executable, "manage.py", "shell", "-v", "0", "-c", SEED.format(models=models)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert seeded.returncode == 0, seeded.stderr
    data = json.loads(seeded.stdout.strip().splitlines()[-1])
    return Site(env=env, cookie=data["cookie"], token=data["token"], sessions=data["sessions"], logs=logs)


async def ask(port: int, site: Site, name: str, message: str = "Tell me a story.") -> Socket:
    ws = await Socket.open("127.0.0.1", port, f"/ws/sessions/{site.sessions[name]}/", site.cookie)
    await ws.until("ready")
    await ws.send({"type": "chat", "message": message, "turn": name})
    return ws


async def frames_until(ws: Socket, *types: str, timeout: float = 30) -> list[dict]:
    frames = []
    while not frames or frames[-1]["type"] not in types:
        frames.append(await asyncio.wait_for(ws.receive(), timeout))
    return frames


def text_of(frames: list[dict]) -> str:
    return "".join(f["text"] for f in frames if f["type"] == "token")


# --- Redis going away --------------------------------------------------------------------------


class OwnRedis:
    """A redis-server on a port of its own, stopped and started by this test (by PID)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            done = subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True)
            if done.stdout.strip() == "PONG":
                return
            time.sleep(0.1)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_two_servers_through_a_redis_outage_and_a_sigterm(template, simulator):
    """One deployment, two daphne processes over one Redis, through the outages of a day.

    (One scenario rather than several tests: starting servers is most of the cost.)
    """
    redis = OwnRedis(free_port())
    redis.start()
    models = {
        "chat": "ollama:llama3.2-rate-200-words-30",
        "short": "ollama:llama3.2-rate-20-words-20",  # one second: finishes within the grace period
        "long": "ollama:llama3.2-rate-20-words-600",  # thirty seconds: cut off by the stop
        "late": "ollama:llama3.2",
    }
    site = make_site(
        template,
        simulator,
        "redis",
        models,
        REDIS_URL=f"redis://127.0.0.1:{redis.port}/0",
        SHUTDOWN_GRACE_SECONDS="2",
    )
    servers: list[subprocess.Popen] = []
    ports: list[int] = []
    try:
        for name in ("a", "b"):
            process, port = site.daphne(name)
            servers.append(process)
            ports.append(port)
        sid = site.sessions["chat"]
        pages = ["/", "/sessions/", f"/sessions/{sid}/", "/accounts/login/"]

        def page_statuses() -> list[int]:
            with httpx.Client(base_url=f"http://127.0.0.1:{ports[0]}", headers={"Cookie": site.cookie}) as http:
                return [http.get(path).status_code for path in pages for _ in range(3)]

        async def one_turn(turn: str, *, watch: bool = True) -> tuple[list[dict], list[dict]]:
            path = f"/ws/sessions/{sid}/"
            asker = await Socket.open("127.0.0.1", ports[0], path, site.cookie)
            watcher = await Socket.open("127.0.0.1", ports[1], path, site.cookie)
            try:
                await asker.until("ready")
                await watcher.until("ready")
                await asker.send({"type": "chat", "message": f"Turn {turn}", "turn": turn})
                asked = await frames_until(asker, "message.done")
                watched = []
                if watch:
                    with contextlib.suppress(TimeoutError):
                        watched = await frames_until(watcher, "message.done", timeout=2)
                return asked, watched
            finally:
                asker.close()
                watcher.close()

        # Redis up: pages, and fan-out through Redis to the other daphne.
        assert page_statuses() == [200] * 12
        asked, watched = asyncio.run(one_turn("before"))
        assert text_of(watched) == text_of(asked) != ""

        # Redis down: pages stay 200 (the brand cache falls back), the asking socket is unaffected.
        redis.stop()
        assert page_statuses() == [200] * 12
        asked, _watched = asyncio.run(one_turn("during", watch=False))
        assert asked[-1]["message"]["status"] == "complete"
        log = (site.logs / "a.log").read_text()
        assert log.count("The Redis cache at") == 1, log  # one warning for the outage, not one per request
        assert "Traceback" not in log

        # Redis back: fan-out resumes by itself (within the layer's 5-second backoff).
        redis.start()
        deadline = time.monotonic() + 30
        watched = []
        while time.monotonic() < deadline and not watched:
            asked, watched = asyncio.run(one_turn(f"after{int(time.monotonic())}"))
            if text_of(watched) != text_of(asked):
                watched = []
        assert watched, "fan-out did not come back after Redis returned"
        assert page_statuses() == [200] * 12

        # SIGTERM: no new answer, a short one finishes, a long one is stored as partial, then exit.
        refused, done, stopped = asyncio.run(sigterm_mid_answers(site, ports[0], servers[0]))
        assert servers[0].wait(timeout=20) == 0, process_log(servers[0])
    finally:
        for server in servers:
            stop(server)
        redis.stop()

    assert refused is not None, "new answers were still taken after SIGTERM"
    assert refused.headers["Retry-After"] == "5"
    assert refused.json()["error"]["code"] == "server_stopping"
    assert done["type"] == "message.done" and done["message"]["status"] == "complete"
    assert stopped["type"] == "stopped" and stopped["stored"]["status"] == "partial"
    assert stopped["stored"]["error"].startswith("Cut off: the server was restarting")
    messages, problems = site.report()
    long = messages["long"]
    assert [m["status"] for m in long] == ["complete", "partial"] and long[1]["content"] == stopped["stored"]["content"]
    assert messages["late"] == []  # refused before anything was stored
    assert problems == {}


async def sigterm_mid_answers(site: Site, port: int, server: subprocess.Popen):
    short, long = await ask(port, site, "short"), await ask(port, site, "long")
    await frames_until(short, "token")
    await frames_until(long, "token")
    server.send_signal(signal.SIGTERM)
    refused = None
    headers = {"Authorization": f"Bearer {site.token}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers) as http:
        for _ in range(50):
            response = await http.post(f"/api/ollama/session/{site.sessions['late']}/chat", json={"message": "More?"})
            if response.status_code == 503:
                refused = response
                break
            await asyncio.sleep(0.1)
    done = await frames_until(short, "message.done", "stopped", "error")
    stopped = await frames_until(long, "message.done", "stopped", "error", timeout=20)
    return refused, done[-1], stopped[-1]
