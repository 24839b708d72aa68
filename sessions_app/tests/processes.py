"""Helpers for tests that run the app as real processes (daphne, manage.py) over loopback."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def daphne(env: dict, log, *, port: int | None = None) -> tuple[subprocess.Popen, int]:
    """daphne serving the app, and its port.

    Without `port`, the listening socket is bound here and handed to daphne (`--fd`), so a test
    running in parallel that picked the same "free" port can never answer in its place (a
    browser test once signed in to another worker's server that way). With `port` (starting a
    stopped server again on its old port), daphne binds it itself.
    """
    common = {"cwd": ROOT, "env": env, "stdout": log, "stderr": subprocess.STDOUT}
    app = "config.asgi:application"
    if port is not None:
        command = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), app]
        return subprocess.Popen(command, **common), port
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as daphne's own: restartable
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        command = [sys.executable, "-m", "daphne", "--fd", str(sock.fileno()), app]
        return subprocess.Popen(command, pass_fds=(sock.fileno(),), **common), sock.getsockname()[1]


def server_database(env: dict, workdir: Path, suffix: str) -> str:
    """A DATABASE_URL of a server process's own: the test process's database is not visible to it.

    A SQLite file in `workdir`, or on PostgreSQL a fresh `<name>_<suffix>_<worker>` database:
    xdist spreads one module's tests over its workers, and each worker starts the module's server
    for itself, so the name carries the worker too (two workers once migrated one database at
    the same time and left it half-built).
    """
    url = env.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        return f"sqlite:///{workdir / 'db.sqlite3'}"
    import psycopg

    parsed = urlparse(url)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"{parsed.path.lstrip('/') or 'postgres'}_{suffix}_{worker}"
    admin = urlunparse(parsed._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return urlunparse(parsed._replace(path=f"/{name}"))


def database_for_a_subprocess(folder: Path, name: str = "db.sqlite3") -> tuple[str, Callable[[str], list]]:
    """The test database where another process can open it, and a query that reads it back.

    On PostgreSQL that is the test database itself (committed rows only: use a transactional
    test); on SQLite it lives in this process's memory, so the subprocess gets a file copy in
    `folder` and the query reads that copy.
    """
    from django.db import connection

    if connection.vendor == "postgresql":
        params = connection.get_connection_params()
        url = (
            f"postgres://{params.get('user') or 'postgres'}@{params.get('host') or '127.0.0.1'}:"
            f"{params.get('port') or 5432}/{connection.settings_dict['NAME']}"
        )

        def query(sql: str) -> list:
            with connection.cursor() as cursor:
                cursor.execute(sql)
                return cursor.fetchall()

        return url, query
    path = folder / name
    connection.ensure_connection()
    with sqlite3.connect(path) as target:
        connection.connection.backup(target)

    def read(sql: str) -> list:
        with sqlite3.connect(path) as db:
            return db.execute(sql).fetchall()

    return f"sqlite:///{path}", read


def process_log(process: subprocess.Popen) -> str:
    return Path(process.stdout.name).read_text()[-2000:] if process.stdout else ""


def wait_for(url: str, process: subprocess.Popen, seconds: float = 60) -> None:
    """Wait until `url` answers, failing with the process's log if it exits or never answers."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{process.args} exited with {process.returncode}: {process_log(process)}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer: {process_log(process)}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
