"""A tiny HTTP server for tests that writes canned (recorded) bytes back, in chosen pieces."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path

RECORDINGS = Path(__file__).resolve().parent / "recordings"

CONTENT_TYPES = {
    "ollama": "application/x-ndjson",
    "openai": "text/event-stream; charset=utf-8",
    "anthropic": "text/event-stream; charset=utf-8",
}


def recording(name: str) -> bytes:
    return (RECORDINGS / name).read_bytes()


@dataclass
class Canned:
    status: int
    body: bytes
    content_type: str = "application/json"
    split: int | None = None  # write the body as HTTP chunks of this many bytes
    hang_after: int | None = None  # stop after this many bytes and wait for the client to leave
    headers: list[tuple[str, str]] = field(default_factory=list)


class ReplayServer:
    """Answers every request with the next canned response (the last one repeats)."""

    def __init__(self) -> None:
        self.responses: list[Canned] = []
        self.requests: list[dict] = []
        self.client_left = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, status: int, body: bytes | str | dict, **kwargs) -> ReplayServer:
        if isinstance(body, dict):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        self.responses.append(Canned(status, body, **kwargs))
        return self

    async def __aenter__(self) -> ReplayServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                method, path, _ = lines[0].split(" ", 2)
                self.requests.append(
                    {"method": method, "path": path, "headers": headers, "body": json.loads(body) if body else None}
                )
                canned = self.responses[min(len(self.requests) - 1, len(self.responses) - 1)]
                if not await self._answer(reader, writer, canned):
                    return
        except ConnectionError:
            return
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, canned: Canned) -> bool:
        head = [f"HTTP/1.1 {canned.status} Whatever", f"Content-Type: {canned.content_type}"]
        head += [f"{k}: {v}" for k, v in canned.headers]
        body = canned.body if canned.hang_after is None else canned.body[: canned.hang_after]
        if canned.split is None and canned.hang_after is None:
            head.append(f"Content-Length: {len(body)}")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
            await writer.drain()
            return True
        head.append("Transfer-Encoding: chunked")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        step = canned.split or len(body) or 1
        for start in range(0, len(body), step):
            piece = body[start : start + step]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0)
        if canned.hang_after is not None:
            # Silence: the client must be the one to close the connection.
            while await reader.read(1024):
                pass
            self.client_left.set()
            return False
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True
