# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
PYTEST_WORKERS ?= 2

.PHONY: install run test lint migrate seed clean install-front serve-multi bench-peers

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

install: $(VENV)/.installed

run: install
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

lint: install
	$(VENV)/bin/ruff check .

migrate: install
	DEBUG=1 $(PY) manage.py migrate --noinput

seed: migrate
	DEBUG=1 $(PY) manage.py seed_demo

clean:
	rm -rf $(VENV) db.sqlite3 .signing-key .dev-secret-key
