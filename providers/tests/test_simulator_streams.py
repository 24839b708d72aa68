"""Each adapter, through the router, against the provider simulator over loopback."""

from __future__ import annotations

import pytest

from providers.base import Usage
from providers.router import stream_chat

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is a ledger?"},
    {"role": "assistant", "content": "A book of accounts."},
    {"role": "user", "content": "And a journal?"},
]
MODELS = ["ollama:llama3.2", "openai:gpt-4o", "anthropic:claude-sonnet-4"]


async def collect(model, messages=CHAT, options=None):
    texts, usages = [], []
    async for item in stream_chat(model, messages, options):
        (usages if isinstance(item, Usage) else texts).append(item)
    return "".join(texts), usages


@pytest.mark.parametrize("model", MODELS)
async def test_each_provider_streams_the_answer_then_exactly_one_provider_usage(use_simulator, model):
    text, usages = await collect(model)
    assert text.startswith('Simulated answer to "And a journal?"')
    assert len(usages) == 1
    usage = usages[0]
    assert usage.source == "provider"
    assert usage.completion_tokens == len(text.split())
    assert usage.prompt_tokens > 0
