"""The model catalogue the provider router reads: aliases, prices and context windows from billing.

Registered with `providers.router.set_catalogue()` by `BillingConfig.ready()`, so the
router (a leaf that imports no app) learns what staff edit in the admin.
"""

from __future__ import annotations

from datetime import datetime

from billing.models import ModelAlias, ModelPrice
from billing.pricing import known_context_window, price_for
from providers.base import ModelInfo
from providers.naming import ModelRef


class BillingCatalogue:
    def resolve_alias(self, ref: ModelRef) -> ModelRef:
        target = (
            ModelAlias.objects.filter(provider=ref.provider, alias=ref.model).values_list("target", flat=True).first()
        )
        return ModelRef(ref.provider, target) if target else ref

    def is_priced(self, ref: ModelRef, at: datetime) -> bool:
        target = self.resolve_alias(ref)
        return price_for(target.provider, target.model, at) is not None

    def context_window(self, ref: ModelRef, at: datetime) -> int | None:
        target = self.resolve_alias(ref)
        price = price_for(target.provider, target.model, at)
        if price is not None and price.context_window:
            return price.context_window
        return known_context_window(target.provider, target.model)

    def paid_models(self, providers: tuple[str, ...], at: datetime) -> list[ModelInfo]:
        out: dict[str, ModelInfo] = {}
        for provider in providers:
            windows: dict[str, int | None] = {}
            for model, window in (
                ModelPrice.objects.in_force(at)
                .filter(provider=provider)
                .order_by("model", "-effective_from")
                .values_list("model", "context_window")
            ):
                windows.setdefault(model, window)
            for alias, target in ModelAlias.objects.filter(provider=provider).values_list("alias", "target"):
                if target in windows:
                    name = f"{provider}:{alias}"
                    out[name] = ModelInfo(name, provider, alias, windows[target], True)
            for model, window in windows.items():
                name = f"{provider}:{model}"
                out.setdefault(name, ModelInfo(name, provider, model, window, True))
        return sorted(out.values(), key=lambda m: (m.provider, m.model))
