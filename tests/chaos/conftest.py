"""Fixtures of the chaos suite: a private PostgreSQL cluster seeded once per session, a private
Redis per test, and the result entry each scenario writes to
``benchmarks/results/chaos-latest.json`` (with its outcome, also when it fails)."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from redis.cluster import RedisCluster

from service.db import migrate
from service.tools.seed import seed_database
from tests.chaos.harness import DATABASE, ChaosData, write_entry
from tests.chaos.servers import PostgresCluster, new_secret
from tests.support import (
    RedisClusterProcesses,
    RedisProcess,
    close_client,
    cluster_url,
    crossslot_errors,
    redis_cluster_processes,
    redis_process,
)

_CALL_REPORT = pytest.StashKey[pytest.TestReport]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, Any]:
    report = yield
    if report.when == "call":
        item.stash[_CALL_REPORT] = report
    return report


@pytest.fixture(scope="session")
def chaos_data() -> Iterator[ChaosData]:
    """A private cluster on a free port with a small seeded dataset; never the shared server."""
    cluster = PostgresCluster()
    try:
        cluster.init()
        cluster.start()
        cluster.create_database(DATABASE)
        migrate(cluster.url(DATABASE))
        seed_database(cluster.url(DATABASE), bookings=20_000, salons=6, days=200, seed=11)
        with psycopg.connect(cluster.dsn(DATABASE)) as connection:
            salons = [
                row[0] for row in connection.execute("SELECT id FROM salons ORDER BY id LIMIT 3")
            ]
        yield ChaosData(cluster, new_secret(), salons, datetime.now(UTC).date())
    finally:
        cluster.destroy()


@pytest.fixture
def database(chaos_data: ChaosData) -> ChaosData:
    """The private cluster, running (a scenario that stopped it and failed left it down)."""
    if not chaos_data.cluster.running:
        chaos_data.cluster.start()
    return chaos_data


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    with redis_process() as server:
        yield server


@pytest.fixture
def redis_under_test() -> Iterator[RedisProcess | RedisClusterProcesses]:
    """The Redis of the Redis scenarios: a private single server, or with
    ``SR_TEST_REDIS_CLUSTER=1`` (the cluster pass of ``make test``) a private Redis Cluster of
    3 masters and 3 replicas."""
    if cluster_url() is None:
        with redis_process() as server:
            yield server
    else:
        with redis_cluster_processes() as cluster:
            yield cluster
            client = RedisCluster.from_url(cluster.url)
            try:
                # On every node (a restarted one counts from its restart).
                assert crossslot_errors(client) == {}  # type: ignore[arg-type]
            finally:
                close_client(client)  # type: ignore[arg-type]


@pytest.fixture
def chaos_result(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """The scenario fills this in; it is written with the test's outcome at teardown."""
    entry: dict[str, Any] = {}
    yield entry
    report = request.node.stash.get(_CALL_REPORT, None)
    outcome = "passed" if report is not None and report.passed else "failed"
    if report is not None and report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        entry["failure"] = str(getattr(crash, "message", "failed"))[:500]
    name = entry.pop("name", request.node.name)
    write_entry(name, {**entry, "outcome": outcome})
