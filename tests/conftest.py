"""Fixtures: a fresh vhost per test, its environment, workers that stop themselves.

Every test that needs a broker carries the ``broker`` marker, so ``pytest -m
"not broker"`` runs the pure ones in seconds without RabbitMQ. A test gets it
from using one of BROKER_FIXTURES (``pytest_collection_modifyitems`` below), or
from ``pytestmark = pytest.mark.broker`` in a module whose tests reach the
broker, or start its processes, without those fixtures.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.settings import load
from service.topology import declare_on
from tests.helpers import REPO, Vhost, Worker, sweep_stale_vhosts
from tests.helpers.cluster import ClusterVhost, TestCluster, start_test_cluster, stop_test_cluster
from tests.helpers.redis import TestRedis

#: Fixtures that need the broker: a test using any of them is marked ``broker``.
BROKER_FIXTURES = frozenset({"vhost", "kit_env", "topology", "start_worker"})
#: Fixtures that need the 3-node test cluster: a test using any of them is marked ``cluster`` (and ``broker``).
CLUSTER_FIXTURES = frozenset({"cluster", "cluster_vhost", "cluster_env"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a broker fixture with ``broker``, and a cluster fixture with ``cluster``."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if CLUSTER_FIXTURES & names:
            item.add_marker(pytest.mark.cluster)
            item.add_marker(pytest.mark.broker)
        elif BROKER_FIXTURES & names:
            item.add_marker(pytest.mark.broker)


@pytest.fixture(scope="session", autouse=True)
def _no_vhosts_left_by_killed_runs() -> None:
    """A test run killed before its teardown leaves its vhosts; remove those older than a few hours."""
    sweep_stale_vhosts()


@pytest.fixture(scope="session")
def cluster() -> Iterator[TestCluster]:
    """A real 3-node RabbitMQ cluster (started once for the run, on ports 5701-5703), ended with the run.

    A test that stops or kills a node must start it again before it ends
    (``cluster.restore()`` starts every node that is down at once and waits
    until all run), and before its vhost is deleted: with a quorum member
    down, deleting the vhost hangs for a minute.
    """
    started, guard = start_test_cluster()
    yield started
    stop_test_cluster(started, guard)


@pytest.fixture
def cluster_vhost(cluster: TestCluster) -> Iterator[ClusterVhost]:
    """A fresh vhost on the test cluster, deleted after the test; every node is running when it starts."""
    cluster.wait_all_running()
    v = ClusterVhost(cluster)
    yield v
    v.delete()


@pytest.fixture
def cluster_env(cluster_vhost: ClusterVhost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The kit's environment on the test cluster: every node in KIT_BROKER_URL, the quorum profile.

    Deadlines are longer than ``kit_env``'s: a queue whose leader died elects another first.
    """
    return _test_environment(monkeypatch, tmp_path, KIT_BROKER_URL=cluster_vhost.url, KIT_QUEUE_TYPE="quorum",
                             KIT_PUBLISH_TIMEOUT="10", KIT_CONNECT_TIMEOUT="5")


def _test_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **values: str) -> dict[str, str]:
    """Set the tests' KIT_* settings (``values`` win) in this process; the environment for subprocesses."""
    settings = {
        "KIT_TASK_MODULES": "tests.worker_tasks",
        "KIT_TEST_OUTPUT_DIR": str(tmp_path),
        "KIT_STATE_DIR": str(tmp_path / "state"),
        "KIT_REPORT_DIR": str(tmp_path / "reports"),
        "KIT_RETRY_BACKOFF_BASE": "0.2",
        "KIT_RETRY_BACKOFF_MAX": "1",
        "KIT_MAX_RETRIES": "3",
        "KIT_PUBLISH_TIMEOUT": "5",
        "KIT_CONNECT_TIMEOUT": "2",
        "KIT_METRICS_PORT": "0",
        **values,
    }
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture
def vhost() -> Iterator[Vhost]:
    """A fresh, empty vhost on the real broker, deleted after the test."""
    v = Vhost()
    yield v
    v.delete()


@pytest.fixture
def kit_env(vhost: Vhost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment of the test and its subprocesses, pointing into the test's vhost.

    Retries are fast (backoff base 0.2 s) so retry paths finish in seconds.
    """
    return _test_environment(monkeypatch, tmp_path, KIT_BROKER_URL=vhost.url)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestRedis]:
    """Debian's ``redis-server`` for the whole run: a free port, no persistence, killed when the run ends."""
    server = TestRedis.start(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def result_backend(redis_server: TestRedis, kit_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, empty Redis database as the kit's result backend: ``KIT_RESULT_BACKEND`` for the test and its
    subprocesses (``kit_env``); returns its URL."""
    url = redis_server.url_for_test()
    monkeypatch.setenv("KIT_RESULT_BACKEND", url)
    kit_env["KIT_RESULT_BACKEND"] = url
    return url


@pytest.fixture
def topology(kit_env: dict[str, str]) -> None:
    """The kit's topology declared in the test's vhost."""
    declare_on(load())


@pytest.fixture
def start_worker(kit_env: dict[str, str], vhost: Vhost, topology: None) -> Iterator:
    """Start real worker processes; all are stopped when the test ends."""
    started: list[Worker] = []

    def start(**kwargs) -> Worker:
        worker = Worker(kit_env, **kwargs)
        started.append(worker)
        return worker.wait_ready(vhost)

    yield start
    for worker in started:
        worker.stop()
