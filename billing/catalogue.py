"""The model catalogue: aliases, prices and context windows, cached per process.

`BillingCatalogue` is registered with `providers.router.set_catalogue()` by
`BillingConfig.ready()`, so the router (a leaf that imports no app) learns what staff edit in
the admin; `billing.pricing` prices calls from the same cache.

Every process keeps the whole catalogue (a few hundred price rows at most) in memory, keyed
by the version in `model_catalogue_version`. Any write to a price or an alias (the admin,
`load_prices`, a queryset update) gives that row a new version in the same transaction
(`billing.signals`, `CatalogueQuerySet`), so the next lookup in any process sees the change:
a lookup reads the version (one primary-key read) and reloads only when it moved. Inside
`catalogue_pinned()` (a turn's claim, its final store) the version is read once for the whole
block, so a turn pays one read instead of one per alias and price.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import cache
from pathlib import Path

from billing.models import CATALOGUE_KEY, ModelAlias, ModelPrice, stored_version, version_column
from config import statements
from providers.base import ModelInfo
from providers.naming import ModelRef

# The fields of a price row the cache keeps, in this order.
PRICE_FIELDS = ("id", "model", "input_per_mtok", "output_per_mtok", "effective_from", "context_window")
BUNDLED_PRICES = Path(__file__).resolve().parent / "data" / "prices.json"
FREE_PROVIDERS = ("ollama",)
# A price for `gpt-4o` also covers `gpt-4o-2024-08-06`, but `gpt-4` must not cover `gpt-4o`:
# the id has to continue with a separator after the priced prefix.
SEPARATORS = ("-", ":", "@", "/")


@dataclass(frozen=True)
class CatalogueSnapshot:
    """The catalogue at one version: aliases, and each provider's price rows newest first."""

    version: object
    aliases: dict[tuple[str, str], str] = field(default_factory=dict)
    prices: dict[str, list[tuple]] = field(default_factory=dict)


class CatalogueCache:
    """One process's copy of the catalogue, reloaded when the stored version moves."""

    def __init__(self) -> None:
        self._snapshot: CatalogueSnapshot | None = None
        self._lock = threading.Lock()
        self._pinned: ContextVar[CatalogueSnapshot | None] = ContextVar(f"catalogue_pinned_{id(self)}", default=None)
        self.loads = 0  # how often the catalogue was read whole (tests assert on it)

    def current(self) -> CatalogueSnapshot:
        """The catalogue as stored now: the pinned copy inside `pinned()`, else checked against the version."""
        pinned = self._pinned.get()
        if pinned is not None:
            return pinned
        return self._checked()

    def _checked(self) -> CatalogueSnapshot:
        # The version is read before the rows: rows newer than it only make the next check reload.
        return self._at(stored_version(CATALOGUE_KEY))

    def _load(self, version: object) -> CatalogueSnapshot:
        self.loads += 1
        aliases = {(p, a): t for p, a, t in ModelAlias.objects.values_list("provider", "alias", "target")}
        prices: dict[str, list[tuple]] = {}
        rows = ModelPrice.objects.order_by("provider", "-effective_from").values_list("provider", *PRICE_FIELDS)
        for provider, *row in rows:
            prices.setdefault(provider, []).append(tuple(row))
        return CatalogueSnapshot(version, aliases, prices)

    def _at(self, version: object) -> CatalogueSnapshot:
        """The catalogue at `version`, as read by the caller (reloaded only when it moved)."""
        snapshot = self._snapshot
        if snapshot is not None and snapshot.version == version and version is not None:
            return snapshot
        snapshot = self._load(version)
        with self._lock:
            self._snapshot = snapshot
        return snapshot

    @contextlib.contextmanager
    def pinned(self, version: object = None, *, read: bool = True) -> Iterator[CatalogueSnapshot]:
        """Read the version once for the whole block (nested blocks keep the outer copy).

        With `read=False` the caller has read `version` itself, in a statement of its own
        (`version_column()`), and no read is made here.
        """
        outer = self._pinned.get()
        if outer is not None:
            yield outer
            return
        token = self._pinned.set(self._checked() if read else self._at(version))
        try:
            yield self._pinned.get()  # type: ignore[misc]
        finally:
            self._pinned.reset(token)

    def forget(self) -> None:
        with self._lock:
            self._snapshot = None


_cache = CatalogueCache()


def catalogue() -> CatalogueSnapshot:
    """The current catalogue (see the module docstring for what that costs)."""
    return _cache.current()


def catalogue_pinned():
    """A block in which every catalogue lookup uses one read of the version."""
    return _cache.pinned()


def catalogue_version_column() -> statements.Scalar:
    """The catalogue's version as a column of another statement (`statements.select_row(also=...)`)."""
    return version_column(CATALOGUE_KEY)


def catalogue_at(version: object):
    """A block in which every catalogue lookup uses `version`, read with `catalogue_version_column()`."""
    return _cache.pinned(version, read=False)


def catalogue_cache() -> CatalogueCache:
    return _cache


def alias_target(provider: str, alias: str) -> str | None:
    return catalogue().aliases.get((provider, alias))


def _covers(model: str, model_id: str) -> bool:
    return model_id.startswith(model) and model_id[len(model) : len(model) + 1] in SEPARATORS


def price_in_force(provider: str, model_id: str, at: datetime) -> ModelPrice | None:
    """The price in force at `at`: the exact model, else the longest priced prefix of the id,
    else (for a friendly name) the price of the id its alias points to; Ollama is free unless
    a row says otherwise. None: a paid model with no price."""
    snapshot = catalogue()
    seen: set[str] = set()
    while True:
        best: tuple | None = None
        for row in snapshot.prices.get(provider, ()):  # newest first: the first row per model is in force
            if row[4] > at:
                continue
            model = row[1]
            if model == model_id:
                best = row
                break
            if _covers(model, model_id) and (best is None or len(model) > len(best[1])):
                best = row
        if best is not None:
            return ModelPrice(provider=provider, **dict(zip(PRICE_FIELDS, best, strict=True)))
        # A friendly name (`claude-sonnet-4`) is priced as the id its alias points to.
        seen.add(model_id)
        target = snapshot.aliases.get((provider, model_id))
        if not target or target in seen:
            break
        model_id = target
    if provider in FREE_PROVIDERS:
        return ModelPrice(
            provider=provider, model=model_id, input_per_mtok=Decimal(0), output_per_mtok=Decimal(0), effective_from=at
        )
    return None


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
        if _covers(row["model"], model_id) and (best is None or len(row["model"]) > best[0]):
            best = (len(row["model"]), int(row["context_window"]))
    return best[1] if best else None


class BillingCatalogue:
    def resolve_alias(self, ref: ModelRef) -> ModelRef:
        target = alias_target(ref.provider, ref.model)
        return ModelRef(ref.provider, target) if target else ref

    def is_priced(self, ref: ModelRef, at: datetime) -> bool:
        target = self.resolve_alias(ref)
        return price_in_force(target.provider, target.model, at) is not None

    def context_window(self, ref: ModelRef, at: datetime) -> int | None:
        target = self.resolve_alias(ref)
        price = price_in_force(target.provider, target.model, at)
        if price is not None and price.context_window:
            return price.context_window
        return known_context_window(target.provider, target.model)

    def paid_models(self, providers: tuple[str, ...], at: datetime) -> list[ModelInfo]:
        snapshot = catalogue()
        out: dict[str, ModelInfo] = {}
        for provider in providers:
            windows: dict[str, int | None] = {}
            for row in snapshot.prices.get(provider, ()):  # newest first: the first per model is in force
                if row[4] <= at:
                    windows.setdefault(row[1], row[5])
            for (alias_provider, alias), target in sorted(snapshot.aliases.items()):
                if alias_provider == provider and target in windows:
                    name = f"{provider}:{alias}"
                    out[name] = ModelInfo(name, provider, alias, windows[target], True)
            for model, window in sorted(windows.items()):
                name = f"{provider}:{model}"
                out.setdefault(name, ModelInfo(name, provider, model, window, True))
        return sorted(out.values(), key=lambda m: (m.provider, m.model))
