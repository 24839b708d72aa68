# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
PYTEST_WORKERS ?= 2

.PHONY: install run test lint migrate seed clean

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

test: install
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) -p no:cacheprovider

lint: install
	$(VENV)/bin/ruff check .

migrate: $(VENV)/.installed
	DEBUG=1 $(PY) manage.py migrate --noinput

seed: migrate
	DEBUG=1 $(PY) manage.py seed_demo

clean:
	rm -rf $(VENV) db.sqlite3 .signing-key .dev-secret-key
