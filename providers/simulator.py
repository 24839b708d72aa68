"""A development and test stand-in for Ollama, OpenAI and Anthropic, on one asyncio HTTP server.

It speaks each wire protocol the way docs/PROTOCOLS.md records it (headers, framing, field order,
end-of-stream markers, error shapes), answers deterministically, streams at a set token rate,
and injects faults chosen by substrings of the model name:

- `fault-status-<code>`: an HTTP error before streaming, in that protocol's error shape;
- `fault-midstream`: a few tokens, then the protocol's mid-stream error;
- `fault-cut`: a few tokens, then the TCP connection is dropped;
- `fault-stall`: a few tokens, then silence; `fault-stall-first`: silence before the first token;
- `fault-slow`: 20 tokens a second; `rate-<n>`: n tokens a second (a real model's pace, for
  benchmarks under realistic load); `ttft-<ms>`: the first token comes ms milliseconds after
  the request (a real model's time to first token); `words-<n>`: an answer n words long;
- `unicode`: an answer of multi-byte words; `missing`: an unknown model (404).

It never bills anyone: it is a development tool, and says so in every answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

FAULT_TOKENS = 3  # tokens sent before a mid-stream fault
SLOW_RATE = 20.0
DEFAULT_RATE = 200.0
MAX_LOG = 1000

OLLAMA_TAGS = [
    (
        "llama3.2:latest",
        "llama",
        "3.2B",
        2019393189,
        "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
    ),
    ("qwen2.5:7b", "qwen2", "7.6B", 4683087332, "845dbda0ea48ed749caafd9e6037047aa19acfcfd82e704d7ca97d631a0b697e"),
    ("mistral:latest", "llama", "7.2B", 4113301824, "f974a74358d62a017b37c6f424fcdf2744ca02926c4f952513ddf474b2fa5091"),
    ("gemma3:1b", "gemma3", "999.89M", 815319791, "8648f39daa8fbf5b18c7b4e6a8fb4990c692751d49917417b8842ca5758e7ffc"),
]
OPENAI_MODELS = ["gpt-4o", "gpt-4o-2024-08-06", "gpt-4o-mini", "gpt-4.1", "gpt-4-turbo", "gpt-4"]
ANTHROPIC_MODELS = [
    ("claude-sonnet-4-20250514", "Claude Sonnet 4"),
    ("claude-opus-4-20250514", "Claude Opus 4"),
    ("claude-3-5-haiku-20241022", "Claude Haiku 3.5"),
]
# OpenAI answers the dated snapshot behind an alias, as the real API does.
OPENAI_SNAPSHOTS = {
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4.1": "gpt-4.1-2025-04-14",
}
ANTHROPIC_SNAPSHOTS = {
    "claude-sonnet-4": "claude-sonnet-4-20250514",
    "claude-sonnet-4-0": "claude-sonnet-4-20250514",
    "claude-opus-4": "claude-opus-4-20250514",
    "claude-opus-4-0": "claude-opus-4-20250514",
    "claude-3-5-sonnet-latest": "claude-3-5-sonnet-20241022",
    "claude-3-5-haiku-latest": "claude-3-5-haiku-20241022",
}

FILLER = (
    "the quick brown fox jumps over a lazy dog while seven tidy ledgers balance every billable hour "
    "and careful notes keep each client's context clear so nothing typed is ever lost in transit"
).split()
UNICODE_WORDS = ["café", "naïve", "日本語", "Ελληνικά", "emoji🙂", "€42", "Zürich", "привет", "ß", "—dash"]

_STATUS_RE = re.compile(r"fault-status-(\d{3})")
_WORDS_RE = re.compile(r"words-(\d+)")
_RATE_RE = re.compile(r"rate-(\d+)")
_TTFT_RE = re.compile(r"ttft-(\d+)")


class SimRequest(dict):
    """One request the simulator received; a dict (JSON-able) with attribute access."""

    def __init__(self, **fields: Any) -> None:
        super().__init__(**fields)
        self._finished = threading.Event()

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def finish(self, outcome: str) -> None:
        self["outcome"] = outcome
        self["finished"] = True
        self._finished.set()

    def wait_finished(self, timeout: float = 5.0) -> bool:
        """Block until the simulator is done with this request (answered, failed or disconnected)."""
        return self._finished.wait(timeout)


@dataclass
class Plan:
    """What the simulator does for one chat request, derived from the model name and body."""

    model: str
    tokens: list[str]
    prompt_tokens: int
    status: int | None = None  # fault-status-<code> or 404
    midstream: bool = False
    cut: bool = False
    stall: bool = False
    stall_first: bool = False
    rate: float = DEFAULT_RATE
    first_token_delay: float = 0.0  # seconds, from `ttft-<ms>`
    stop_reason: str = "stop"  # "stop" or "length"


class ClientGone(Exception):
    """The HTTP client closed its connection while we were answering."""


def compose_answer(model: str, messages: list[dict], system: str = "") -> list[str]:
    """The deterministic answer to `messages`, as a list of tokens (words with their leading space).

    It names how many messages came before the last user message (a top-level system prompt
    counts as one), so carried context is visible in the answer.
    """
    last_user = ""
    earlier = 0
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "user":
            last_user = _text_of(messages[index].get("content"))
            earlier = index + (1 if system else 0)
            break
    snippet = " ".join(last_user.split()[:8])
    if len(snippet) > 60:
        snippet = snippet[:57] + "..."
    words = f'Simulated answer to "{snippet}" with {earlier} earlier messages in context.'.split()
    if "unicode" in model:
        words = [*words[:3], *UNICODE_WORDS, *words[3:]]
    wanted = _WORDS_RE.search(model)
    if wanted:
        count = int(wanted.group(1))
        seed = int.from_bytes(hashlib.sha256(last_user.encode()).digest()[:4], "big")
        while len(words) < count:
            words.append(FILLER[(seed + len(words)) % len(FILLER)])
        words = words[:count]
    return [word if i == 0 else " " + word for i, word in enumerate(words)]


def count_prompt_tokens(messages: Sequence[Mapping[str, Any]], system: str = "") -> int:
    """Deterministic prompt size: 4 per message plus its words and punctuation, plus 3."""
    total = 3
    if system:
        total += 4 + _word_count(system)
    for message in messages:
        total += 4 + _word_count(_text_of(message.get("content")))
    return total


def _word_count(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text))


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # Anthropic / OpenAI content blocks
        return " ".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
    return ""


def _go_json(value: Any) -> str:
    """JSON the way Go's encoding/json writes it: compact, UTF-8, with <, > and & escaped."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if "<" in text or ">" in text or "&" in text:
        text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _go_time() -> str:
    now = time.time_ns()
    seconds, nanos = divmod(now, 1_000_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    fraction = f"{nanos:09d}".rstrip("0")
    return f"{stamp}.{fraction}Z" if fraction else f"{stamp}Z"


def _http_date() -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())


def _reason(status: int) -> str:
    if status == 529:
        return "Site Overloaded"
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class _Conn:
    """One client connection: writes responses and notices when the client goes away."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.transport = writer.transport

    @property
    def gone(self) -> bool:
        return self.reader.at_eof() or self.transport.is_closing()

    def head(self, status: int, headers: list[tuple[str, str]]) -> None:
        lines = [f"HTTP/1.1 {status} {_reason(status)}"]
        lines += [f"{name}: {value}" for name, value in headers]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def chunk(self, data: bytes) -> None:
        if self.gone:
            raise ClientGone
        self.transport.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_chunks(self) -> None:
        if self.gone:
            raise ClientGone
        self.transport.write(b"0\r\n\r\n")

    async def drain(self) -> None:
        if self.gone:
            raise ClientGone
        if self.transport.get_write_buffer_size() > 65536:
            try:
                await self.writer.drain()
            except (ConnectionError, RuntimeError):
                raise ClientGone from None

    async def wait_gone(self) -> None:
        """Silence: wait, sending nothing, until the client closes the connection."""
        while not self.gone:
            try:
                data = await self.reader.read(65536)
            except ConnectionError:
                return
            if not data:
                return


class ProviderSimulator:
    """The server. `start()` inside a running loop, or `start_in_thread()` from sync code."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tokens_per_second: float = DEFAULT_RATE) -> None:
        self.host = host
        self.port = port
        self.tokens_per_second = tokens_per_second
        self.requests: list[SimRequest] = []
        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._counter = 0
        self._connections: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections_accepted = 0  # TCP connections, to check that clients reuse theirs

    # --- addresses ---------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ollama_url(self) -> str:
        return self.url

    @property
    def openai_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def anthropic_url(self) -> str:
        return self.url

    # --- the request log ------------------------------------------------------------------
    def clear_requests(self) -> None:
        self.requests.clear()

    def last_request(self, *, path: str | None = None, model: str | None = None) -> SimRequest | None:
        for entry in reversed(list(self.requests)):
            if (path is None or entry["path"] == path) and (model is None or entry["model"] == model):
                return entry
        return None

    # --- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=2**20)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            if self._connections:
                _done, pending = await asyncio.wait(set(self._connections), timeout=2)
                for task in pending:
                    task.cancel()
            await self._server.wait_closed()
            self._server = None

    async def serve_forever(self) -> None:
        await self.start()
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    def start_in_thread(self) -> ProviderSimulator:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # surface bind errors to the caller
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        self._thread = threading.Thread(target=run, name="provider-simulator", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop_thread(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    # --- HTTP -------------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        self._writers.add(writer)
        self.connections_accepted += 1
        conn = _Conn(reader, writer)
        # A client that went away, or the server shutting down (CancelledError), ends this
        # connection quietly.
        quiet_end = (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ClientGone)
        try:
            with contextlib.suppress(*quiet_end, asyncio.CancelledError):
                while True:
                    request = await self._read_request(reader)
                    if request is None:
                        break
                    method, path, headers, raw = request
                    keep = await self._dispatch(conn, method, path, headers, raw)
                    if not keep or conn.gone:
                        break
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._connections.discard(task)
            if not writer.transport.is_closing():
                writer.close()

    async def _read_request(self, reader: asyncio.StreamReader):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = b""
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            body = b"".join(parts)
        return method.upper(), target.split("?", 1)[0], headers, body

    def _send_json(
        self,
        conn: _Conn,
        status: int,
        payload: Any,
        headers: list[tuple[str, str]] | None = None,
        *,
        head_only: bool = False,
    ) -> None:
        body = (payload if isinstance(payload, str) else _compact(payload)).encode()
        base = [("Content-Type", "application/json; charset=utf-8"), ("Date", _http_date())]
        conn.head(status, [*base, *(headers or []), ("Content-Length", str(len(body)))])
        if not head_only:
            conn.transport.write(body)

    def _log(self, method: str, path: str, headers: dict, raw: bytes, protocol: str) -> SimRequest:
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        model = body.get("model", "") if isinstance(body, dict) else ""
        self._counter += 1
        entry = SimRequest(
            seq=self._counter,
            method=method,
            path=path,
            headers=headers,
            body=body,
            protocol=protocol,
            model=model if isinstance(model, str) else "",
            received_at=datetime.now(UTC).isoformat(),
            status=None,
            outcome="pending",
            finished=False,
            tokens_sent=0,
            disconnected=False,
        )
        self.requests.append(entry)
        if len(self.requests) > MAX_LOG:
            del self.requests[: MAX_LOG // 2]
        return entry

    async def _dispatch(self, conn: _Conn, method: str, path: str, headers: dict, raw: bytes) -> bool:
        keep = headers.get("connection", "").lower() != "close"
        if path == "/_sim/requests" and method == "GET":
            self._send_json(conn, 200, list(self.requests)[-100:])
            return keep
        if path in ("/", "/api/version") and method in ("GET", "HEAD"):
            if path == "/":
                body = b"Ollama is running (provider simulator)"
                conn.head(200, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
                if method != "HEAD":
                    conn.transport.write(body)
            else:
                self._send_json(conn, 200, {"version": "0.5.1"}, head_only=method == "HEAD")
            return keep
        if path == "/api/tags" and method in ("GET", "HEAD"):
            self._send_json(conn, 200, {"models": [self._tag(*t) for t in OLLAMA_TAGS]}, head_only=method == "HEAD")
            return keep
        if path == "/v1/models" and method == "GET":
            if "anthropic-version" in headers:
                data = [
                    {"type": "model", "id": m, "display_name": d, "created_at": "2025-05-22T00:00:00Z"}
                    for m, d in ANTHROPIC_MODELS
                ]
                self._send_json(
                    conn, 200, {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
                )
            else:
                data = [
                    {"id": m, "object": "model", "created": 1715367049, "owned_by": "system"} for m in OPENAI_MODELS
                ]
                self._send_json(conn, 200, {"object": "list", "data": data})
            return keep
        routes = {
            "/api/chat": ("ollama", self._ollama),
            "/api/generate": ("ollama", self._ollama),
            "/v1/chat/completions": ("openai", self._openai),
            "/v1/messages": ("anthropic", self._anthropic),
        }
        if path in routes and method == "POST":
            protocol, handler = routes[path]
            entry = self._log(method, path, headers, raw, protocol)
            try:
                outcome = await handler(conn, entry)
            except ClientGone:
                entry["disconnected"] = True
                entry.finish("disconnected")
                return False
            entry.finish(outcome)
            return keep and outcome not in ("cut", "disconnected")
        body = b"404 page not found"
        conn.head(404, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        conn.transport.write(body)
        return keep

    @staticmethod
    def _tag(name: str, family: str, size: str, nbytes: int, digest: str) -> dict:
        return {
            "name": name,
            "model": name,
            "modified_at": "2025-05-04T17:37:44.706015396-07:00",
            "size": nbytes,
            "digest": digest,
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": family,
                "families": [family],
                "parameter_size": size,
                "quantization_level": "Q4_K_M",
            },
        }

    def _plan(self, model: str, messages: list[dict], max_tokens: Any, system: str = "") -> Plan:
        tokens = compose_answer(model, messages, system)
        plan = Plan(model=model, tokens=tokens, prompt_tokens=count_prompt_tokens(messages, system))
        plan.rate = self.tokens_per_second
        if "missing" in model:
            plan.status = 404
        elif match := _STATUS_RE.search(model):
            plan.status = int(match.group(1))
        plan.midstream = "fault-midstream" in model
        plan.cut = "fault-cut" in model
        plan.stall_first = "fault-stall-first" in model
        plan.stall = "fault-stall" in model and not plan.stall_first
        if "fault-slow" in model:
            plan.rate = SLOW_RATE
        elif (rate := _RATE_RE.search(model)) and int(rate.group(1)) > 0:
            plan.rate = float(rate.group(1))
        if ttft := _TTFT_RE.search(model):
            plan.first_token_delay = int(ttft.group(1)) / 1000
        if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and 0 < max_tokens < len(tokens):
            plan.tokens = tokens[:max_tokens]
            plan.stop_reason = "length"
        return plan

    @staticmethod
    async def _generate_whole(plan: Plan) -> None:
        """A paced model takes as long to answer without streaming as with it."""
        seconds = plan.first_token_delay
        if plan.rate and plan.rate > 0:
            seconds += len(plan.tokens) / plan.rate
        if seconds > 0:
            await asyncio.sleep(seconds)

    async def _pace(self, conn: _Conn, plan: Plan, entry: SimRequest, emit) -> str | None:
        """Send the tokens at the plan's rate; return a fault outcome, or None when all were sent."""
        loop = asyncio.get_running_loop()
        interval = 1.0 / plan.rate if plan.rate and plan.rate > 0 else 0.0
        if plan.first_token_delay > 0:
            # The headers and any preamble (OpenAI's role chunk, Anthropic's message_start) are
            # out; the model is "thinking" before its first token, as a real one does.
            await asyncio.sleep(plan.first_token_delay)
        started = loop.time()
        limit = FAULT_TOKENS if (plan.midstream or plan.cut or plan.stall) else len(plan.tokens)
        for index, token in enumerate(plan.tokens[:limit]):
            if interval:
                delay = started + index * interval - loop.time()
                if delay > 0.0005:
                    await asyncio.sleep(delay)
            elif index % 256 == 255:
                await asyncio.sleep(0)
            emit(index, token)
            entry["tokens_sent"] = index + 1
            await conn.drain()
        if plan.cut:
            conn.transport.abort()
            return "cut"
        if plan.stall:
            await conn.wait_gone()
            entry["disconnected"] = True
            return "stalled"
        if plan.midstream:
            return "midstream_error"
        return None

    # --- Ollama -----------------------------------------------------------------------------------
    async def _ollama(self, conn: _Conn, entry: SimRequest) -> str:
        body = entry["body"]
        if not isinstance(body, dict) or not body:
            return self._ollama_error(conn, entry, 400, "missing request body")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return self._ollama_error(conn, entry, 400, "model is required")
        generate = entry["path"] == "/api/generate"
        if generate:
            messages = [{"role": "user", "content": str(body.get("prompt", ""))}]
            if body.get("system"):
                messages.insert(0, {"role": "system", "content": str(body["system"])})
        else:
            messages = body.get("messages") or []
            if not isinstance(messages, list):
                return self._ollama_error(conn, entry, 400, "messages must be a list")
        options = body.get("options") or {}
        plan = self._plan(model, messages, options.get("num_predict") if isinstance(options, dict) else None)
        if plan.status == 404:
            return self._ollama_error(conn, entry, 404, f"model '{model}' not found")
        if plan.status:
            return self._ollama_error(conn, entry, plan.status, _OLLAMA_MESSAGES.get(plan.status, "simulated error"))
        name = model if ":" in model else f"{model}:latest"
        if plan.stall_first:
            await conn.wait_gone()
            entry["disconnected"] = True
            return "stalled"
        start_ns = time.perf_counter_ns()
        jmodel = _go_json(name)
        if body.get("stream", True) is False:
            await self._generate_whole(plan)
            text = "".join(plan.tokens)
            final = self._ollama_final(plan, name, start_ns, text, generate)
            self._send_json(conn, 200, final)
            entry["status"] = 200
            entry["tokens_sent"] = len(plan.tokens)
            return "complete"
        conn.head(
            200,
            [("Content-Type", "application/x-ndjson"), ("Date", _http_date()), ("Transfer-Encoding", "chunked")],
        )
        entry["status"] = 200
        if generate:

            def emit(_index: int, token: str) -> None:
                conn.chunk(
                    f'{{"model":{jmodel},"created_at":"{_go_time()}","response":{_go_json(token)},"done":false}}\n'.encode()
                )

        else:

            def emit(_index: int, token: str) -> None:
                conn.chunk(
                    f'{{"model":{jmodel},"created_at":"{_go_time()}","message":{{"role":"assistant","content":{_go_json(token)}}},"done":false}}\n'.encode()
                )

        fault = await self._pace(conn, plan, entry, emit)
        if fault in ("cut", "stalled"):
            return fault
        if fault == "midstream_error":
            conn.chunk(b'{"error":"an error was encountered while running the model"}\n')
            conn.end_chunks()
            return fault
        conn.chunk((_go_json(self._ollama_final(plan, name, start_ns, "", generate)) + "\n").encode())
        conn.end_chunks()
        return "complete"

    @staticmethod
    def _ollama_final(plan: Plan, name: str, start_ns: int, text: str, generate: bool) -> dict:
        total = max(time.perf_counter_ns() - start_ns, 1)
        final: dict[str, Any] = {"model": name, "created_at": _go_time()}
        if generate:
            final["response"] = text
        else:
            final["message"] = {"role": "assistant", "content": text}
        final["done_reason"] = plan.stop_reason
        final["done"] = True
        final["total_duration"] = total
        final["load_duration"] = 1334875
        final["prompt_eval_count"] = plan.prompt_tokens
        final["prompt_eval_duration"] = total // 10 or 1
        final["eval_count"] = len(plan.tokens)
        final["eval_duration"] = total - total // 10 or 1
        return final

    def _ollama_error(self, conn: _Conn, entry: SimRequest, status: int, message: str) -> str:
        self._send_json(conn, status, {"error": message})
        entry["status"] = status
        return "error"

    # --- OpenAI -------------------------------------------------------------------------------------
    async def _openai(self, conn: _Conn, entry: SimRequest) -> str:
        headers = entry["headers"]
        body = entry["body"]
        if not headers.get("authorization", "").startswith("Bearer ") or len(headers["authorization"]) <= 7:
            return self._openai_error(
                conn,
                entry,
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                "invalid_request_error",
                None,
            )
        if not isinstance(body, dict):
            return self._openai_error(
                conn,
                entry,
                400,
                "We could not parse the JSON body of your request.",
                "invalid_request_error",
                None,
            )
        model = body.get("model")
        messages = body.get("messages")
        if not isinstance(model, str) or not model:
            return self._openai_error(
                conn, entry, 400, "you must provide a model parameter", "invalid_request_error", None
            )
        if not isinstance(messages, list) or not messages:
            return self._openai_error(
                conn,
                entry,
                400,
                "[] is too short - 'messages'",
                "invalid_request_error",
                None,
                param="messages",
            )
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        plan = self._plan(model, messages, max_tokens)
        if plan.status == 404:
            return self._openai_error(
                conn,
                entry,
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                "invalid_request_error",
                "model_not_found",
            )
        if plan.status:
            message, etype, code = _OPENAI_ERRORS.get(
                plan.status, ("The server had an error while processing your request.", "api_error", None)
            )
            return self._openai_error(conn, entry, plan.status, message, etype, code)
        if plan.stall_first:
            await conn.wait_gone()
            entry["disconnected"] = True
            return "stalled"
        self._counter += 1
        digest = hashlib.sha256(f"{self.port}-{self._counter}".encode()).hexdigest()
        completion_id = "chatcmpl-" + _base62(int(digest[:40], 16))[:29]
        request_id = "req_" + digest[40:64]
        created = int(time.time())
        reported = OPENAI_SNAPSHOTS.get(model, model)
        completion = len(plan.tokens)
        usage = {
            "prompt_tokens": plan.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": plan.prompt_tokens + completion,
            "completion_tokens_details": {"reasoning_tokens": 0},
        }
        common = [("openai-version", "2020-10-01"), ("openai-processing-ms", "21"), ("x-request-id", request_id)]
        if not body.get("stream"):
            await self._generate_whole(plan)
            payload = {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": reported,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(plan.tokens), "refusal": None},
                        "logprobs": None,
                        "finish_reason": plan.stop_reason,
                    }
                ],
                "usage": usage,
                "system_fingerprint": "fp_5050236cbd",
            }
            self._send_json(conn, 200, payload, common)
            entry["status"] = 200
            entry["tokens_sent"] = completion
            return "complete"
        stream_options = body.get("stream_options") or {}
        include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        conn.head(
            200,
            [
                ("Date", _http_date()),
                ("Content-Type", "text/event-stream; charset=utf-8"),
                ("Transfer-Encoding", "chunked"),
                ("Cache-Control", "no-cache"),
                *common,
            ],
        )
        entry["status"] = 200
        prefix = (
            f'data: {{"id":"{completion_id}","object":"chat.completion.chunk","created":{created},'
            f'"model":{_compact(reported)},"system_fingerprint":"fp_5050236cbd","choices":'
        )
        conn.chunk(
            (
                prefix
                + '[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}]}\n\n'
            ).encode()
        )

        def emit(_index: int, token: str) -> None:
            conn.chunk(
                (
                    prefix
                    + f'[{{"index":0,"delta":{{"content":{_compact(token)}}},"logprobs":null,"finish_reason":null}}]}}\n\n'
                ).encode()
            )

        fault = await self._pace(conn, plan, entry, emit)
        if fault in ("cut", "stalled"):
            return fault
        if fault == "midstream_error":
            conn.chunk(
                b'data: {"error":{"message":"The server had an error while processing your request. Sorry about that!","type":"server_error","param":null,"code":null}}\n\n'
            )
            conn.end_chunks()
            return fault
        conn.chunk(
            (
                prefix + f'[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"{plan.stop_reason}"}}]}}\n\n'
            ).encode()
        )
        if include_usage:
            conn.chunk((prefix + f'[],"usage":{_compact(usage)}}}\n\n').encode())
        conn.chunk(b"data: [DONE]\n\n")
        conn.end_chunks()
        return "complete"

    def _openai_error(
        self,
        conn: _Conn,
        entry: SimRequest,
        status: int,
        message: str,
        etype: str,
        code: str | None,
        *,
        param: str | None = None,
    ) -> str:
        payload = {"error": {"message": message, "type": etype, "param": param, "code": code}}
        extra = [("x-request-id", "req_" + hashlib.sha256(message.encode()).hexdigest()[:24])]
        if status == 429:
            extra.append(("retry-after", "1"))
        self._send_json(conn, status, payload, extra)
        entry["status"] = status
        return "error"

    # --- Anthropic -------------------------------------------------------------------------------------
    async def _anthropic(self, conn: _Conn, entry: SimRequest) -> str:
        headers = entry["headers"]
        body = entry["body"]
        if not headers.get("x-api-key") and not headers.get("authorization"):
            return self._anthropic_error(conn, entry, 401, "authentication_error", "x-api-key header is required")
        if headers.get("x-api-key") and headers.get("authorization"):
            return self._anthropic_error(
                conn, entry, 401, "authentication_error", "send x-api-key or Authorization, not both"
            )
        if not headers.get("anthropic-version"):
            return self._anthropic_error(
                conn, entry, 400, "invalid_request_error", "anthropic-version: header is required"
            )
        if not isinstance(body, dict):
            return self._anthropic_error(conn, entry, 400, "invalid_request_error", "Request body is not valid JSON")
        model = body.get("model")
        messages = body.get("messages")
        if not isinstance(model, str) or not model:
            return self._anthropic_error(conn, entry, 400, "invalid_request_error", "model: Field required")
        if "max_tokens" not in body:
            return self._anthropic_error(conn, entry, 400, "invalid_request_error", "max_tokens: Field required")
        if not isinstance(messages, list) or not messages:
            return self._anthropic_error(
                conn, entry, 400, "invalid_request_error", "messages: at least one message is required"
            )
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
                role = message.get("role") if isinstance(message, dict) else None
                return self._anthropic_error(
                    conn,
                    entry,
                    400,
                    "invalid_request_error",
                    f"messages.{index}.role: Input should be 'user' or 'assistant' (got \"{role}\"; use the top-level system parameter for a system prompt)",
                )
        system = body.get("system") or ""
        plan = self._plan(model, messages, body.get("max_tokens"), _text_of(system))
        if plan.status == 404:
            return self._anthropic_error(conn, entry, 404, "not_found_error", f"model: {model}")
        if plan.status:
            etype, message = _ANTHROPIC_ERRORS.get(plan.status, ("api_error", "Internal server error"))
            return self._anthropic_error(conn, entry, plan.status, etype, message)
        if plan.stall_first:
            await conn.wait_gone()
            entry["disconnected"] = True
            return "stalled"
        self._counter += 1
        digest = hashlib.sha256(f"anthropic-{self.port}-{self._counter}".encode()).hexdigest()
        message_id = "msg_" + _base62(int(digest[:48], 16))[:24]
        request_id = "req_" + _base62(int(digest[48:], 16))[:24]
        stop_reason = "max_tokens" if plan.stop_reason == "length" else "end_turn"
        completion = len(plan.tokens)
        reported = ANTHROPIC_SNAPSHOTS.get(model, model)
        if not body.get("stream"):
            await self._generate_whole(plan)
            payload = {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": reported,
                "content": [{"type": "text", "text": "".join(plan.tokens)}],
                "stop_reason": stop_reason,
                "stop_sequence": None,
                "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": completion},
            }
            self._send_json(conn, 200, payload, [("request-id", request_id)])
            entry["status"] = 200
            entry["tokens_sent"] = completion
            return "complete"
        conn.head(
            200,
            [
                ("Date", _http_date()),
                ("Content-Type", "text/event-stream; charset=utf-8"),
                ("Transfer-Encoding", "chunked"),
                ("Cache-Control", "no-cache"),
                ("request-id", request_id),
            ],
        )
        entry["status"] = 200
        start = {
            "type": "message_start",
            "message": {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "content": [],
                "model": reported,
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": 1},
            },
        }
        conn.chunk(f"event: message_start\ndata: {_compact(start)}\n\n".encode())
        conn.chunk(
            b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
        )
        conn.chunk(b'event: ping\ndata: {"type": "ping"}\n\n')

        def emit(_index: int, token: str) -> None:
            conn.chunk(
                (
                    'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                    f'"delta":{{"type":"text_delta","text":{_compact(token)}}}}}\n\n'
                ).encode()
            )

        fault = await self._pace(conn, plan, entry, emit)
        if fault in ("cut", "stalled"):
            return fault
        if fault == "midstream_error":
            conn.chunk(
                b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}\n\n'
            )
            conn.end_chunks()
            return fault
        conn.chunk(b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n')
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": completion},
        }
        conn.chunk(f"event: message_delta\ndata: {_compact(delta)}\n\n".encode())
        conn.chunk(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
        conn.end_chunks()
        return "complete"

    def _anthropic_error(self, conn: _Conn, entry: SimRequest, status: int, etype: str, message: str) -> str:
        request_id = "req_" + _base62(int(hashlib.sha256(message.encode()).hexdigest()[:32], 16))[:24]
        payload = {"type": "error", "error": {"type": etype, "message": message}, "request_id": request_id}
        self._send_json(conn, status, payload, [("request-id", request_id)])
        entry["status"] = status
        return "error"


_OLLAMA_MESSAGES = {
    400: "invalid request",
    401: "unauthorized",
    403: "forbidden",
    429: "too many requests, please slow down",
    500: "the model failed to generate a response",
    502: "the cloud model could not be reached",
    503: "server busy, please try again.  maximum pending requests exceeded",
}
_OPENAI_ERRORS = {
    400: ("Invalid request (simulated).", "invalid_request_error", None),
    401: (
        "Incorrect API key provided: sk-sim***test. You can find your API key at https://platform.openai.com/account/api-keys.",
        "invalid_request_error",
        "invalid_api_key",
    ),
    403: (
        "Country, region, or territory not supported",
        "request_forbidden",
        "unsupported_country_region_territory",
    ),
    429: (
        "Rate limit reached for requests. Please try again in 1s.",
        "requests",
        "rate_limit_exceeded",
    ),
    500: ("The server had an error while processing your request. Sorry about that!", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}
_ANTHROPIC_ERRORS = {
    400: ("invalid_request_error", "Invalid request (simulated)."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low to access the Anthropic API."),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit."),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timed out"),
    529: ("overloaded_error", "Overloaded"),
}

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _base62(number: int) -> str:
    out = []
    while number:
        number, rest = divmod(number, 62)
        out.append(_ALPHABET[rest])
    return "".join(out) or "0"


def run_forever(host: str, port: int, tokens_per_second: float, announce=print) -> None:
    """Serve until interrupted (the management command's body); `announce` gets the address line."""

    async def main() -> None:
        simulator = ProviderSimulator(host, port, tokens_per_second)
        await simulator.start()
        rate = f"{tokens_per_second:g} tokens/s" if tokens_per_second > 0 else "unthrottled"
        announce(f"Provider simulator (development only, never bills) on {simulator.url} at {rate}")
        assert simulator._server is not None
        async with simulator._server:
            await simulator._server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
