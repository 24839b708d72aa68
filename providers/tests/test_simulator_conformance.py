"""The official clients (ollama, openai, anthropic) read the simulator's streams as the real thing."""

from __future__ import annotations

import anthropic
import ollama
import openai
import pytest

HI = [{"role": "user", "content": "hi"}]
ANSWER = 'Simulated answer to "hi" with 0 earlier messages in context.'


async def test_the_ollama_client_streams_lists_and_sees_both_error_kinds(simulator):
    client = ollama.AsyncClient(host=simulator.url)
    parts = [part async for part in await client.chat(model="llama3.2", messages=HI, stream=True)]
    assert "".join(p.message.content for p in parts) == ANSWER
    assert parts[-1].done and parts[-1].eval_count == len(ANSWER.split()) and parts[-1].done_reason == "stop"
    assert "llama3.2:latest" in [m.model for m in (await client.list()).models]
    with pytest.raises(ollama.ResponseError) as missing:
        await client.chat(model="sim-missing", messages=HI)
    assert missing.value.status_code == 404 and "not found" in missing.value.error
    with pytest.raises(ollama.ResponseError) as broken:
        async for _part in await client.chat(model="sim-fault-midstream", messages=HI, stream=True):
            pass
    assert broken.value.status_code == -1  # the mid-stream error line, status stays 200


async def test_the_openai_client_reads_the_stream_and_its_usage_chunk(simulator):
    client = openai.AsyncOpenAI(api_key="k", base_url=simulator.openai_url, max_retries=0)
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=HI, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ANSWER.split())
    assert chunks[0].id.startswith("chatcmpl-") and chunks[0].model == "gpt-4o-2024-08-06"
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-4o-fault-status-429", messages=HI, stream=True)
    with pytest.raises(openai.APIError, match="Sorry about that"):
        async for _chunk in await client.chat.completions.create(
            model="gpt-4o-fault-midstream", messages=HI, stream=True
        ):
            pass
    await client.close()


async def test_the_anthropic_client_assembles_the_message_and_raises_the_error_event(simulator):
    client = anthropic.AsyncAnthropic(api_key="k", base_url=simulator.anthropic_url, max_retries=0)
    async with client.messages.stream(model="claude-sonnet-4-20250514", max_tokens=50, messages=HI) as stream:
        message = await stream.get_final_message()
    assert message.content[0].text == ANSWER
    assert message.usage.output_tokens == len(ANSWER.split()) and message.stop_reason == "end_turn"
    assert message.id.startswith("msg_")
    with pytest.raises(anthropic.APIStatusError) as overloaded:
        await client.messages.create(model="claude-fault-status-529", max_tokens=5, messages=HI)
    assert overloaded.value.status_code == 529
    with pytest.raises(anthropic.APIStatusError) as midstream:
        async for _event in await client.messages.create(
            model="claude-fault-midstream", max_tokens=50, messages=HI, stream=True
        ):
            pass
    assert midstream.value.type == "overloaded_error"
    await client.close()
