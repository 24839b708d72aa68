"""Cost math: the price in force at the call's time, exact or longest prefix, never a silent 0."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.core.management import call_command

from billing.models import ModelAlias, ModelPrice
from billing.pricing import cost_of, from_litellm, input_cost, known_context_window, load_price_list, price_for
from tests.factories import PriceFactory

T0 = datetime(2025, 1, 1, tzinfo=UTC)


@pytest.fixture
def prices(db):
    return {
        "gpt-4o": PriceFactory(model="gpt-4o", input_per_mtok="2.50", output_per_mtok="10.00", effective_from=T0),
        "gpt-4o-2024-05-13": PriceFactory(
            model="gpt-4o-2024-05-13", input_per_mtok="5.00", output_per_mtok="15.00", effective_from=T0
        ),
        "gpt-4o-mini": PriceFactory(
            model="gpt-4o-mini", input_per_mtok="0.15", output_per_mtok="0.60", effective_from=T0
        ),
        "gpt-4": PriceFactory(model="gpt-4", input_per_mtok="30.00", output_per_mtok="60.00", effective_from=T0),
    }


def test_an_exact_match_wins_over_a_prefix(prices):
    assert price_for("openai", "gpt-4o-2024-05-13", T0 + timedelta(days=1)) == prices["gpt-4o-2024-05-13"]


def test_a_dated_snapshot_takes_the_longest_priced_prefix(prices):
    at = T0 + timedelta(days=1)
    assert price_for("openai", "gpt-4o-2024-08-06", at) == prices["gpt-4o"]
    assert price_for("openai", "gpt-4o-mini-2024-07-18", at) == prices["gpt-4o-mini"]
    assert price_for("openai", "gpt-4-0613", at) == prices["gpt-4"]


def test_a_prefix_must_end_at_a_separator_so_gpt_4_never_prices_gpt_4o(db):
    gpt4 = PriceFactory(model="gpt-4", input_per_mtok="30.00", output_per_mtok="60.00", effective_from=T0)
    assert price_for("openai", "gpt-4o", T0 + timedelta(days=1)) is None
    assert price_for("openai", "gpt-4-turbo-preview", T0 + timedelta(days=1)) == gpt4


def test_the_price_in_force_at_the_call_time_is_used(db):
    old = PriceFactory(
        model="claude-opus-4", provider="anthropic", input_per_mtok="15", output_per_mtok="75", effective_from=T0
    )
    new = PriceFactory(
        model="claude-opus-4",
        provider="anthropic",
        input_per_mtok="5",
        output_per_mtok="25",
        effective_from=T0 + timedelta(days=30),
    )
    assert price_for("anthropic", "claude-opus-4", T0 + timedelta(days=29, hours=23)) == old
    assert price_for("anthropic", "claude-opus-4", T0 + timedelta(days=30)) == new
    assert price_for("anthropic", "claude-opus-4", T0 - timedelta(seconds=1)) is None


def test_cost_is_exact_decimal_per_million_tokens(prices):
    cost = cost_of(provider="openai", model_id="gpt-4o-2024-08-06", prompt_tokens=1234, completion_tokens=567, at=T0)
    # 1234 * 2.50 / 1e6 + 567 * 10 / 1e6 = 0.003085 + 0.00567
    assert cost == Decimal("0.008755")
    assert isinstance(cost, Decimal)


def test_cost_rounds_half_up_to_six_decimals(prices):
    # 1 prompt token of gpt-4o-mini: 0.00000015 → 0.000000; 7 tokens: 0.00000105 → 0.000001
    assert cost_of(provider="openai", model_id="gpt-4o-mini", prompt_tokens=1, completion_tokens=0, at=T0) == Decimal(
        "0.000000"
    )
    assert cost_of(provider="openai", model_id="gpt-4o-mini", prompt_tokens=7, completion_tokens=0, at=T0) == Decimal(
        "0.000001"
    )
    assert cost_of(provider="openai", model_id="gpt-4o-mini", prompt_tokens=10, completion_tokens=0, at=T0) == Decimal(
        "0.000002"
    )


def test_a_paid_model_without_a_price_has_an_unknown_cost_never_zero(prices):
    assert cost_of(provider="openai", model_id="o3-pro", prompt_tokens=10, completion_tokens=10, at=T0) is None
    assert input_cost(provider="anthropic", model_id="claude-sonnet-4-20250514", tokens=10, at=T0) is None
    assert price_for("anthropic", "claude-sonnet-4-20250514", T0) is None


def test_ollama_is_free_unless_a_price_row_says_otherwise(db):
    assert cost_of(
        provider="ollama", model_id="llama3.2:latest", prompt_tokens=5000, completion_tokens=900, at=T0
    ) == Decimal("0.000000")
    PriceFactory(provider="ollama", model="llama3.2", input_per_mtok="0.10", output_per_mtok="0.20", effective_from=T0)
    assert cost_of(
        provider="ollama", model_id="llama3.2:latest", prompt_tokens=1_000_000, completion_tokens=1_000_000, at=T0
    ) == Decimal("0.300000")


def test_input_cost_prices_only_input_tokens(prices):
    assert input_cost(provider="openai", model_id="gpt-4o", tokens=2000, at=T0) == Decimal("0.005000")


def test_load_prices_is_idempotent(db):
    call_command("load_prices", stdout=open("/dev/null", "w"))
    prices, aliases = ModelPrice.objects.count(), ModelAlias.objects.count()
    assert prices >= 10 and aliases >= 2
    assert load_price_list() == {"prices_created": 0, "prices_updated": 0, "aliases_created": 0, "aliases_updated": 0}
    assert (ModelPrice.objects.count(), ModelAlias.objects.count()) == (prices, aliases)


def test_bundled_prices_match_the_list_prices(db):
    load_price_list()
    now = datetime.now(UTC)
    expected = {
        ("openai", "gpt-4o"): ("2.50", "10.00"),
        ("openai", "gpt-4o-mini"): ("0.15", "0.60"),
        ("openai", "gpt-4.1"): ("2.00", "8.00"),
        ("openai", "gpt-4-turbo"): ("10.00", "30.00"),
        ("openai", "gpt-4"): ("30.00", "60.00"),
        ("anthropic", "claude-sonnet-4-20250514"): ("3.00", "15.00"),
        ("anthropic", "claude-opus-4-20250514"): ("15.00", "75.00"),
        ("anthropic", "claude-3-5-haiku-20241022"): ("0.80", "4.00"),
    }
    for (provider, model), (inp, out) in expected.items():
        price = price_for(provider, model, now)
        assert (price.input_per_mtok, price.output_per_mtok) == (Decimal(inp), Decimal(out)), model
    assert ModelAlias.objects.get(provider="anthropic", alias="claude-sonnet-4").target == "claude-sonnet-4-20250514"
    assert ModelAlias.objects.get(provider="anthropic", alias="claude-opus-4").target == "claude-opus-4-20250514"


def test_load_prices_updates_a_changed_price_and_alias(db):
    load_price_list()
    changed = {
        "effective_from": "2024-01-01T00:00:00Z",
        "prices": [{"provider": "openai", "model": "gpt-4o", "input_per_mtok": "2.00", "output_per_mtok": "9.00"}],
        "aliases": [{"provider": "anthropic", "alias": "claude-sonnet-4", "target": "claude-sonnet-4-20260101"}],
    }
    assert load_price_list(changed) == {
        "prices_created": 0,
        "prices_updated": 1,
        "aliases_created": 0,
        "aliases_updated": 1,
    }
    assert price_for("openai", "gpt-4o").output_per_mtok == Decimal("9.00")


def test_load_prices_reads_a_litellm_price_map(db, tmp_path):
    litellm = {
        "sample_spec": {"input_cost_per_token": 0},
        "gpt-4o": {
            "input_cost_per_token": 2.5e-06,
            "output_cost_per_token": 1e-05,
            "litellm_provider": "openai",
            "mode": "chat",
            "max_input_tokens": 128000,
        },
        "claude-sonnet-4-20250514": {
            "input_cost_per_token": 3e-06,
            "output_cost_per_token": 1.5e-05,
            "litellm_provider": "anthropic",
            "mode": "chat",
            "max_input_tokens": 200000,
        },
        "text-embedding-3-small": {
            "input_cost_per_token": 2e-08,
            "output_cost_per_token": 0,
            "litellm_provider": "openai",
            "mode": "embedding",
        },
        "bedrock/anthropic.claude": {
            "input_cost_per_token": 8e-07,
            "output_cost_per_token": 4e-06,
            "litellm_provider": "bedrock",
            "mode": "chat",
        },
    }
    data = from_litellm(litellm, effective_from="2025-06-01T00:00:00Z")
    assert {p["model"] for p in data["prices"]} == {"gpt-4o", "claude-sonnet-4-20250514"}
    path = tmp_path / "litellm.json"
    path.write_text(json.dumps(litellm))
    call_command(
        "load_prices",
        "--litellm",
        str(path),
        "--effective-from",
        "2025-06-01T00:00:00+00:00",
        stdout=open("/dev/null", "w"),
    )
    price = price_for("anthropic", "claude-sonnet-4-20250514", datetime(2025, 7, 1, tzinfo=UTC))
    assert (price.input_per_mtok, price.output_per_mtok, price.context_window) == (Decimal("3"), Decimal("15"), 200000)


def test_known_context_windows_come_from_the_bundled_list():
    assert known_context_window("openai", "gpt-4o-2024-08-06") == 128000
    assert known_context_window("anthropic", "claude-sonnet-4-20250514") == 200000
    assert known_context_window("openai", "o9") is None


def test_a_friendly_name_is_priced_as_its_alias_target(db):
    load_price_list()
    price = price_for("anthropic", "claude-sonnet-4")
    assert (price.model, price.input_per_mtok) == ("claude-sonnet-4-20250514", Decimal("3.00"))
    assert cost_of(
        provider="anthropic", model_id="claude-opus-4", prompt_tokens=1000, completion_tokens=1000
    ) == Decimal("0.090000")
