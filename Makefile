# The two commands README promises: `make run` (router + prefill + decode on a tiny built-in model) and
# `make test` (ruff + pytest). Both set up everything first (scripts/setup.sh, idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= builtin:tiny-llama

.PHONY: setup run test test-all lint bench

setup:
	@bash scripts/setup.sh

BACKEND ?= mooncake
PORT ?= 30000
ARGS ?=

run: setup
	$(VENV)/bin/pdserve launch --model $(MODEL) --transfer-backend $(BACKEND) --port $(PORT) $(ARGS)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

# every test, the slow ones too (tests marked slow are left out of `make test`, which CI runs)
test-all: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: setup
	$(PY) bench/engine.py
	$(PY) bench/transfer.py
	$(PY) bench/pipeline.py
	$(PY) bench/serve.py
	$(PY) bench/decode.py
