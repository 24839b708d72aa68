#!/usr/bin/env bash
# `make run`: migrate, load demo data, and serve with daphne on 127.0.0.1:$PORT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${VENV:-.venv}/bin/python"
export DEBUG="${DEBUG:-1}"
PORT="${PORT:-8000}"

"$PY" manage.py migrate --noinput
"$PY" manage.py seed_demo

echo "Serving on http://127.0.0.1:${PORT}/ (sign in at /accounts/login/)"
exec "${VENV:-.venv}/bin/daphne" -b 127.0.0.1 -p "$PORT" config.asgi:application
