# The one entry point for every task. Each target builds its own virtual environment.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ORDERS ?= 10000
BROKER ?= sqlite
STORE  ?= sqlite

.PHONY: demo test test-unit test-integration bench bench-store bench-outbox lint format services-up services-down services-status clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -m pip install --quiet -e ".[test,lint,bench]"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)  ## the example shop on the embedded default, no servers needed
	$(PY) -m examples.shop --orders $(ORDERS)

test: $(STAMP)  ## every test; tests whose server is unreachable skip (fail with NERVUS_REQUIRE_SERVICES=1)
	$(PY) -m pytest -q

test-unit: $(STAMP)
	$(PY) -m pytest -q -m "not integration and not slow"

test-integration: $(STAMP)
	$(PY) -m pytest -q -m integration

bench: $(STAMP)  ## benchmarks; prints two JSON documents: the transport's, then the SQLite store's
	@$(PY) -m benchmarks.run --broker $(BROKER)
	@$(PY) -m benchmarks.store --store sqlite

bench-store: $(STAMP)  ## the event store against raw inserts and eventsourcing; one JSON document
	@$(PY) -m benchmarks.store --store $(STORE)

bench-outbox: $(STAMP)  ## the transactional outbox: transactions with and without it, the relay; one JSON document
	@$(PY) -m benchmarks.outbox --store $(STORE)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src tests examples benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests examples benchmarks
	$(VENV)/bin/ruff format src tests examples benchmarks

services-up:  ## install and start PostgreSQL, Redis, NATS, RabbitMQ and Kafka on 127.0.0.1
	bash scripts/services up

services-down:
	bash scripts/services down

services-status:
	bash scripts/services status

clean:
	rm -rf $(VENV) .nervus .pytest_cache .mypy_cache .ruff_cache
