"""A server-sent events reader (WHATWG framing) over decoded lines.

The SDKs build a typed object per event, which costs more per token than the whole rest of
the path; the adapters use the SDK for the request (auth, base URL, headers, error statuses)
and read the event stream with this instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator


async def iter_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """Yield `(event, data)` per event: `:` comments skipped, `data:` lines joined with a newline,
    dispatched on a blank line. A last event with no blank line after it is dispatched too."""
    event = ""
    data: list[str] = []
    async for line in lines:
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
