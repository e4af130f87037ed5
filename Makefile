# Two set-up commands: `make demo` and `make test`. Both create/refresh .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OFFICIAL := dinov2==0.0.1.dev2
PYTEST_ARGS ?=

.PHONY: install install-test demo test test-fast lint bench gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps $(OFFICIAL)
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/dinoforge demo

test: install-test
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/python -m pytest -q -n 2 --durations=15 $(PYTEST_ARGS)

test-fast: install-test
	$(BIN)/python -m pytest -q -n 2 -m "not slow" $(PYTEST_ARGS)

lint: install-test
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

bench: install-test
	$(BIN)/pip install -q ".[bench]"
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

# The GPU check (benchmarks/gpu_check.py): --full on a CUDA device (one command, about 8 minutes), else --smoke.
gpu-check: install-test
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
