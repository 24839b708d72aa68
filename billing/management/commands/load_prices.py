"""`manage.py load_prices`: load the bundled model prices and aliases (idempotent)."""

from __future__ import annotations

import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from billing.pricing import BUNDLED_PRICES, from_litellm, load_price_list


class Command(BaseCommand):
    help = (
        "Load model prices (USD per 1M tokens) and model aliases. Without options, the bundled "
        "billing/data/prices.json. Running it again changes nothing unless the file changed."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--file", type=Path, help="A price list in the bundled format.")
        parser.add_argument(
            "--litellm",
            type=Path,
            help="LiteLLM's model_prices_and_context_window.json (OpenAI and Anthropic chat models are taken).",
        )
        parser.add_argument(
            "--effective-from",
            help="With --litellm: when these prices take effect (ISO 8601; default now).",
        )

    def handle(self, *args, **options) -> None:
        if options["file"] and options["litellm"]:
            raise CommandError("Give --file or --litellm, not both")
        path = options["litellm"] or options["file"] or BUNDLED_PRICES
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise CommandError(f"Cannot read {path}: {exc}") from exc
        if options["litellm"]:
            effective = options["effective_from"] or timezone.now().replace(microsecond=0).isoformat()
            data = from_litellm(data, effective_from=effective)
        elif not isinstance(data, dict) or "prices" not in data:
            raise CommandError(f"{path} has no 'prices' list")
        try:
            counts = load_price_list(data)
        except (KeyError, ValueError, ArithmeticError) as exc:
            raise CommandError(f"{path} has a bad entry: {exc}") from exc
        self.stdout.write(
            "Prices: {prices_created} added, {prices_updated} updated; "
            "aliases: {aliases_created} added, {aliases_updated} updated.".format(**counts)
        )
