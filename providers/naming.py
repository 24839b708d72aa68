"""Model names: `provider:model`, or a bare Ollama name (whose tags contain colons)."""

from __future__ import annotations

from dataclasses import dataclass

PROVIDERS = ("ollama", "openai", "anthropic")
PAID_PROVIDERS = ("openai", "anthropic")


@dataclass(frozen=True)
class ModelRef:
    provider: str
    model: str

    @property
    def name(self) -> str:
        return f"{self.provider}:{self.model}"

    @property
    def paid(self) -> bool:
        return self.provider in PAID_PROVIDERS

    def __str__(self) -> str:
        return self.name


def parse_model(name: str) -> ModelRef:
    """Split at the first colon only when what precedes it is a known provider.

    `ollama:llama3.2:latest` is Ollama's `llama3.2:latest`; `llama3.2:latest` is too.
    Raises ValueError for an empty name.
    """
    name = (name or "").strip()
    head, sep, tail = name.partition(":")
    if sep and head in PROVIDERS:
        if not tail.strip():
            raise ValueError(f"Model name {name!r} has no model after the provider")
        return ModelRef(head, tail.strip())
    if not name:
        raise ValueError("A model name is required")
    return ModelRef("ollama", name)
