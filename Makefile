# salon-reports — the set-up commands. `make run` and `make test` provision everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
DEMO_BOOKINGS ?= 200000
# The write-path part of `make bench`: seconds per pgbench run and interleaved rounds
# (e.g. `make bench BENCH_WRITES_SECONDS=3 BENCH_WRITES_ROUNDS=1` for a quick look).
BENCH_WRITES_SECONDS ?= 8
BENCH_WRITES_ROUNDS ?= 3
# `make services REPLICA=1 PGBOUNCER=1 REDIS_CLUSTER=1` also starts a streaming replica of
# PostgreSQL, a PgBouncer in front of it and a Redis Cluster (see scripts/services.sh).
REPLICA ?= 0
PGBOUNCER ?= 0
REDIS_CLUSTER ?= 0

.PHONY: run test services services-for-tests stop lint bench bench-scaling loadtest chaos install ops-tools browser-tools clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

services:
	@REPLICA=$(REPLICA) PGBOUNCER=$(PGBOUNCER) REDIS_CLUSTER=$(REDIS_CLUSTER) scripts/services.sh start

# The tests also need a real streaming replica (tests/test_read_replica.py), a PgBouncer in
# transaction pooling mode (tests/test_pgbouncer.py) and a Redis Cluster
# (tests/test_redis_cluster.py).
services-for-tests:
	@REPLICA=1 PGBOUNCER=1 REDIS_CLUSTER=1 scripts/services.sh start

stop:
	@scripts/services.sh stop

# promtool, amtool, Prometheus and Alertmanager for the alert tests (Debian packages).
ops-tools:
	@scripts/ops-tools.sh

# Headless Chromium and its driver for the performance page's browser test (Debian packages).
browser-tools:
	@scripts/browser-tools.sh

run: install services
	@$(BIN)/salon-reports migrate
	@$(BIN)/salon-reports seed --if-empty --bookings $(DEMO_BOOKINGS) --salons 40 --days 400
	@scripts/banner.sh $(HOST) $(PORT)
	@$(BIN)/salon-reports serve --host $(HOST) --port $(PORT)

# The second pass runs the cache suite, the tenant-isolation tests (tenants' numbers under
# concurrency, tokens and their scopes, the admin clear's) and the chaos-Redis scenarios again
# with SR_TEST_REDIS_CLUSTER=1: against the Redis Cluster of services-for-tests (the chaos
# scenarios against a private cluster they kill a master of); tests that need a single Redis
# of their own are skipped there with their reason. The hostile-parameter and schema fuzzing
# tests of tests/security run once: they test the HTTP layer in front of the cache.
CLUSTER_TESTS := tests/test_cache.py tests/test_cache_contract.py tests/test_cache_faults.py \
	tests/security/test_isolation.py tests/security/test_tokens.py \
	tests/chaos/test_redis_faults.py

test: install services-for-tests ops-tools browser-tools
	$(BIN)/pytest
	SR_TEST_REDIS_CLUSTER=1 $(BIN)/pytest $(CLUSTER_TESTS)

lint: install
	$(BIN)/ruff check service telemetry tests benchmarks migrations
	$(BIN)/ruff format --check service telemetry tests benchmarks migrations
	$(BIN)/mypy

# Report queries vs the naive baseline (benchmarks/queries.py), then booking writes with the
# change stream vs a bare twin table under pgbench (benchmarks/writes.py). The dataset's size
# and database (benchmarks/dataset.py): `make bench BENCH_BOOKINGS=5000000
# BENCH_DATABASE=salon_reports_bench5m` measures the queries on 5 M bookings (built once, in its
# own database, beside the 1 M one).
BENCH_BOOKINGS ?= 1000000
BENCH_DATABASE ?= salon_reports_bench
bench: install services
	BENCH_BOOKINGS=$(BENCH_BOOKINGS) BENCH_DATABASE=$(BENCH_DATABASE) $(BIN)/python -m benchmarks.queries
	$(BIN)/python -m benchmarks.writes --seconds $(BENCH_WRITES_SECONDS) --rounds $(BENCH_WRITES_ROUNDS)

# The cold reports as data grows (benchmarks/scaling.py): database time of each report, busiest
# salon and platform-wide, median of 5 cold 365-day windows, at 1 M and 5 M bookings (each
# dataset built once; BENCH_SCALES=BOOKINGS:DATABASE,... to choose).
BENCH_SCALES ?= 1000000:salon_reports_bench,5000000:salon_reports_bench5m
bench-scaling: install services
	$(BIN)/python -m benchmarks.scaling --scales $(BENCH_SCALES)

loadtest: install services
	@scripts/load-tools.sh
	$(BIN)/python -m benchmarks.load
	$(BIN)/python -m benchmarks.noisy

# Faults under load (tests/chaos): Redis killed and slowed, PostgreSQL restarted, the pool run
# dry, SIGTERM, then nothing lost or leaked; figures in benchmarks/results/chaos-latest.json.
chaos: install services
	$(BIN)/pytest -m chaos tests/chaos

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
