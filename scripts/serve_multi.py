"""Serve the product with several daphne processes on one machine behind HAProxy.

    .venv/bin/python scripts/serve_multi.py [--processes N] [--host 127.0.0.1] [--port 8000]

One daphne is one Python process, so it uses one core at most. This starts N of them (one
per core by default), each on its own Unix socket, and HAProxy (Debian's package: `make
install-front`) in front on HOST:PORT. HAProxy balances pages and sockets by least
connections, which suits long streamed answers, and a gateway token's calls by a hash of the
token with bounded load (its conversation is remembered where it was last answered); it passes WebSocket upgrades through and forwards streamed
bodies as they arrive (it never buffers a response), so live chat pages, NDJSON and SSE
behave exactly as against one daphne. A daphne that dies is taken out of rotation by
HAProxy's health check and restarted here; Ctrl-C or SIGTERM stops everything.

The configuration is the environment, as for `make run` (DATABASE_URL, REDIS_URL, ...).
Several processes share no memory, so they need PostgreSQL and Redis (the channel layer
carries live answers and stop requests between them); with one process anything goes.
HAProxy serves no files, so the daphnes serve /static/ (SERVE_STATIC defaults to on here).

Only the standard library: bench/peers.py imports `Front` to run the same deployment.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

NO_HAPROXY = "HAProxy is not installed: run `make install-front` (Debian's haproxy package) and try again."
NEEDS_POSTGRES = (
    "Several processes need PostgreSQL: set DATABASE_URL=postgres://... "
    "(SQLite serialises writers across processes; one process is `make run`)."
)
NEEDS_REDIS = (
    "Several processes need Redis as the channel layer: set REDIS_URL=redis://... "
    "(live answers and Stop travel between processes through it)."
)
BAD_PROCESSES = "--processes must be at least 1, got {processes}."
# Restarting a daphne that keeps dying only hides the problem: give up after this many in a minute.
MAX_RESTARTS_PER_MINUTE = 5


class FrontError(Exception):
    """The deployment cannot start as asked; the message says why and what to do."""


def check_environment(*, processes: int, environ: dict[str, str]) -> None:
    """Refuse a deployment whose processes could not share state, with a message saying what to set."""
    if processes < 1:
        raise FrontError(BAD_PROCESSES.format(processes=processes))
    if shutil.which("haproxy") is None:
        raise FrontError(NO_HAPROXY)
    if processes > 1:
        if not environ.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://", "pgsql://")):
            raise FrontError(NEEDS_POSTGRES)
        if not environ.get("REDIS_URL", "").strip():
            raise FrontError(NEEDS_REDIS)


def haproxy_config(*, host: str, port: int, sockets: list[Path], stats_socket: Path) -> str:
    """HAProxy's configuration for N daphnes on Unix sockets behind one HTTP port."""
    servers = "\n".join(
        f"    server daphne{index} unix@{path} check inter 2s fall 2 rise 1"
        for index, path in enumerate(sockets, start=1)
    )
    return f"""# Written by scripts/serve_multi.py; see docs/OPERATIONS.md.
global
    # One thread forwards tens of thousands of requests a second: leave the cores to daphne.
    nbthread 1
    maxconn 4096
    stats socket {stats_socket} mode 600 level admin

defaults
    mode http
    option forwardfor
    # Tokens are interactive: without this HAProxy corks small writes (MSG_MORE), and a
    # streamed answer's first token waited ~200 ms more behind it (bench/peers.py, paced model).
    option http-no-delay
    timeout connect 5s
    # Slow clients may not hold a connection while sending headers.
    timeout http-request 30s
    timeout http-keep-alive 30s
    # Long answers, a slow model's first token, and idle WebSockets (the tunnel) stay open.
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    timeout client-fin 30s

frontend web
    bind {host}:{port}
    # A gateway call's token: its Authorization header, or the <token> of a /t/<token>/ path.
    http-request set-var(txn.token) req.hdr(authorization)
    http-request set-var(txn.token) path,field(3,/) if {{ path_beg /t/ }}
    use_backend gateway if {{ var(txn.token) -m found }}
    default_backend daphne

backend daphne
    # A streamed answer holds its connection for seconds: count connections, not requests.
    balance leastconn
{servers}

backend gateway
    # The daphne that answered a token's last call remembers where that conversation is stored
    # and places the next call without reading it (docs/GATEWAY.md): a token's calls go to one
    # daphne (a consistent hash of the token) unless it already holds more than its share of
    # the open connections (the least HAProxy allows, 101 %), then to the next; so concurrent
    # calls still spread over every core as with least connections.
    balance hash var(txn.token)
    hash-type consistent
    hash-balance-factor 101
{servers}
"""


@dataclass
class Front:
    """N daphne processes behind HAProxy, started and stopped together."""

    processes: int
    host: str = "127.0.0.1"
    port: int = 8000
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    runtime_dir: Path | None = None
    python: str = sys.executable
    log_dir: Path | None = None
    daphnes: list[subprocess.Popen] = field(default_factory=list)
    haproxy: subprocess.Popen | None = None
    _owns_runtime_dir: bool = False
    _restarts: list[float] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def sockets(self) -> list[Path]:
        assert self.runtime_dir is not None
        return [self.runtime_dir / f"daphne{index}.sock" for index in range(1, self.processes + 1)]

    @property
    def stats_socket(self) -> Path:
        assert self.runtime_dir is not None
        return self.runtime_dir / "haproxy.sock"

    def pids(self) -> list[int]:
        """Every process this front runs: the daphnes, then HAProxy."""
        return [p.pid for p in self.daphnes] + ([self.haproxy.pid] if self.haproxy else [])

    def start(self, *, timeout: float = 60.0) -> Front:
        check_environment(processes=self.processes, environ=self.environ)
        if self.runtime_dir is None:
            # Unix socket paths are limited to ~100 bytes: keep the directory short.
            self.runtime_dir = Path(tempfile.mkdtemp(prefix="serve-multi-"))
            self._owns_runtime_dir = True
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        env = {**self.environ, "SERVE_STATIC": self.environ.get("SERVE_STATIC", "1")}
        try:
            self.daphnes = [self._start_daphne(index, env) for index in range(self.processes)]
            for index, path in enumerate(self.sockets):
                _wait_for_socket(path, self.daphnes[index], timeout)
            config = self.runtime_dir / "haproxy.cfg"
            config.write_text(
                haproxy_config(host=self.host, port=self.port, sockets=self.sockets, stats_socket=self.stats_socket)
            )
            self.haproxy = subprocess.Popen(
                ["haproxy", "-db", "-f", str(config)],
                stdout=self._log("haproxy"),
                stderr=subprocess.STDOUT,
            )
            _wait_for_port(self.host, self.port, self.haproxy, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _log(self, name: str):
        if self.log_dir is None:
            return subprocess.DEVNULL
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return (self.log_dir / f"{name}.log").open("a")

    def _start_daphne(self, index: int, env: dict[str, str]) -> subprocess.Popen:
        path = self.sockets[index]
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a socket left by a daphne that died
        return subprocess.Popen(
            # --proxy-headers: the client's address comes from HAProxy's X-Forwarded-For.
            [self.python, "-m", "daphne", "-u", str(path), "--proxy-headers", "config.asgi:application"],
            cwd=ROOT,
            env=env,
            stdout=self._log(f"daphne{index + 1}"),
            stderr=subprocess.STDOUT,
        )

    def supervise(self, *, poll: float = 0.5) -> int:
        """Restart daphnes that die, until HAProxy exits or one keeps dying; return an exit status."""
        env = {**self.environ, "SERVE_STATIC": self.environ.get("SERVE_STATIC", "1")}
        while True:
            if self.haproxy is not None and self.haproxy.poll() is not None:
                print(f"HAProxy exited with status {self.haproxy.returncode}.", file=sys.stderr)
                return 1
            for index, process in enumerate(self.daphnes):
                if process.poll() is None:
                    continue
                now = time.monotonic()
                self._restarts = [t for t in self._restarts if now - t < 60] + [now]
                if len(self._restarts) > MAX_RESTARTS_PER_MINUTE:
                    print(
                        f"daphne {index + 1} exited with status {process.returncode}; "
                        f"{MAX_RESTARTS_PER_MINUTE} restarts in a minute, giving up.",
                        file=sys.stderr,
                    )
                    return 1
                print(f"daphne {index + 1} exited with status {process.returncode}; restarting it.", file=sys.stderr)
                self.daphnes[index] = self._start_daphne(index, env)
            time.sleep(poll)

    def stop(self) -> None:
        """Stop HAProxy first (no new requests), then every daphne; remove what start() created."""
        for process in ([self.haproxy] if self.haproxy else []) + self.daphnes:
            if process.poll() is None:
                process.terminate()
        for process in ([self.haproxy] if self.haproxy else []) + self.daphnes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._owns_runtime_dir and self.runtime_dir is not None:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def server_sessions(self) -> dict[str, int]:
        """Requests HAProxy has sent to each daphne so far (its `stot` counter), by server name."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(self.stats_socket))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        served: dict[str, int] = {}
        for row in rows:  # both backends (pages and the gateway) send to the same daphnes
            if row.get("pxname") in ("daphne", "gateway") and row["svname"] not in ("BACKEND", "FRONTEND"):
                served[row["svname"]] = served.get(row["svname"], 0) + int(row["stot"] or 0)
        return served


def _wait_for_socket(path: Path, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FrontError(f"daphne exited with status {process.returncode} before listening on {path}.")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            return
        time.sleep(0.1)
    raise FrontError(f"daphne did not listen on {path} within {timeout:.0f} s.")


def _wait_for_port(host: str, port: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FrontError(f"HAProxy exited with status {process.returncode} (is {host}:{port} already in use?).")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.1)
    raise FrontError(f"HAProxy did not listen on {host}:{port} within {timeout:.0f} s.")


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="daphne processes (default: cores)")
    parser.add_argument("--host", default="127.0.0.1", help="address HAProxy listens on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")), help="default $PORT or 8000")
    parser.add_argument("--runtime-dir", type=Path, help="sockets and haproxy.cfg (default: a new temporary dir)")
    parser.add_argument("--log-dir", type=Path, help="one log file per process (default: none)")
    args = parser.parse_args(argv)
    front = Front(
        processes=args.processes, host=args.host, port=args.port, runtime_dir=args.runtime_dir, log_dir=args.log_dir
    )
    # SIGTERM (systemd, kill) stops everything the way Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        front.start()
    except FrontError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(
        f"Serving on {front.url}/ with {args.processes} daphne process(es) behind HAProxy "
        f"(pids {' '.join(map(str, front.pids()))}; runtime files in {front.runtime_dir})",
        flush=True,
    )
    try:
        return front.supervise()
    except KeyboardInterrupt:
        return 0
    finally:
        front.stop()


if __name__ == "__main__":
    sys.exit(main())
