"""Helpers for tests that run the app as real processes (daphne, manage.py) over loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

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
