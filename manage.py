#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

import os
import sys
from pathlib import Path

CONFIGURED_BY = ("DEBUG", "SECRET_KEY")


def development_by_default() -> None:
    """A checkout with no configuration at all is a developer's: run commands with DEBUG on.

    "No configuration" means no `.env` file and neither DEBUG nor SECRET_KEY in the
    environment; a deployment always sets SECRET_KEY, so it never lands here. Only commands
    get this default: the server (daphne imports `config.settings` itself) still refuses to
    start unconfigured.
    """
    if (Path(__file__).resolve().parent / ".env").is_file() or any(os.environ.get(n) for n in CONFIGURED_BY):
        return
    os.environ["DEBUG"] = "1"
    print("manage.py: no .env and no DEBUG or SECRET_KEY set: running with DEBUG=1 (development).", file=sys.stderr)


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    development_by_default()
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    try:
        settings.INSTALLED_APPS  # noqa: B018  (load the settings now, to report a bad one in one line)
    except ImproperlyConfigured as exc:
        sys.exit(f"manage.py: configuration error: {exc}. See .env.example and docs/CONFIGURATION.md.")
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
