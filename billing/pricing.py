"""Cost math: the `ModelPrice` in force at a call's time, in Decimal.

A paid model without a price has an unknown cost (None), never 0: the caller stores it as
unknown and the admin and reports flag it. Ollama runs locally and costs 0 unless a price
row says otherwise. Costs are quantized to the ledger's six decimals by `billing.money`.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from functools import cache
from pathlib import Path

from django.utils import timezone

from billing.models import ModelAlias, ModelPrice
from billing.money import quantize_micro

BUNDLED_PRICES = Path(__file__).resolve().parent / "data" / "prices.json"
MILLION = Decimal(1_000_000)
FREE_PROVIDERS = ("ollama",)
# A price for `gpt-4o` also covers `gpt-4o-2024-08-06`, but `gpt-4` must not cover `gpt-4o`:
# the id has to continue with a separator after the priced prefix.
SEPARATORS = ("-", ":", "@", "/")


def price_for(provider: str, model_id: str, at: datetime | None = None) -> ModelPrice | None:
    """The price in force at `at`: the exact model, else the longest priced prefix of the id,
    else (for a friendly name) the price of the id its alias points to."""
    at = at or timezone.now()
    # Plain tuples: a call's cost is looked up on every chat turn, and model instances for every
    # price row of the provider would cost more than the query.
    names = ("id", "model", "input_per_mtok", "output_per_mtok", "effective_from", "context_window")
    rows = ModelPrice.objects.in_force(at).filter(provider=provider).order_by("-effective_from").values_list(*names)
    best: tuple | None = None
    for row in rows:  # newest first, so the first row per model is the one in force
        model = row[1]
        if model == model_id:
            return ModelPrice(provider=provider, **dict(zip(names, row, strict=True)))
        if model_id.startswith(model) and model_id[len(model) : len(model) + 1] in SEPARATORS:
            if best is None or len(model) > len(best[1]):
                best = row
    if best is not None:
        return ModelPrice(provider=provider, **dict(zip(names, best, strict=True)))
    # A friendly name (`claude-sonnet-4`) is priced as the id its alias points to.

    target = ModelAlias.objects.filter(provider=provider, alias=model_id).values_list("target", flat=True).first()
    if target and target != model_id:
        return price_for(provider, target, at)
    if provider in FREE_PROVIDERS:
        return ModelPrice(
            provider=provider, model=model_id, input_per_mtok=Decimal(0), output_per_mtok=Decimal(0), effective_from=at
        )
    return None


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


@cache
def bundled_prices() -> dict:
    return json.loads(BUNDLED_PRICES.read_text())


def known_context_window(provider: str, model_id: str) -> int | None:
    """The context window from the bundled price list (exact, then longest prefix)."""
    best: tuple[int, int] | None = None
    for row in bundled_prices()["prices"]:
        if row["provider"] != provider or not row.get("context_window"):
            continue
        if row["model"] == model_id:
            return int(row["context_window"])
        if model_id.startswith(row["model"]) and model_id[len(row["model"]) : len(row["model"]) + 1] in SEPARATORS:
            if best is None or len(row["model"]) > best[0]:
                best = (len(row["model"]), int(row["context_window"]))
    return best[1] if best else None


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
