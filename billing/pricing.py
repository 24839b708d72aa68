"""Cost math: the `ModelPrice` in force at a call's time, in Decimal.

A paid model without a price has an unknown cost (None), never 0: the caller stores it as
unknown and the admin and reports flag it. Ollama runs locally and costs 0 unless a price
row says otherwise. Costs are quantized to the ledger's six decimals by `billing.money`.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from django.utils import timezone

from billing.catalogue import (
    BUNDLED_PRICES,
    FREE_PROVIDERS,
    SEPARATORS,
    bundled_prices,
    known_context_window,
    price_in_force,
)
from billing.models import ModelAlias, ModelPrice
from billing.money import quantize_micro

MILLION = Decimal(1_000_000)
# Re-exported: the catalogue module holds them now, callers still import them from here.
__all__ = [
    "BUNDLED_PRICES",
    "FREE_PROVIDERS",
    "SEPARATORS",
    "bundled_prices",
    "cost_of",
    "from_litellm",
    "input_cost",
    "known_context_window",
    "load_price_list",
    "price_for",
]


def price_for(provider: str, model_id: str, at: datetime | None = None) -> ModelPrice | None:
    """The price in force at `at` (now by default), from the per-process catalogue cache:
    see `billing.catalogue.price_in_force`."""
    return price_in_force(provider, model_id, at or timezone.now())


def cost_of(
    *, provider: str, model_id: str, prompt_tokens: int, completion_tokens: int, at: datetime | None = None
) -> Decimal | None:
    """What a call cost, or None when no price is known for a paid model."""
    price = price_for(provider, model_id, at)
    if price is None:
        return None
    raw = (Decimal(prompt_tokens) * price.input_per_mtok + Decimal(completion_tokens) * price.output_per_mtok) / MILLION
    return quantize_micro(raw)


def input_cost(*, provider: str, model_id: str, tokens: int, at: datetime | None = None) -> Decimal | None:
    """The cost of `tokens` input tokens (a carried context's share of a call), or None."""
    price = price_for(provider, model_id, at)
    if price is None:
        return None
    return quantize_micro(Decimal(tokens) * price.input_per_mtok / MILLION)


def load_price_list(data: dict | None = None, *, source: str = "") -> dict[str, int]:
    """Create or update prices and aliases from a price list (the bundled one by default).

    Idempotent: a row is keyed by (provider, model, effective_from), an alias by
    (provider, alias); running it twice changes nothing the second time.
    """
    from django.db import transaction
    from django.utils.dateparse import parse_datetime

    data = data if data is not None else bundled_prices()
    default_from = data.get("effective_from")
    source = source or str(data.get("source", ""))[:200]
    counts = {"prices_created": 0, "prices_updated": 0, "aliases_created": 0, "aliases_updated": 0}
    with transaction.atomic():
        for row in data.get("prices", []):
            effective = parse_datetime(row.get("effective_from") or default_from)
            if effective is None:
                raise ValueError(f"Bad effective_from for {row['provider']}:{row['model']}")
            values = {
                "input_per_mtok": Decimal(str(row["input_per_mtok"])),
                "output_per_mtok": Decimal(str(row["output_per_mtok"])),
                "context_window": row.get("context_window"),
                "source": source,
            }
            existing = ModelPrice.objects.filter(
                provider=row["provider"], model=row["model"], effective_from=effective
            ).first()
            if existing is None:
                ModelPrice.objects.create(
                    provider=row["provider"], model=row["model"], effective_from=effective, **values
                )
                counts["prices_created"] += 1
            elif any(getattr(existing, k) != v for k, v in values.items()):
                for key, value in values.items():
                    setattr(existing, key, value)
                existing.save()
                counts["prices_updated"] += 1
        for row in data.get("aliases", []):
            alias, created = ModelAlias.objects.get_or_create(
                provider=row["provider"], alias=row["alias"], defaults={"target": row["target"]}
            )
            if created:
                counts["aliases_created"] += 1
            elif alias.target != row["target"]:
                alias.target = row["target"]
                alias.save(update_fields=["target"])
                counts["aliases_updated"] += 1
    return counts


def from_litellm(
    litellm_map: dict, *, effective_from: str, providers: tuple[str, ...] = ("openai", "anthropic")
) -> dict:
    """Turn LiteLLM's `model_prices_and_context_window.json` into our price list (chat models only).

    LiteLLM prices are per token; ours are per million tokens.
    """
    prices = []
    for key, entry in litellm_map.items():
        if key == "sample_spec" or not isinstance(entry, dict):
            continue
        provider = entry.get("litellm_provider")
        if provider not in providers or entry.get("mode") != "chat" or "/" in key:
            continue
        if entry.get("input_cost_per_token") is None or entry.get("output_cost_per_token") is None:
            continue
        prices.append(
            {
                "provider": provider,
                "model": key,
                "input_per_mtok": str(quantize_micro(Decimal(str(entry["input_cost_per_token"])) * MILLION)),
                "output_per_mtok": str(quantize_micro(Decimal(str(entry["output_cost_per_token"])) * MILLION)),
                "context_window": entry.get("max_input_tokens") or entry.get("max_tokens"),
            }
        )
    return {
        "source": "LiteLLM model_prices_and_context_window.json",
        "effective_from": effective_from,
        "prices": prices,
    }
