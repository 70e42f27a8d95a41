# sseproxy — `make run` serves on http://127.0.0.1:8080, `make test` runs the whole suite.
# Both create .venv (Python 3.11+) when it is missing and install what they need into it.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: run run-local test lint typecheck bench bench-pacing screenshots clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(BIN)/sseproxy serve $(ARGS)

# The first install builds llama.cpp from source (several minutes, see README).
$(VENV)/.installed-local: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[local]'
	touch $@ $(VENV)/.installed-run

run-local: $(VENV)/.installed-local
	$(BIN)/sseproxy serve --upstream local $(ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/python -m flake8 sseproxy tests bench docs

typecheck: $(VENV)/.installed-test
	$(BIN)/python -m mypy

test: lint typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed-run
	$(BIN)/python bench/run.py $(BENCH_ARGS)

bench-pacing: $(VENV)/.installed-run
	$(BIN)/python bench/pacing.py

# Remakes docs/page-chat.png and docs/page-compare.png (needs Debian's chromium package).
screenshots: $(VENV)/.installed-test
	$(BIN)/python docs/screenshots.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .hypothesis .coverage
