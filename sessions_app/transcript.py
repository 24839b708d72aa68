"""A session's transcript for people: Markdown or JSON, under a file name that says what it is.

Unlike the export document (`transfer`), a transcript is for reading and sharing, not for
re-importing: who typed each message, the answers with their model, tokens and cost, the
switches between clients and models, in the viewer's time zone.
"""

from __future__ import annotations

import re
from datetime import datetime

from django.utils import timezone
from django.utils.text import slugify

from billing.money import format_cost
from sessions_app import selectors
from sessions_app.archive import stored_messages
from sessions_app.models import ChatSession, SessionMessage
from sessions_app.templatetags.session_tags import format_duration

FORMAT_NAME = "billable-sessions/transcript"
FORMAT_VERSION = 1
FORMATS = ("markdown", "json")
BAD_FORMAT = "'format' must be markdown or json."
FILENAME_STEM_LIMIT = 80


def transcript_filename(session: ChatSession, extension: str) -> str:
    """`<client>-<session name>-<YYYY-MM-DD>.<ext>`: lower-case ASCII letters, digits and dashes only."""
    day = timezone.localtime(session.started_at).date().isoformat()
    name = slugify(session.name) or f"session-{str(session.session_id)[:8]}"
    stem = "-".join(part for part in (slugify(session.domain.slug), name) if part)[:FILENAME_STEM_LIMIT].strip("-")
    return f"{stem}-{day}.{extension}"


def _messages(session: ChatSession) -> list[SessionMessage]:
    return stored_messages(session, related=("domain", "author"))


def transcript_json(*, session: ChatSession) -> dict:
    """The summary (with participants) and every message with who typed it."""
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "exported_at": timezone.now().isoformat(),
        "session": selectors.session_summary(session=session),
        "messages": [selectors.message_as_dict(m) for m in _messages(session)],
    }


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text or "").strip()


def _when(value: datetime | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return timezone.localtime(value).strftime(fmt) if value else "—"


def _usd(value) -> str:
    return format_cost(value, "USD")


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in text.splitlines()) or ">"


def transcript_markdown(*, session: ChatSession) -> str:
    """The conversation as Markdown: a header of facts, then each message (and switch) in order."""
    summary = selectors.session_summary(session=session)
    messages = _messages(session)
    zone = timezone.get_current_timezone_name()
    lines = [f"# {_one_line(str(session))}", ""]
    facts = [
        f"Client: {session.domain.name} (`{session.domain.slug}`)",
        f"Model: `{session.current_model}`",
        f"Started: {_when(session.started_at)} ({zone})",
    ]
    if session.ended_at:
        facts.append(f"Ended: {_when(session.ended_at)} · duration {format_duration(session.duration_seconds)}")
    else:
        facts.append("Still running")
    facts.append(
        f"Messages: {summary['total_messages']} · tokens: {summary['total_tokens']:,} · "
        f"LLM cost: {_usd(summary['total_cost_usd'])}"
    )
    people = [f"{p['name']} ({p['role']}{', left' if p['revoked_at'] else ''})" for p in summary["participants"]]
    facts.append(f"People: {', '.join(people)}")
    if len(summary["by_client"]) > 1:
        split = ", ".join(
            f"{row['client']} {format_duration(row['seconds'])} {_usd(row['cost_usd'])}" for row in summary["by_client"]
        )
        facts.append(f"Billed to: {split}")
    if session.parent_id:
        facts.append(f"Branch of session `{session.parent_id}` at message #{session.branched_at_seq}")
    if session.continued_from_id:
        facts.append(f"Continues session `{session.continued_from_id}`")
    lines += [f"- {fact}" for fact in facts]
    if session.system_prompt:
        lines += ["", "**System prompt**", "", _quote(session.system_prompt)]

    streams = list(session.context_streams.select_related("source_domain", "target_domain").order_by("streamed_at"))
    events = sorted(
        [(m.timestamp, 1, m) for m in messages] + [(s.streamed_at, 0, s) for s in streams],
        key=lambda item: (item[0], item[1], getattr(item[2], "seq", 0)),
    )
    owner = session.user.get_username()
    for _when_at, kind, item in events:
        lines += ["", "---", ""]
        if kind == 0:
            note = f" — {_one_line(item.note)}" if item.note else ""
            lines.append(
                f"*{_when(item.streamed_at, '%H:%M:%S')} · switched from {item.source_domain.name} · "
                f"`{item.source_model}` to {item.target_domain.name} · `{item.target_model}`{note}*"
            )
            continue
        lines.append(_message_heading(item, owner))
        lines.append("")
        lines.append(item.content or "*(no text)*")
        if item.error_text:
            lines += ["", f"*{_one_line(item.error_text)}*"]
    lines.append("")
    return "\n".join(lines)


def _message_heading(message: SessionMessage, owner: str) -> str:
    at = _when(message.timestamp, "%H:%M:%S")
    if message.role == "user":
        who = selectors.author_name(message) or owner
        return f"### {who} · {at}"
    if message.role == "system":
        return f"### Summary of earlier messages · {at}"
    status = {"partial": " · stopped early, partial answer", "error": " · failed"}.get(message.status, "")
    copied = " · copied, not billed again" if message.copied_from_id or message.is_imported else ""
    return (
        f"### {message.model or 'assistant'} · {at} · {message.tokens:,} tokens · "
        f"{_usd(message.cost_usd)}{status}{copied}"
    )
