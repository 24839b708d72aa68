"""A quiet terminal: each expected answer is one access-log line, and no warning says nothing."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from django.core.exceptions import PermissionDenied
from django.test import RequestFactory

BASE_DIR = Path(__file__).resolve().parent.parent


def test_expected_404s_and_403s_leave_no_log_record_or_traceback(db, client, caplog):
    from django.core.handlers.exception import response_for_exception

    with caplog.at_level(logging.DEBUG, logger="django"):
        assert client.get("/no-such-page/").status_code == 404
        request = RequestFactory().get("/somewhere/")
        assert response_for_exception(request, PermissionDenied()).status_code == 403
    assert [r for r in caplog.records if r.name == "django.request"] == []


def test_a_server_error_is_still_logged(caplog):
    from django.core.handlers.exception import response_for_exception

    request = RequestFactory().get("/somewhere/")
    with caplog.at_level(logging.DEBUG, logger="django"):
        try:
            raise RuntimeError("boom")
        except RuntimeError as exc:
            assert response_for_exception(request, exc).status_code == 500
    assert [r.levelname for r in caplog.records if r.name == "django.request"] == ["ERROR"]


def test_commands_on_sqlite_print_no_index_warning(tmp_path):
    env = {**os.environ, "DEBUG": "1", "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}"}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--database", "default"],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "W040" not in result.stdout + result.stderr
