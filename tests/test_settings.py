"""Settings refuse bad configuration loudly, naming the variable, and default safe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BASE_DIR = Path(__file__).resolve().parent.parent
GOOD_KEY = "dGVzdC1zaWduaW5nLWtleS0zMi1ieXRlcy1sb25nISE="
CONFIG_VARS = {
    "DEBUG",
    "SECRET_KEY",
    "SESSION_SIGNING_KEY",
    "DATABASE_URL",
    "REDIS_URL",
    "ALLOWED_HOSTS",
    "OLLAMA_HOST",
    "OPENAI_BASE_URL",
    "ANTHROPIC_BASE_URL",
    "SESSION_IDLE_TIMEOUT",
    "CONTEXT_OVERFLOW",
    "PROVIDER_SIMULATOR",
    "TIME_ZONE",
    "LOG_LEVEL",
    "OLLAMA_KEEP_ALIVE",
    "SERVE_STATIC",
    "CSRF_TRUSTED_ORIGINS",
    "DJANGO_SETTINGS_MODULE",
    "DB_PREPARED_STATEMENTS",
    "SECURE_HSTS_SECONDS",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS",
    "SECURE_HSTS_PRELOAD",
    "SECURE_SSL_REDIRECT",
    "SECURE_PROXY_SSL_HEADER",
    "SIGNIN_FAILURE_LIMIT",
    "TOKEN_FAILURE_LIMIT",
    "CLIENT_IP_HEADER",
    "SESSION_TRUSTED_KEYS",
}


def import_settings(
    tmp_path: Path, script: str = "import config.settings as s; print('DEBUG', s.DEBUG)", **env: str
) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS and not k.startswith("PROVIDER_")}
    clean.update({"DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}", "SECRET_KEY": "k" * 50})
    clean.update(env)
    clean = {k: v for k, v in clean.items() if v is not None}
    return subprocess.run(
        [sys.executable, "-c", script], cwd=BASE_DIR, env=clean, capture_output=True, text=True, timeout=60
    )


def assert_refused(result: subprocess.CompletedProcess, variable: str) -> None:
    assert result.returncode != 0, result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("django.core.exceptions.ImproperlyConfigured"), result.stderr
    assert variable in last


@pytest.mark.parametrize("value", ["maybe", "2", "True!"])
def test_debug_must_be_a_real_boolean(tmp_path, value):
    assert_refused(import_settings(tmp_path, DEBUG=value, SESSION_SIGNING_KEY=GOOD_KEY), "DEBUG")


@pytest.mark.parametrize(
    "url",
    ["notaurl", "mysql://u:pw@db/app", "postgres://", "postgres://u@host:notaport/db", "foo://bar/baz"],
)
def test_malformed_database_url_is_refused(tmp_path, url):
    result = import_settings(tmp_path, DEBUG="1", SESSION_SIGNING_KEY=GOOD_KEY, DATABASE_URL=url)
    assert_refused(result, "DATABASE_URL")
    assert "pw@" not in result.stderr  # a password in the URL is never echoed


def test_secret_key_is_required_when_debug_is_off(tmp_path):
    assert_refused(import_settings(tmp_path, DEBUG="0", SECRET_KEY="", SESSION_SIGNING_KEY=GOOD_KEY), "SECRET_KEY")


def test_debug_is_off_unless_set(tmp_path):
    # With neither DEBUG nor a SECRET_KEY, start-up refuses: the default is production.
    result = import_settings(tmp_path, SECRET_KEY="", SESSION_SIGNING_KEY=GOOD_KEY, DEBUG="")
    assert_refused(result, "SECRET_KEY")


def test_signing_key_is_required_when_debug_is_off(tmp_path):
    assert_refused(import_settings(tmp_path, DEBUG="0"), "SESSION_SIGNING_KEY")


@pytest.mark.parametrize("key", ["not base64!", "c2hvcnQ="])
def test_bad_signing_key_is_refused(tmp_path, key):
    assert_refused(import_settings(tmp_path, DEBUG="0", SESSION_SIGNING_KEY=key), "SESSION_SIGNING_KEY")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REDIS_URL", "http://localhost:6379"),
        ("OLLAMA_HOST", "ftp://models"),
        ("OPENAI_BASE_URL", "api.openai.com"),
        ("SESSION_IDLE_TIMEOUT", "soon"),
        ("SESSION_IDLE_TIMEOUT", "0"),
        ("CONTEXT_OVERFLOW", "explode"),
        ("PROVIDER_SIMULATOR", "perhaps"),
        ("PROVIDER_FIRST_TOKEN_TIMEOUT", "-1"),
        ("CHAT_MAX_MESSAGE_CHARS", "lots"),
        ("TIME_ZONE", "Mars/Olympus_Mons"),
        ("LOG_LEVEL", "chatty"),
        ("OLLAMA_KEEP_ALIVE", "forever"),
        ("SERVE_STATIC", "sometimes"),
        ("DB_PREPARED_STATEMENTS", "sometimes"),
        ("ALLOWED_HOSTS", ","),
        ("CSRF_TRUSTED_ORIGINS", "billing.example.com"),
    ],
)
def test_other_bad_values_are_refused_by_name(tmp_path, name, value):
    assert_refused(import_settings(tmp_path, DEBUG="0", SESSION_SIGNING_KEY=GOOD_KEY, **{name: value}), name)


def test_a_good_production_configuration_loads(tmp_path):
    result = import_settings(tmp_path, DEBUG="0", SESSION_SIGNING_KEY=GOOD_KEY, REDIS_URL="redis://127.0.0.1:6379/0")
    assert result.returncode == 0, result.stderr
    assert "DEBUG False" in result.stdout


def test_development_generates_a_signing_key_beside_the_sqlite_database(tmp_path):
    result = import_settings(tmp_path, DEBUG="1", SESSION_SIGNING_KEY="")
    assert result.returncode == 0, result.stderr
    key_file = tmp_path / ".signing-key"
    assert key_file.exists()
    first = key_file.read_text()
    assert import_settings(tmp_path, DEBUG="1", SESSION_SIGNING_KEY="").returncode == 0
    assert key_file.read_text() == first


def test_test_settings_run_in_a_non_utc_zone():
    from django.conf import settings

    assert settings.TIME_ZONE == "America/New_York"


def test_empty_values_mean_the_safe_default(tmp_path):
    # .env.example lists every variable, many of them empty: empty must not turn security off.
    script = (
        "import config.settings as s; print(s.DEBUG, s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.SERVE_STATIC)"
    )
    result = import_settings(
        tmp_path,
        script,
        DEBUG="",
        SESSION_SIGNING_KEY=GOOD_KEY,
        SESSION_COOKIE_SECURE="",
        CSRF_COOKIE_SECURE="",
        SERVE_STATIC="",
        REDIS_URL="",
        TIME_ZONE="",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "True", "False"]


def test_env_example_lists_every_variable_the_settings_read():
    import re

    settings_source = (BASE_DIR / "config" / "settings.py").read_text()
    read = set(
        re.findall(
            r"(?:env_bool|env_int|env_float|env_url|os\.environ\.get|env\.list)\(\s*\"([A-Z_]+)\"", settings_source
        )
    )
    listed = set(re.findall(r"^([A-Z_]+)=", (BASE_DIR / ".env.example").read_text(), re.MULTILINE))
    readme = (BASE_DIR / "docs" / "CONFIGURATION.md").read_text()
    assert read, "no variables found: the pattern is out of date"
    assert read <= listed, f"missing from .env.example: {sorted(read - listed)}"
    assert all(f"`{name}`" in readme for name in read), [n for n in read if f"`{n}`" not in readme]


def manage(tmp_path: Path, *args: str, **env: str | None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS and not k.startswith("PROVIDER_")}
    clean.update({"DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}"}, **env)
    clean = {k: v for k, v in clean.items() if v is not None}
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=BASE_DIR, env=clean, capture_output=True, text=True, timeout=60
    )


def test_manage_py_reports_a_configuration_error_in_one_line(tmp_path):
    result = manage(tmp_path, "check", DEBUG="0", SECRET_KEY="")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "manage.py: configuration error: SECRET_KEY must be set when DEBUG is off. "
        "See .env.example and docs/CONFIGURATION.md."
    )


@pytest.mark.skipif((BASE_DIR / ".env").is_file(), reason="this checkout has a .env: it is configured")
def test_manage_py_in_an_unconfigured_checkout_runs_in_development(tmp_path):
    result = manage(tmp_path, "check")
    assert result.returncode == 0, result.stderr
    assert "running with DEBUG=1 (development)" in result.stderr


@pytest.mark.parametrize(("value", "expected"), [(None, "True 5"), ("1", "True 5"), ("0", "None None")])
def test_postgresql_prepares_repeated_statements_unless_told_not_to(tmp_path, value, expected):
    script = (
        "import config.settings as s; o = s.DATABASES['default']['OPTIONS'];"
        " print(o.get('server_side_binding'), o.get('prepare_threshold'))"
    )
    url = "postgres://postgres@127.0.0.1:5432/unused"
    result = import_settings(
        tmp_path, script, DEBUG="0", SESSION_SIGNING_KEY=GOOD_KEY, DATABASE_URL=url, DB_PREPARED_STATEMENTS=value
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected
