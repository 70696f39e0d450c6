# outbox-relay developer entry points. Everything runs against real local services
# (PostgreSQL 15 + single-node Kafka, no Docker) that `make services` starts under .dev/.

SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ENV := . .dev/env &&
PYTEST_ARGS ?=

.PHONY: help venv services services-stop services-status demo test test-faults lint typecheck \
        bench bench-small tools clean

help:
	@echo "make demo          services up, migrate, sample app -> outbox -> relay -> Kafka consumer"
	@echo "make test          the whole test suite (unit, integration, faults, deployment)"
	@echo "make test-faults   only the fault-injection suite"
	@echo "make bench         benchmarks (BENCH_SCALE=small for a quick run)"
	@echo "make lint          ruff + mypy --strict"
	@echo "make services / services-stop"

$(BIN)/outbox-relay: pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

venv: $(BIN)/outbox-relay

services: venv
	bash scripts/services.sh up

services-stop:
	bash scripts/services.sh down

services-status:
	bash scripts/services.sh status

tools: venv
	bash scripts/install-tools.sh

demo: services
	$(ENV) $(BIN)/python examples/demo.py

test: services tools
	$(ENV) $(BIN)/pytest $(PYTEST_ARGS)

test-faults: services
	$(ENV) $(BIN)/pytest -m faults $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check outbox_relay tests benchmarks examples alembic
	$(BIN)/mypy --strict outbox_relay

typecheck: lint

bench: services
	$(ENV) $(BIN)/python -m benchmarks.run

bench-small: services
	$(ENV) BENCH_SCALE=small $(BIN)/python -m benchmarks.run

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
