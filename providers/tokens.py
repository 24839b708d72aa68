"""Token estimates, used only when a provider reports no counts (and marked `estimated`)."""

from __future__ import annotations

from collections.abc import Iterable

from providers.base import ChatMessage

PER_MESSAGE = 4  # role and separators, as chat templates add them
PER_REPLY = 3  # the assistant turn the model is primed with


def estimate_tokens(text: str) -> int:
    """Roughly one token per four ASCII characters, and one per non-ASCII character."""
    if not text:
        return 0
    # Counted in C: encoding to ASCII with errors ignored keeps exactly the ASCII characters.
    ascii_chars = len(text) if text.isascii() else len(text.encode("ascii", "ignore"))
    other = len(text) - ascii_chars
    return max(1, -(-ascii_chars // 4) + other)


def estimate_messages(messages: Iterable[ChatMessage]) -> int:
    """Estimated prompt size of a chat: every message's content plus its framing."""
    total = PER_REPLY
    for message in messages:
        total += PER_MESSAGE + estimate_tokens(message.get("content") or "")
    return total
