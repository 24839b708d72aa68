# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
PYTEST_WORKERS ?= 2

.PHONY: install run test test-fast lint format migrate seed clean

# `make run` needs the runtime only; tests and tools add requirements-dev.txt.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed-dev

run: $(VENV)/.installed
	PORT=$(PORT) VENV=$(VENV) bash scripts/run.sh

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
