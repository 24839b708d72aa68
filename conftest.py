"""Persona fixtures shared by every app: an owner, a colleague, an outsider, staff."""

from __future__ import annotations

import pytest

from billing.pricing import load_price_list
from providers.clients import reset_clients
from tests.factories import BrandFactory, ClientFactory, UserFactory

pytest_plugins = ["providers.testing"]


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
