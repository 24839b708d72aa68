"""What the router needs to know about models and does not own: aliases, prices, context windows.

`providers` is a leaf: it imports nothing from the project's apps. The app that owns the
model catalogue (billing: `ModelAlias`, `ModelPrice`) hands an object with this interface to
`providers.router.set_catalogue()` when Django starts. Until then the router works with
`EmptyCatalogue`: no aliases, no prices (so no paid model can be picked), default windows.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from providers.base import ModelInfo
from providers.naming import ModelRef


class ModelCatalogue(Protocol):
    def resolve_alias(self, ref: ModelRef) -> ModelRef:
        """The provider's id behind a friendly name, or `ref` itself."""
        ...

    def is_priced(self, ref: ModelRef, at: datetime) -> bool:
        """Whether a call to `ref` at `at` has a known price (a paid model without one is refused)."""
        ...

    def context_window(self, ref: ModelRef, at: datetime) -> int | None:
        """The model's context window in tokens, when the catalogue knows it."""
        ...

    def paid_models(self, providers: tuple[str, ...], at: datetime) -> list[ModelInfo]:
        """The priced models of these providers (friendly aliases included), for pickers and `/v1/models`."""
        ...


class EmptyCatalogue:
    """No aliases, no prices, no windows: what the router knows before an app hands it more."""

    def resolve_alias(self, ref: ModelRef) -> ModelRef:
        return ref

    def is_priced(self, ref: ModelRef, at: datetime) -> bool:
        return False

    def context_window(self, ref: ModelRef, at: datetime) -> int | None:
        return None

    def paid_models(self, providers: tuple[str, ...], at: datetime) -> list[ModelInfo]:
        return []
