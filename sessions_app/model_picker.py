"""The model picker of the session forms: grouped by provider, aliases folded, prices shown.

The router lists every model a consultant may pick, friendly aliases included
(`anthropic:claude-sonnet-4`, `…-4-0`, `claude-4-sonnet-…` all point at one id). A picker
offers each model once: under the shortest of its names (an alias follows the provider's
current id, which is what a friendly name is for), with its price per million tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from django.conf import settings
from django.utils import timezone

from billing.models import ModelAlias, ModelPrice, Provider
from billing.money import format_cost
from providers.base import ModelInfo
from providers.naming import PROVIDERS, parse_model

FREE_LABEL = "free, runs locally"


@dataclass
class ModelOption:
    name: str  # what the session stores: provider:model
    provider: str
    target: str  # the provider's id the name resolves to
    paid: bool
    input_per_mtok: Decimal | None = None
    output_per_mtok: Decimal | None = None
    also: list[str] = field(default_factory=list)  # folded names (provider:alias)

    @property
    def price(self) -> str:
        if not self.paid:
            return FREE_LABEL
        if self.input_per_mtok is None or self.output_per_mtok is None:
            return "price unknown"
        return f"{per_million(self.input_per_mtok)} in / {per_million(self.output_per_mtok)} out per 1M tokens"

    @property
    def label(self) -> str:
        return f"{self.name.partition(':')[2]} · {self.price}"


def per_million(value: Decimal) -> str:
    """A price per million tokens: cents at least, every significant digit kept (0.075 USD, not 0.08)."""
    return format_cost(value, "USD")


def provider_label(provider: str) -> str:
    """ "OpenAI", not "Openai": the provider's own spelling."""
    return Provider(provider).label if provider in Provider.values else provider


def model_options(models: list[ModelInfo]) -> list[ModelOption]:
    """One option per model the router lists, aliases folded into the model they point to."""
    aliases = {(p, a): t for p, a, t in ModelAlias.objects.values_list("provider", "alias", "target")}
    prices: dict[tuple[str, str], tuple[Decimal, Decimal]] = {}
    rows = ModelPrice.objects.in_force(timezone.now()).order_by("-effective_from")
    for provider, model, price_in, price_out in rows.values_list(
        "provider", "model", "input_per_mtok", "output_per_mtok"
    ):
        prices.setdefault((provider, model), (price_in, price_out))
    by_target: dict[tuple[str, str], list[ModelInfo]] = {}
    for info in models:
        target = aliases.get((info.provider, info.model), info.model)
        by_target.setdefault((info.provider, target), []).append(info)
    options = []
    for (provider, target), infos in by_target.items():
        names = sorted((i.name for i in infos), key=lambda n: (len(n), n))
        price = prices.get((provider, target)) if infos[0].paid else None
        options.append(
            ModelOption(
                name=names[0],
                provider=provider,
                target=target,
                paid=infos[0].paid,
                input_per_mtok=price[0] if price else None,
                output_per_mtok=price[1] if price else None,
                also=names[1:],
            )
        )
    order = {p: i for i, p in enumerate(PROVIDERS)}
    return sorted(options, key=lambda o: (o.paid, order.get(o.provider, 99), o.name))


def grouped_choices(options: list[ModelOption]) -> list[tuple[str, list[tuple[str, str]]]]:
    """Django choices: one group per provider, under its proper name."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for option in options:
        groups.setdefault(provider_label(option.provider), []).append((option.name, option.label))
    return list(groups.items())


def option_for(options: list[ModelOption], name: str | None) -> ModelOption | None:
    """The option a model name picks: itself, or the option it was folded into."""
    if not name:
        return None
    try:
        ref = parse_model(name)
    except ValueError:
        return None
    wanted = {ref.name}
    if ref.provider == "ollama" and ":" not in ref.model:
        wanted.add(f"{ref.name}:latest")  # Ollama's own reading of an untagged name
    for option in options:
        if option.name in wanted or wanted & set(option.also):
            return option
    return None


def default_choice(options: list[ModelOption], preferred: str | None = None) -> str | None:
    """`preferred` if offered, else CHAT_MODEL if offered, else the first free model, else the first."""
    for name in (preferred, settings.CHAT_MODEL):
        option = option_for(options, name)
        if option is not None:
            return option.name
    pool = [o for o in options if not o.paid] or options
    return pool[0].name if pool else None
