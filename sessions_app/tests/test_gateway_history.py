"""Recognizing the conversation a gateway call continues (pure functions, no database)."""

from __future__ import annotations

from providers.base import ChatMessage
from sessions_app.gateway.joining import Stored, match_history, same_model


def msg(role: str, content: str) -> ChatMessage:
    return ChatMessage(role=role, content=content)


def test_history_that_repeats_the_stored_turns_extends_them():
    turns = [Stored(1, "user", "hi"), Stored(2, "assistant", "hello ")]
    match = match_history(turns, [msg("user", "hi"), msg("assistant", "hello"), msg("user", "more")])
    assert match.complete and match.matched == 2 and match.last_seq == 2 and match.next_index == 2


def test_history_that_edits_a_stored_turn_matches_only_up_to_the_edit():
    turns = [
        Stored(1, "user", "hi"),
        Stored(2, "assistant", "hello"),
        Stored(3, "user", "a"),
        Stored(4, "assistant", "b"),
    ]
    match = match_history(turns, [msg("user", "hi"), msg("assistant", "hello"), msg("user", "edited")])
    assert not match.complete and match.matched == 2 and match.last_seq == 2 and match.next_index == 2


def test_stored_summaries_and_client_system_messages_do_not_break_the_prefix():
    turns = [Stored(1, "user", "hi"), Stored(2, "system", "summary of older turns"), Stored(3, "assistant", "yo")]
    match = match_history(turns, [msg("user", "hi"), msg("system", "be brief"), msg("assistant", "yo")])
    assert match.complete and match.last_seq == 3 and match.next_index == 3


def test_bare_ollama_names_and_latest_tags_are_the_same_model():
    assert same_model("ollama:llama3.2", "ollama:llama3.2:latest")
    assert not same_model("ollama:llama3.2", "ollama:qwen2.5:7b")
    assert not same_model("openai:gpt-4o", "openai:gpt-4o:latest")
