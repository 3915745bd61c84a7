# The two commands README promises: `make run` (local stack on a tiny built-in model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= builtin:tiny-llama
PROMPT ?= Hello

.PHONY: setup run test lint bench

setup:
	@bash scripts/setup.sh

run: setup
	$(VENV)/bin/pdserve generate --model $(MODEL) --prompt "$(PROMPT)"

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: setup
	$(PY) bench/engine.py
