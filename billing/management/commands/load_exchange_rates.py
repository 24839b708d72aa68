"""`manage.py load_exchange_rates FILE`: import dated exchange rates from a CSV file (no network)."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from billing.rates import exchange_rates_load

USAGE = 2


class Command(BaseCommand):
    help = (
        "Import exchange rates from a CSV file with the columns currency, usd_rate (units of the "
        "currency per US dollar) and effective_from (YYYY-MM-DD, midnight in TIME_ZONE, or a date and "
        "time with its offset). All or nothing: any bad line, or a rate that would change an issued "
        "invoice, loads nothing. Loading the same file again changes nothing."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("file", type=Path, help="The CSV file ('-' for standard input).")

    def handle(self, *args, file: Path, **options) -> None:
        if str(file) == "-":
            import sys

            text, name = sys.stdin.read(), "standard input"
        else:
            try:
                text, name = file.read_text(encoding="utf-8"), file.name
            except (OSError, UnicodeDecodeError) as exc:
                raise CommandError(f"Cannot read {file}: {exc}", returncode=USAGE) from None
        result = exchange_rates_load(text, source=f"load_exchange_rates {name}")
        if result.errors:
            shown = result.errors[:20]
            more = f"\n…and {len(result.errors) - 20} more." if len(result.errors) > 20 else ""
            raise CommandError(f"Nothing was loaded from {name}:\n" + "\n".join(shown) + more)
        self.stdout.write(f"Exchange rates: {result.created} added, {result.unchanged} already there.")
