# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
# One more worker than this 2-core VM's cores: many tests wait on daphne, Chromium or the
# simulator (measured back to back: 4m17s with 3 workers, 5m18s with 2).
PYTEST_WORKERS ?= 3

.PHONY: install run test test-fast lint format migrate seed clean install-front serve-multi bench-peers

# `make run` needs the runtime only; tests and tools add requirements-dev.txt.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	touch $@

# The original terminal design's commands, in the venv's bin/: wrappers that run the checkout's
# scripts with this venv's Python (the checkout is the application; there is no package to build).
# The .pth file puts the checkout on the venv's path, so scripts anywhere can
# `from sessions_app import OllamaSessionManager`.
COMMANDS := $(VENV)/bin/ollama-chat $(VENV)/bin/ollama-session

$(VENV)/bin/ollama-%: scripts/ollama-% $(VENV)/.installed
	printf '#!/bin/sh\nexec "%s" "%s" "$$@"\n' "$(abspath $(PY))" "$(abspath $<)" > $@
	chmod +x $@

$(VENV)/.on-path: $(VENV)/.installed
	echo "$(CURDIR)" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/billable-sessions.pth"
	touch $@

install: $(VENV)/.installed-dev $(COMMANDS) $(VENV)/.on-path

run: $(VENV)/.installed
	PORT=$(PORT) VENV=$(VENV) bash scripts/run.sh

# Several daphne processes (one per core unless PROCESSES says) behind HAProxy on $(PORT):
# docs/OPERATIONS.md. Needs DATABASE_URL (PostgreSQL) and REDIS_URL for more than one process.
PROCESSES ?= $(shell nproc 2>/dev/null || echo 2)
serve-multi: install install-front
	$(PY) manage.py migrate --noinput
	PORT=$(PORT) $(PY) scripts/serve_multi.py --processes $(PROCESSES)

# The front is Debian's HAProxy package; installed only when missing.
install-front:
	@command -v haproxy >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q haproxy)

# LiteLLM's proxy and py-spy live in their own venv under bench/, never in $(VENV).
PEERS_VENV := bench/.peers-venv
$(PEERS_VENV)/.installed: bench/peers-requirements.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q --upgrade pip
	$(PEERS_VENV)/bin/pip install -q -r bench/peers-requirements.txt
	touch $@

# Direct vs LiteLLM vs the product's gateway, interleaved, three repetitions: docs/BENCHMARKS.md.
PEERS_ARGS ?=
bench-peers: install install-front $(PEERS_VENV)/.installed
	$(PY) bench/peers.py $(PEERS_ARGS)

test: install
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) -p no:cacheprovider

# The quick loop: everything but the browser tests and the ones that start extra processes.
test-fast: install
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) -p no:cacheprovider -m "not browser and not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) scripts/mypy_baseline.py

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

migrate: $(VENV)/.installed
	DEBUG=1 $(PY) manage.py migrate --noinput

seed: migrate
	DEBUG=1 $(PY) manage.py seed_demo

clean:
	rm -rf $(VENV) db.sqlite3 .signing-key .dev-secret-key
