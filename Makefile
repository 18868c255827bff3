# Two commands on a fresh machine with Python 3.11:  make quickstart  and  make test.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.runtime-installed
TEST_STAMP := $(VENV)/.test-installed
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: quickstart test bench clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(RUNTIME_STAMP): requirements.txt pyproject.toml | $(PY)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(TEST_STAMP): requirements-test.txt $(RUNTIME_STAMP)
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

quickstart: $(RUNTIME_STAMP)
	$(PY) -m xwin_jax.launch --gin_file=gin/experiments/quickstart.gin

test: $(TEST_STAMP)
	$(PY) -m pytest -q

bench: $(TEST_STAMP)
	$(PY) bench/forward.py
	$(PY) bench/sft_step.py

clean-venv:
	rm -rf $(VENV)
