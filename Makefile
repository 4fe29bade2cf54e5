# One command runs the service, one runs every test.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install up test lint unit integration e2e faults migrate check-services validate bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Run the API (:8501), the event-source bridge with the worker, and the fake provider (:8600).
up: install
	$(BIN)/python -m local.up

migrate: install
	$(BIN)/python -m ai_rate_limiter.migrate

check-services: install
	$(BIN)/python -m local.services_check

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy layers/common functions local

validate: install
	$(BIN)/cfn-lint template.yaml

## Every tier against the local PostgreSQL, Redis and RabbitMQ.
test: install lint validate check-services
	$(BIN)/python -m pytest tests/unit tests/integration tests/e2e tests/faults

unit: install
	$(BIN)/python -m pytest tests/unit

integration: install check-services
	$(BIN)/python -m pytest tests/integration

e2e: install check-services
	$(BIN)/python -m pytest tests/e2e

## The fault tests alone; their figures land in faults-results.json.
faults: install check-services
	$(BIN)/python -m pytest tests/faults

## The benchmark: a table, and bench-results.json at the repository root.
bench: install check-services
	$(BIN)/python -m local.bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
