"""What a provider call carries: the system prompt plus the history that fits the target's window.

`build_context` never drops anything silently: the plan lists the messages left out
(`omitted`) and those a stored summary stands in for (`summarized`); the chat turn records
the count on the assistant message and a switch on its `ContextStream`.

Overflow policy (`settings.CONTEXT_OVERFLOW`):
- `truncate`: keep the newest messages that fit, leave out the oldest.
- `summarize`: call the handler registered with `register_overflow_handler("summarize", fn)`.
  The handler receives the truncated plan and returns a new plan (for example with a summary
  of `plan.omitted` as a `system` message). A summary it stores as a `system` message in the
  session (through `services.session_append_history`) is picked up by every later call:
  history starts at the newest stored `system` message, the messages before it count as
  `summarized`, not omitted. With no handler registered, `summarize` falls back to
  `truncate` and says so in `plan.notes`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from django.conf import settings

from providers import router, tokens
from providers.base import ChatMessage
from providers.naming import ModelRef

# Room left for the answer: an eighth of the window, at least 256 and at most 4096 tokens.
MIN_REPLY_RESERVE = 256
MAX_REPLY_RESERVE = 4096


@dataclass
class ContextEntry:
    seq: int
    role: str
    content: str
    model: str
    client_id: str
    tokens: int


@dataclass
class ContextPlan:
    """The messages to send, and what did not make it."""

    target: ModelRef
    window: int
    budget: int
    system_prompt: str
    entries: list[ContextEntry]  # history that is sent, oldest first
    omitted: list[int] = field(default_factory=list)  # seqs left out to fit the window
    summarized: list[int] = field(default_factory=list)  # seqs a stored summary stands in for
    extra_system: list[str] = field(default_factory=list)  # e.g. a summary an overflow handler made
    notes: list[str] = field(default_factory=list)

    @property
    def messages(self) -> list[ChatMessage]:
        out: list[ChatMessage] = []
        if self.system_prompt:
            out.append({"role": "system", "content": self.system_prompt})
        out.extend({"role": "system", "content": text} for text in self.extra_system)
        out.extend({"role": entry.role, "content": entry.content} for entry in self.entries)
        return out

    @property
    def seqs(self) -> list[int]:
        return [entry.seq for entry in self.entries]

    @property
    def omitted_count(self) -> int:
        return len(self.omitted)

    @property
    def history_tokens(self) -> int:
        return sum(entry.tokens for entry in self.entries)

    @property
    def estimated_tokens(self) -> int:
        return tokens.estimate_messages(self.messages)


OverflowHandler = Callable[..., ContextPlan]
_OVERFLOW_HANDLERS: dict[str, OverflowHandler] = {}


def register_overflow_handler(name: str, handler: OverflowHandler) -> None:
    """Plug in an overflow policy: `handler(*, session, target, plan) -> ContextPlan`."""
    _OVERFLOW_HANDLERS[name] = handler


def reply_reserve(window: int) -> int:
    return max(MIN_REPLY_RESERVE, min(MAX_REPLY_RESERVE, window // 8))


def newest_that_fit(entries: list[ContextEntry], budget: int) -> list[ContextEntry]:
    """The newest entries whose tokens fit in `budget`, in order; the newest is always kept
    (it is what the consultant just asked)."""
    kept: list[ContextEntry] = []
    used = 0
    for index, entry in enumerate(reversed(entries)):
        if index > 0 and used + entry.tokens > budget:
            break
        kept.append(entry)
        used += entry.tokens
    kept.reverse()
    return kept


def build_context(*, session, target: ModelRef, rows: list[tuple] | None = None) -> ContextPlan:
    """Plan the messages for a call to `target`: system prompt always, newest history that fits.

    `rows` are the session's messages as (seq, role, content, model, domain_id, status) in seq
    order, for a caller that has just read them (a chat turn passes None for domain_id: only a
    switch's snapshot names the clients); by default they are read here.
    """
    window = router.context_window(target)
    system_cost = (
        tokens.estimate_messages([{"role": "system", "content": session.system_prompt}]) if session.system_prompt else 0
    )
    budget = max(0, window - reply_reserve(window) - system_cost)

    if rows is None:
        rows = list(
            session.messages.order_by("seq").values_list("seq", "role", "content", "model", "domain_id", "status")
        )
    # A stored system message (a summary of older history) stands in for everything before it.
    summarized: list[int] = []
    last_system = max((i for i, row in enumerate(rows) if row[1] == "system"), default=None)
    if last_system is not None:
        summarized = [row[0] for row in rows[:last_system]]
        rows = rows[last_system:]

    candidates = [
        ContextEntry(
            seq=seq,
            role=role,
            content=content,
            model=model,
            client_id=str(domain_id) if domain_id is not None else "",
            tokens=tokens.estimate_messages([{"role": role, "content": content}]),
        )
        for seq, role, content, model, domain_id, _status in rows
        # An answer that failed before any text arrived has nothing to carry.
        if content.strip()
    ]
    kept = newest_that_fit(candidates, budget)
    kept_seqs = {entry.seq for entry in kept}
    omitted = [entry.seq for entry in candidates if entry.seq not in kept_seqs]

    plan = ContextPlan(
        target=target,
        window=window,
        budget=budget,
        system_prompt=session.system_prompt,
        entries=kept,
        omitted=omitted,
        summarized=summarized,
    )
    if omitted:
        plan.notes.append(f"{len(omitted)} older message(s) left out to fit {target.name}'s window of {window} tokens")
        if settings.CONTEXT_OVERFLOW == "summarize":
            handler = _OVERFLOW_HANDLERS.get("summarize")
            if handler is None:
                plan.notes.append("CONTEXT_OVERFLOW=summarize but no summarizer is installed; truncated instead")
            else:
                plan = handler(session=session, target=target, plan=plan)
    return plan
