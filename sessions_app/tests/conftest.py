"""Helpers for the session-engine tests: drive `session_chat` from sync tests, check invariants."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync

from sessions_app import services
from sessions_app.events import Done, Token
from sessions_app.invariants import check_session
from sessions_app.models import ChatSession


def run_chat(session, user, message, *, stop_after=None, on_token=None, options=None):
    """Run one turn to the end (or close it after `stop_after` tokens); return (texts, done)."""

    async def go():
        texts: list[str] = []
        done = None
        events = services.session_chat(session_id=session.pk, user=user, message=message, options=options)
        try:
            async for event in events:
                if isinstance(event, Token):
                    texts.append(event.text)
                    if on_token is not None:
                        await on_token(len(texts))
                    if stop_after is not None and len(texts) >= stop_after:
                        break
                elif isinstance(event, Done):
                    done = event
        finally:
            await events.aclose()
        return texts, done

    # async_to_sync from the test thread: the ORM work of the service runs on this thread, inside
    # the test's transaction.
    return async_to_sync(go)()


@pytest.fixture
def chat():
    return run_chat


@pytest.fixture
def sound_sessions(db):
    """After the test: every session satisfies docs/DESIGN.md's five invariants and its hash chain."""
    yield
    problems = {str(s.pk): check_session(s) for s in ChatSession.objects.all()}
    assert {k: v for k, v in problems.items() if v} == {}
