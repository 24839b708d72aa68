"""pytest fixtures: a real provider simulator on loopback, and settings pointed at it.

Registered for the whole suite by `pytest_plugins = ["providers.testing"]` in the root
conftest. Use `use_simulator` in any test that chats; read `simulator.requests` to see what
the adapters sent (bodies and headers).
"""

from __future__ import annotations

import pytest

from providers.clients import reset_clients
from providers.simulator import ProviderSimulator

# Fast enough that no test waits on streaming, slow enough that a stream is still a stream.
TEST_TOKENS_PER_SECOND = 0  # 0 = as fast as the socket takes it


@pytest.fixture(scope="session")
def simulator():
    """A simulator on a free loopback port, in a background thread, for the whole test session."""
    sim = ProviderSimulator("127.0.0.1", 0, tokens_per_second=TEST_TOKENS_PER_SECOND).start_in_thread()
    try:
        yield sim
    finally:
        sim.stop_thread()


@pytest.fixture
def use_simulator(simulator, settings, monkeypatch, db):
    """Point Ollama, OpenAI and Anthropic at the simulator (with dummy keys) and load the prices."""
    from billing.pricing import load_price_list

    values = {
        "OLLAMA_HOST": simulator.ollama_url,
        "OPENAI_BASE_URL": simulator.openai_url,
        "OPENAI_API_KEY": "sk-simulator-test",
        "ANTHROPIC_BASE_URL": simulator.anthropic_url,
        "ANTHROPIC_API_KEY": "sk-ant-simulator-test",
    }
    for name, value in values.items():
        setattr(settings, name, value)
        monkeypatch.setenv(name, value)  # for subprocesses (manage.py commands run by tests)
    settings.PROVIDER_RETRY_BACKOFF = 0.01
    reset_clients()
    load_price_list()
    simulator.clear_requests()
    yield simulator
    reset_clients()
