#!/usr/bin/env bash
# `make run`: migrate, load prices and demo data, and serve with daphne on 127.0.0.1:$PORT, with the
# guardian (`guard_sessions --every 60`) running beside it.
# When no Ollama answers at OLLAMA_HOST, start the bundled provider simulator instead (and
# point OpenAI/Anthropic at it too when no real key is set); it is stopped when this exits.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${VENV:-.venv}/bin/python"
export DEBUG="${DEBUG:-1}"
PORT="${PORT:-8000}"
SIM_PID=""
SIM_LOG=""
DAPHNE_PID=""
GUARD_PID=""
INTERRUPTED=""

stop_child() {
    # Ctrl-C reached the whole process group: the child is stopping already (daphne storing
    # the answers still streaming as partial); a second signal would cut that short.
    local pid="$1"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        [[ -n "$INTERRUPTED" ]] || kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
}

cleanup() {
    stop_child "$DAPHNE_PID"
    stop_child "$GUARD_PID"
    if [[ -n "$SIM_PID" ]] && kill -0 "$SIM_PID" 2>/dev/null; then
        kill "$SIM_PID" 2>/dev/null || true
        wait "$SIM_PID" 2>/dev/null || true
    fi
    [[ -n "$SIM_LOG" ]] && rm -f "$SIM_LOG"
    return 0
}
trap cleanup EXIT
trap 'INTERRUPTED=1; exit 130' INT
trap 'exit 143' TERM

# What the settings will see (environment, then .env), and whether Ollama answers within ~1s.
eval "$(
    "$PY" - <<'EOF'
import os
import shlex

import httpx

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
from django.conf import settings

host = settings.OLLAMA_HOST
try:
    up = httpx.get(f"{host}/api/version", timeout=1.0).status_code == 200
except httpx.HTTPError:
    up = False
print(f"OLLAMA_URL={shlex.quote(host)}")
print(f"OLLAMA_UP={int(up)}")
print(f"HAS_OPENAI_KEY={int(bool(settings.OPENAI_API_KEY))}")
print(f"HAS_ANTHROPIC_KEY={int(bool(settings.ANTHROPIC_API_KEY))}")
EOF
)"

if [[ "$OLLAMA_UP" == "1" ]]; then
    echo "Ollama answers at ${OLLAMA_URL}."
else
    SIM_LOG="$(mktemp)"
    "$PY" manage.py simulate_providers --port 0 --skip-checks >"$SIM_LOG" 2>&1 &
    SIM_PID=$!
    SIM_URL=""
    for _ in $(seq 1 600); do
        SIM_URL="$(sed -n 's/.* on \(http:[^ ]*\) at .*/\1/p' "$SIM_LOG" | head -n 1)"
        [[ -n "$SIM_URL" ]] && break
        if ! kill -0 "$SIM_PID" 2>/dev/null; then
            cat "$SIM_LOG" >&2
            echo "The provider simulator failed to start." >&2
            exit 1
        fi
        sleep 0.1
    done
    if [[ -z "$SIM_URL" ]]; then
        echo "The provider simulator did not start within 60 seconds." >&2
        exit 1
    fi
    export OLLAMA_HOST="$SIM_URL"
    export PROVIDER_SIMULATOR=1
    simulated="Ollama"
    if [[ "$HAS_OPENAI_KEY" == "0" ]]; then
        export OPENAI_API_KEY="sk-simulator-not-a-real-key" OPENAI_BASE_URL="${SIM_URL}/v1"
        simulated="${simulated}, OpenAI"
    fi
    if [[ "$HAS_ANTHROPIC_KEY" == "0" ]]; then
        export ANTHROPIC_API_KEY="sk-ant-simulator-not-a-real-key" ANTHROPIC_BASE_URL="${SIM_URL}"
        simulated="${simulated}, Anthropic"
    fi
    echo "================================================================================"
    echo " No Ollama answers at ${OLLAMA_URL}: using the bundled provider simulator"
    echo " at ${SIM_URL} for ${simulated}. Answers are simulated, not real model output."
    echo "================================================================================"
fi

"$PY" manage.py migrate --noinput
"$PY" manage.py seed_demo  # loads the model prices too

# The guardian, beside daphne (no cron needed): ends forgotten sessions at their last activity and
# settles answers whose process is gone. It prints only what it does.
"$PY" manage.py guard_sessions --every 60 --quiet &
GUARD_PID=$!

echo "Serving on http://127.0.0.1:${PORT}/ (sign in at /accounts/login/)"
# Not `exec`: this shell stays to stop daphne, the guardian and the simulator together, on Ctrl-C or kill.
"${VENV:-.venv}/bin/daphne" -b 127.0.0.1 -p "$PORT" config.asgi:application &
DAPHNE_PID=$!
wait "$DAPHNE_PID"
