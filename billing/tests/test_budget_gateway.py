"""Budgets at the gateway: each protocol refuses a paid model in its own error shape; Ollama still answers."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from django.utils import timezone

from billing import budgets
from billing.models import ClientBudget
from sessions_app.models import ApiToken


@pytest.fixture
def spent(owner, client_acme, use_simulator):
    """Acme's budget for this month is 0: every paid call is over it."""
    ClientBudget.objects.create(client=client_acme, month=budgets.month_of(timezone.now()), llm_limit=Decimal("0"))
    return ApiToken.issue(user=owner, client=client_acme, name="Editor")[1]


def post(client, path: str, token: str, body: dict):
    return client.post(path, json.dumps(body), content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {token}")


def test_openai_protocol_answers_402_insufficient_quota(client, spent):
    response = post(
        client,
        "/v1/chat/completions",
        spent,
        {"model": "openai:gpt-4o", "messages": [{"role": "user", "content": "Hi"}]},
    )
    assert response.status_code == 402
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "budget_exceeded")
    assert "paid models are paused" in error["message"]


def test_ollama_protocol_answers_402_with_its_error_string_and_local_models_still_work(client, spent):
    refused = post(
        client,
        "/api/chat",
        spent,
        {"model": "anthropic:claude-sonnet-4", "messages": [{"role": "user", "content": "Hi"}], "stream": False},
    )
    assert refused.status_code == 402
    assert set(refused.json()) == {"error"} and "paid models are paused" in refused.json()["error"]
    local = post(
        client,
        "/api/chat",
        spent,
        {"model": "llama3.2", "messages": [{"role": "user", "content": "Hi"}], "stream": False},
    )
    assert local.status_code == 200 and local.json()["message"]["content"]
