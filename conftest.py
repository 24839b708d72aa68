"""Persona fixtures shared by every app: an owner, a colleague, an outsider, staff."""

from __future__ import annotations

import pytest
from channels.layers import channel_layers

from billing.pricing import load_price_list
from providers.clients import reset_clients
from tests.factories import BrandFactory, ClientFactory, UserFactory

pytest_plugins = ["providers.testing"]


@pytest.fixture(autouse=True)
def in_memory_channel_layer(settings):
    """In-process tests use the in-memory channel layer, whatever REDIS_URL says.

    They drive consumers on pytest's event loop, which is torn down after each test by
    cancelling every task left on it; a channels_redis receive cancelled that way has been seen
    never to finish, hanging the run (a test of the PostgreSQL and Redis pass once waited there
    for ten minutes). Fan-out through a real Redis is exercised by the tests that run daphne
    processes with REDIS_URL; a test that wants another layer sets its own.
    """
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    channel_layers.backends.clear()


@pytest.fixture(autouse=True)
def gateway_remembers_nothing_yet():
    """Each test starts with no gateway conversation remembered (`joining.Remembered`): ids recur."""
    from sessions_app.gateway.joining import remembered

    remembered.clear()


@pytest.fixture
def owner(db):
    return UserFactory(username="olivia")


@pytest.fixture
def colleague(db):
    return UserFactory(username="colin")


@pytest.fixture
def outsider(db):
    return UserFactory(username="oscar")


@pytest.fixture
def staff(db):
    return UserFactory(username="stella", is_staff=True, is_superuser=True)


@pytest.fixture
def client_acme(db):
    client = ClientFactory(name="Acme Corp", slug="acme", hourly_rate="150.00")
    BrandFactory(client=client, name="Acme", primary_color="#0b7285")
    return client


@pytest.fixture
def client_globex(db):
    client = ClientFactory(name="Globex", slug="globex", hourly_rate="200.00", billing_increment_minutes=15)
    BrandFactory(client=client, name="Globex", primary_color="#c92a2a")
    return client


@pytest.fixture
def owner_client(client, owner):
    """Django's test client signed in as the owner."""
    client.force_login(owner)
    return client


@pytest.fixture
def staff_client(client, staff):
    client.force_login(staff)
    return client


@pytest.fixture
def use_simulator(simulator, settings, monkeypatch, db):
    """Point Ollama, OpenAI and Anthropic at the simulator (with dummy keys) and load the prices."""
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
