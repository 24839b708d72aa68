"""No secret in any log (issue 18, item 6): a real daphne process serves calls that carry a
token in the path and in the header, answering, refusing and failing; then its whole output,
access log included, is searched for the token."""

from __future__ import annotations

import base64
import logging
import os
import secrets
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from config.logmask import MaskSecrets, mask
from sessions_app.models import ApiToken
from sessions_app.tests.processes import daphne, database_for_a_subprocess, stop, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def daphne_with_token(owner, client_acme, use_simulator):
    """(base URL, raw token, log file) of a production-like daphne process, stopped afterwards."""
    _token, raw = ApiToken.issue(user=owner, client=client_acme, name="Editor")
    folder = Path(tempfile.mkdtemp(prefix="logs-test-"))
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DEBUG": "0",
        "SECRET_KEY": secrets.token_urlsafe(40),
        "SESSION_SIGNING_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
        "ALLOWED_HOSTS": "127.0.0.1",
        "DATABASE_URL": database_for_a_subprocess(folder)[0],
        "LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("REDIS_URL", None)  # one process: nothing to share
    log = open(folder / "daphne.log", "w")  # closed below, after the process
    process, port = daphne(env, log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/api/version", process)
        yield base, raw, folder / "daphne.log"
    finally:
        stop(process)
        log.close()


def test_no_log_line_of_a_run_holds_an_api_token(daphne_with_token):
    base, raw, log_file = daphne_with_token
    prefixed = f"{base}/t/{raw}"
    guessed = "bws_" + secrets.token_urlsafe(32)
    chat = {"model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": "Hello"}]}
    with httpx.Client(timeout=30) as client:
        assert client.post(f"{prefixed}/api/chat", json=chat).status_code == 200
        assert client.get(f"{prefixed}/v1/models").status_code == 200
        assert client.get(f"{prefixed}/api/nothing-here").status_code == 404
        assert client.get(f"{prefixed}/not-an-endpoint").status_code == 404
        assert client.post(f"{prefixed}/api/chat", content=b"[" * 50000).status_code == 400
        assert client.get(f"{prefixed}/v1/models/no-such-model").status_code == 404
        assert client.post(f"{base}/t/{guessed}/api/chat", json=chat).status_code == 401
        bearer = {"Authorization": f"Bearer {raw}"}
        assert client.get(f"{base}/api/ollama/sessions", headers=bearer).status_code == 200
        assert client.get(f"{base}/api/ollama/session/not-a-session/summary", headers=bearer).status_code == 404
        assert client.get(f"{base}/sessions/?token={raw}").status_code == 302  # a query string is not logged
    text = log_file.read_text()
    assert text.count("\n") >= 10, text  # the access log wrote a line per request
    assert raw not in text and raw[10:] not in text
    assert guessed not in text and guessed[10:] not in text
    assert f"/t/{raw[:6]}…/api/chat" in text  # the access log's lines are there, masked


def test_the_mask_filter_masks_messages_arguments_and_tracebacks():
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "Not Found: %s", ("/t/bws_secretsecret/api/x",), None)
    try:
        raise ValueError("token bws_abcdefghijklmnop leaked")
    except ValueError:
        record.exc_info = sys.exc_info()
    MaskSecrets().filter(record)
    assert record.getMessage() == "Not Found: /t/bws_se…/api/x"
    assert "bws_abcdefghijklmnop" not in record.exc_text and "bws_ab…" in record.exc_text
    assert mask("GET /t/short/api/tags") == "GET /t/short…/api/tags"
