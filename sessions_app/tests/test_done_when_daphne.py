"""Issue 4's "Done when", for real: daphne and the provider simulator as processes, over HTTP.

A session starts on an Ollama model for one client, switches to openai:gpt-4o for another
and ends: `by_client` adds up exactly, the carried context reached the OpenAI request, and
the seal is valid until a stored field is edited.
"""

from __future__ import annotations

import base64
import os
import sqlite3
import subprocess
import sys
from decimal import Decimal

import httpx
import pytest

from sessions_app.tests.processes import ROOT, daphne, stop, wait_for

SEED = """
from django.core.management import call_command
call_command("migrate", verbosity=0)
from billing.pricing import load_price_list
from sessions_app.models import ApiToken
from tests.factories import BrandFactory, ClientFactory, UserFactory
load_price_list()
user = UserFactory(username="olivia")
for slug, name in (("acme", "Acme Corp"), ("globex", "Globex")):
    BrandFactory(client=ClientFactory(slug=slug, name=name), name=name)
print(ApiToken.issue(user=user)[1])
"""


@pytest.mark.slow
def test_done_when_against_daphne_and_the_simulator(tmp_path, simulator):
    database = tmp_path / "db.sqlite3"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "REDIS_URL", "PYTEST_XDIST_WORKER")
    }
    env.update(
        DJANGO_SETTINGS_MODULE="config.settings",
        DEBUG="1",
        SECRET_KEY="done-when-test",
        SESSION_SIGNING_KEY=base64.b64encode(b"d" * 32).decode(),
        DATABASE_URL=f"sqlite:///{database}",
        OLLAMA_HOST=simulator.ollama_url,
        OPENAI_BASE_URL=simulator.openai_url,
        OPENAI_API_KEY="sk-simulator",
        ANTHROPIC_BASE_URL=simulator.anthropic_url,
        ANTHROPIC_API_KEY="sk-ant-simulator",
        LOG_LEVEL="WARNING",
    )

    def manage(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )

    seeded = manage("shell", "-c", SEED)
    assert seeded.returncode == 0, seeded.stderr
    token = seeded.stdout.strip().splitlines()[-1]

    web, web_port = daphne(env, (tmp_path / "daphne.log").open("w"))
    try:
        wait_for(f"http://127.0.0.1:{web_port}/api/ollama/signing-key", web)
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{web_port}/api/ollama", headers={"Authorization": f"Bearer {token}"}, timeout=30
        )

        started = api.post("/session/start", json={"client": "acme", "model": "ollama:llama3.2"})
        assert started.status_code == 201, started.text
        sid = started.json()["session_id"]
        with api.stream(
            "POST", f"/session/{sid}/chat", json={"message": "Our codename is Bluebird.", "stream": True}
        ) as r:
            lines = [line for line in r.iter_lines() if line]
        assert r.status_code == 200 and '"type": "done"' in lines[-1]

        switched = api.post(f"/session/{sid}/switch", json={"client": "globex", "model": "openai:gpt-4o"})
        assert switched.status_code == 200 and switched.json()["reason"] == "domain_switch"
        paid = api.post(f"/session/{sid}/chat", json={"message": "What is our codename?"}).json()
        assert paid["provider"] == "openai" and Decimal(paid["cost_usd"]) > 0

        openai_call = simulator.last_request(path="/v1/chat/completions")
        assert "Our codename is Bluebird." in [m["content"] for m in openai_call["body"]["messages"]]

        summary = api.post(f"/session/{sid}/end").json()
        assert summary == api.post(f"/session/{sid}/end").json()
        assert [row["client"] for row in summary["by_client"]] == ["acme", "globex"]
        assert sum(row["seconds"] for row in summary["by_client"]) == summary["duration_seconds"]
        assert sum(Decimal(row["cost_usd"]) for row in summary["by_client"]) == Decimal(summary["total_cost_usd"])
        assert sum(row["tokens"] for row in summary["by_client"]) == summary["total_tokens"]
        assert summary["context_streams"][0]["settled"] and summary["integrity"]["valid"]

        with sqlite3.connect(database) as db:
            db.execute(
                "UPDATE ollama_session_messages SET cost_usd = 0 WHERE session_id = ? AND seq = 4",
                (sid.replace("-", ""),),
            )
        integrity = api.get(f"/session/{sid}/summary").json()["integrity"]
        assert integrity["valid"] is False and "message #4" in integrity["detail"]
    finally:
        stop(web)
