"""Budgets at the gateway: each protocol refuses a paid model in its own error shape; Ollama still answers."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest
from django.utils import timezone

from billing import budgets
from billing.models import ClientBudget
from sessions_app.models import ApiToken
from sessions_app.tests.test_gateway import gateway_url, reads_never_lock_the_server_out  # noqa: F401  (fixtures)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def spent(owner, client_acme, use_simulator):
    """Acme's budget for this month is 0: every paid call is over it."""
    ClientBudget.objects.create(client=client_acme, month=budgets.month_of(timezone.now()), llm_limit=Decimal("0"))
    return ApiToken.issue(user=owner, client=client_acme, name="Editor")[1]


def test_openai_protocol_answers_402_insufficient_quota(gateway_url, spent):  # noqa: F811
    response = httpx.post(
        f"{gateway_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {spent}"},
        json={"model": "openai:gpt-4o", "messages": [{"role": "user", "content": "Hi"}]},
        timeout=30,
    )
    assert response.status_code == 402
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "budget_exceeded")
    assert "paid models are paused" in error["message"]


def test_ollama_protocol_answers_402_with_its_error_string_and_local_models_still_work(gateway_url, spent):  # noqa: F811
    headers = {"Authorization": f"Bearer {spent}"}
    refused = httpx.post(
        f"{gateway_url}/api/chat",
        headers=headers,
        json={"model": "anthropic:claude-sonnet-4", "messages": [{"role": "user", "content": "Hi"}], "stream": False},
        timeout=30,
    )
    assert refused.status_code == 402
    assert set(refused.json()) == {"error"} and "paid models are paused" in refused.json()["error"]
    local = httpx.post(
        f"{gateway_url}/api/chat",
        headers=headers,
        json={"model": "llama3.2", "messages": [{"role": "user", "content": "Hi"}], "stream": False},
        timeout=30,
    )
    assert local.status_code == 200 and local.json()["message"]["content"]
