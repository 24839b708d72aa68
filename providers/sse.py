"""A line splitter and a server-sent events reader (WHATWG framing) over raw bytes.

The SDKs build a typed object per event, which costs more per token than the whole rest of
the path; the adapters use the SDK for the request (auth, base URL, headers, error statuses)
and read the event stream with this instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator


async def iter_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Split a byte stream into lines (LF or CRLF). Splitting bytes at newlines never cuts a
    UTF-8 character, so decoding each whole line is safe; it is also much cheaper than
    decoding the stream incrementally and splitting text."""
    pending = b""
    async for chunk in chunks:
        if pending:
            chunk = pending + chunk
        lines = chunk.split(b"\n")
        pending = lines.pop()
        for line in lines:
            yield line[:-1] if line[-1:] == b"\r" else line
    if pending:
        yield pending


async def iter_events(lines: AsyncIterator[bytes]) -> AsyncIterator[tuple[str, str]]:
    """Yield `(event, data)` per event: `:` comments skipped, `data:` lines joined with a newline,
    dispatched on a blank line. A last event with no blank line after it is dispatched too."""
    event = ""
    data: list[str] = []
    async for raw in lines:
        line = raw.decode("utf-8", "replace")
        if not line:
            if data:
                yield event or "message", "\n".join(data)
            event = ""
            data = []
            continue
        if line[0] == ":":
            continue
        name, _, value = line.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
    if data:
        yield event or "message", "\n".join(data)
