# Two commands on a fresh machine with Python 3.11:  make quickstart  and  make test.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.runtime-installed
TEST_STAMP := $(VENV)/.test-installed
# The tested versions (pip constraints). `make LOCK= test` installs from the ranges in
# requirements*.txt alone; `make lock` re-resolves those ranges and rewrites the lock.
LOCK_FILE := requirements.lock
LOCK ?= $(LOCK_FILE)
CONSTRAINTS := $(if $(LOCK),-c $(LOCK))
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: quickstart test lint lock bench clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(RUNTIME_STAMP): requirements.txt pyproject.toml $(LOCK) | $(PY)
	$(PY) -m pip install -q $(CONSTRAINTS) -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(TEST_STAMP): requirements-test.txt $(LOCK) $(RUNTIME_STAMP)
	$(PY) -m pip install -q $(CONSTRAINTS) -r requirements.txt -r requirements-test.txt
	touch $@

quickstart: $(RUNTIME_STAMP)
	$(PY) -m xwin_jax.launch --gin_file=gin/experiments/quickstart.gin

lint: $(TEST_STAMP)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q

bench: $(TEST_STAMP)
	$(PY) bench/forward.py
	$(PY) bench/sft_step.py

define LOCK_HEADER
# The versions the test suite passed with: pip constraints for requirements.txt and
# requirements-test.txt (every package they pull in, pinned; local version labels such as
# +cpu dropped so the same pin matches the CPU and the CUDA wheels). `make` installs with
# this file by default; `make LOCK= ...` installs from the ranges alone.
# Refresh: `make lock` (resolves requirements*.txt afresh, without these pins, in a
# temporary venv and writes its `pip freeze` here), then `make test`, then commit this file.
endef
export LOCK_HEADER

# The newest versions requirements*.txt allow, resolved in a throwaway venv (the project's
# .venv is not touched); `make test` afterwards moves .venv to the new pins.
lock:
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install -q --upgrade pip; \
	"$$tmp/venv/bin/python" -m pip install -q -r requirements.txt -r requirements-test.txt; \
	{ printf '%s\n' "$$LOCK_HEADER"; \
	  "$$tmp/venv/bin/python" -m pip freeze --all --exclude-editable | grep -v '^pip==' | \
	  sed -E 's/^([^=]+==[^+]+)\+.*$$/\1/'; } > "$$tmp/lock"; \
	mv "$$tmp/lock" $(LOCK_FILE); \
	echo "$(LOCK_FILE): $$(grep -vc '^#' $(LOCK_FILE)) pins"

clean-venv:
	rm -rf $(VENV)
