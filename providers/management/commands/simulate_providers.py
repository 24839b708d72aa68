"""`manage.py simulate_providers --port N`: the Ollama/OpenAI/Anthropic simulator, for development."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from providers.simulator import DEFAULT_RATE, run_forever


class Command(BaseCommand):
    help = (
        "Serve the provider simulator: Ollama (/api/...), OpenAI (/v1/chat/completions, /v1/models) and "
        "Anthropic (/v1/messages) on one port, with deterministic answers and faults chosen by model name."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--port", type=int, default=11434, help="Port to listen on (default 11434, Ollama's).")
        parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1).")
        parser.add_argument(
            "--tokens-per-second",
            type=float,
            default=DEFAULT_RATE,
            help=f"Streaming rate per answer (default {DEFAULT_RATE:g}; 0 = as fast as possible).",
        )

    def handle(self, *args, **options) -> None:
        if not 0 <= options["port"] <= 65535:
            raise CommandError("--port must be between 0 and 65535")
        if options["tokens_per_second"] < 0:
            raise CommandError("--tokens-per-second must be 0 or more")

        def announce(line: str) -> None:
            self.stdout.write(line)
            self.stdout.flush()

        try:
            run_forever(options["host"], options["port"], options["tokens_per_second"], announce=announce)
        except OSError as exc:
            raise CommandError(f"Cannot listen on {options['host']}:{options['port']}: {exc}") from exc
