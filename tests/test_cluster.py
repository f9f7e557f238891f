"""The kit on a real 3-node RabbitMQ cluster with the quorum profile: nothing lost when a node dies.

Every test runs in its own vhost on the session's cluster (the ``cluster``
fixture) and leaves every node running when it ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import amqp
import pytest

from service import queues
from service.client import Publisher, TaskRequest
from service.errors import BrokerUnavailable
from service.settings import load
from service.topology import declare_on
from tests.helpers import REPO, Worker, wait_until
from tests.helpers.cluster import ClusterVhost, TestCluster
from tests.worker_tasks import recorded

QUORUM = queues.topology("quorum")


@pytest.fixture
def quorum_topology(cluster_env: dict[str, str]) -> None:
    """The quorum topology declared in the test's vhost on the cluster."""
    declare_on(load())


@pytest.fixture
def cluster_worker(cluster_env: dict[str, str], cluster_vhost: ClusterVhost, quorum_topology: None) -> Iterator:
    """Start real workers on the cluster; all are stopped when the test ends."""
    started: list[Worker] = []

    def start(**kwargs) -> Worker:
        worker = Worker(cluster_env, **kwargs)
        started.append(worker)
        return worker.wait_ready(cluster_vhost, timeout=90)

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def restore_nodes(cluster: TestCluster, cluster_vhost: ClusterVhost) -> Iterator[TestCluster]:
    """The cluster, with every node started again (and running) after the test, whatever it did.

    Only the nodes that are down are started, all at once. It depends on
    ``cluster_vhost`` so that it ends first and the vhost is deleted with every
    node running: with a quorum member down, the management API's DELETE of the
    vhost hangs past its 30 s timeout on each node asked (a minute in all).
    """
    yield cluster
    cluster.restore()


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_quorum_profile_declares_replicated_queues_that_verify(cluster, cluster_vhost, cluster_env):
    done = _cli(cluster_env, "topology", "declare")
    assert done.returncode == 0, done.stderr
    assert "quorum queues" in done.stdout and "high lane" in done.stdout
    for queue in QUORUM.all_queues:
        info = cluster.queue_info(cluster_vhost.name, queue.name)
        assert info["type"] == "quorum", queue.name
        assert len(info["members"]) == 3, (queue.name, info["members"])
    assert cluster.queue_info(cluster_vhost.name, "default")["arguments"]["x-dead-letter-strategy"] == "at-least-once"
    done = _cli(cluster_env, "topology", "verify")
    assert done.returncode == 0, done.stdout + done.stderr
    # The classic profile against quorum queues: drift, with the way out.
    done = _cli({**cluster_env, "KIT_QUEUE_TYPE": "classic"}, "topology", "verify")
    assert done.returncode == 1
    assert "queue 'default' is a quorum queue on the broker, but KIT_QUEUE_TYPE=classic" in done.stdout
    assert "topology migrate --to classic" in done.stdout


def test_critical_task_overtakes_two_thousand_low_ones_on_quorum_queues(cluster_env, cluster_worker, tmp_path):
    with Publisher() as p:
        p.publish_many(TaskRequest("test.record", [f"low{i}"], priority="low") for i in range(2000))
        p.publish("test.record", ["CRITICAL"], priority="critical")
    start = time.monotonic()
    cluster_worker(queues=["default"], concurrency=2)
    wait_until(lambda: "CRITICAL" in recorded(tmp_path, "started"), 90, "the critical task to start")
    position = recorded(tmp_path, "started").index("CRITICAL")
    print(f"critical task started as number {position + 1}, {time.monotonic() - start:.1f}s after the worker")
    assert position < 20, f"critical task started after {position} low ones"


def _publish_in_threads(count: int, threads: int, confirmed: list[str], errors: list[BaseException]) -> None:
    def run(worker: int) -> None:
        with Publisher() as p:
            for i in range(worker, count, threads):
                marker = f"t{i}"
                try:
                    p.publish("test.record", [marker])
                except BrokerUnavailable as exc:  # not confirmed: not counted
                    errors.append(exc)
                    continue
                confirmed.append(marker)

    pool = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=600)


def test_kill_9_of_the_leader_while_publishing_and_consuming_loses_no_confirmed_task(
        restore_nodes, cluster_vhost, cluster_env, cluster_worker, tmp_path):
    cluster = restore_nodes
    cluster_worker(queues=["default"], concurrency=2)
    cluster_worker(queues=["default"], concurrency=2)
    leader = cluster.leader_of(cluster_vhost.name, "default")
    confirmed: list[str] = []
    errors: list[BaseException] = []
    publishing = threading.Thread(target=_publish_in_threads, args=(5000, 4, confirmed, errors))
    publishing.start()
    wait_until(lambda: len(confirmed) >= 1500, 120, "1,500 confirmed publishes")
    killed_at = time.monotonic()
    cluster.kill_node(leader)
    publishing.join(timeout=600)
    new_leader = cluster.leader_of(cluster_vhost.name, "default")
    assert new_leader != leader

    def accounted() -> bool:
        done = set(recorded(tmp_path, "done"))
        return all(marker in done for marker in confirmed)

    wait_until(accounted, 240, "every confirmed task to be done", interval=1)
    done = recorded(tmp_path, "done")
    lost = set(confirmed) - set(done)
    print(f"confirmed {len(confirmed)}, not confirmed {len(errors)}, done {len(set(done))} "
          f"({len(done) - len(set(done))} ran twice), lost {len(lost)}; leader {leader.name} killed "
          f"{killed_at:.0f}, new leader {new_leader.name}")
    assert not lost
    assert len(confirmed) + len(errors) == 5000
    assert len(confirmed) >= 4500, f"only {len(confirmed)} of 5000 publishes were confirmed: {errors[:3]}"
    assert cluster_vhost.depth(queues.dead_letter_queue_name("default")) == 0


def test_waiting_retries_and_dead_letters_survive_the_loss_of_any_node(
        restore_nodes, cluster_vhost, cluster_env, quorum_topology, tmp_path):
    cluster = restore_nodes
    with Publisher() as p:
        for i in range(20):
            p.publish("test.record", [f"later{i}"], countdown=6)
    conn = cluster_vhost.connection()
    try:
        channel = conn.channel()
        channel.confirm_select()
        for i in range(30):
            channel.basic_publish_confirm(amqp.Message(f"letter{i}".encode(), headers={"task": "test.record"}),
                                          queues.DEAD_LETTER_EXCHANGE, "default")
    finally:
        conn.close()
    wait_queue = f"{queues.TASK_EXCHANGE}.wait.8s"
    assert cluster_vhost.depth(wait_queue) == 20
    dead = queues.dead_letter_queue_name("default")
    assert cluster_vhost.depth(dead) == 30
    # Lose the node that leads the wait queue: the retries still expire into the work queue.
    victim = cluster.leader_of(cluster_vhost.name, wait_queue)
    cluster.kill_node(victim)
    wait_until(lambda: cluster_vhost.depth("default") == 20, 60, "the 20 waiting tasks to reach their work queue")
    assert cluster_vhost.depth(dead) == 30
    cluster.start_node(victim)
    cluster.wait_all_running()
    # And the node that leads the dead-letter queue.
    victim = cluster.leader_of(cluster_vhost.name, dead)
    cluster.kill_node(victim)
    wait_until(lambda: _depth_or_none(cluster_vhost, dead) == 30, 30, "the dead letters through the other nodes")
    bodies = sorted(m.body.decode() for m in cluster_vhost.drain(dead))
    assert bodies == sorted(f"letter{i}" for i in range(30))


def _depth_or_none(vhost: ClusterVhost, queue: str) -> int | None:
    try:
        return vhost.depth(queue)
    except Exception:  # noqa: BLE001 - a queue between leaders answers nothing for a moment
        return None


def test_without_a_majority_a_publish_fails_clearly_within_its_deadline(
        restore_nodes, cluster_vhost, cluster_env, quorum_topology, monkeypatch):
    cluster = restore_nodes
    monkeypatch.setenv("KIT_PUBLISH_TIMEOUT", "4")
    with Publisher() as p:
        p.publish("test.record", ["before"])
        survivor = cluster.nodes[0]
        cluster.stop_nodes(cluster.nodes[1:])
        start = time.monotonic()
        with pytest.raises(BrokerUnavailable) as raised:
            p.publish("test.record", ["no-majority"])
        took = time.monotonic() - start
    print(f"no majority: BrokerUnavailable after {took:.1f}s: {raised.value}")
    assert took < 4 + 3, f"the publish took {took:.1f}s, past its 4 s deadline"
    assert "did not accept" in str(raised.value) or "cannot" in str(raised.value)
    assert survivor.name  # the survivor still runs; the others come back in restore_nodes


def test_client_fails_over_to_another_node_within_its_deadline(restore_nodes, cluster_vhost, cluster_env,
                                                               quorum_topology, tmp_path):
    cluster = restore_nodes
    with Publisher() as p:
        p.publish("test.record", ["first"])
        # The node the client is connected to: the first of KIT_BROKER_URL.
        cluster.kill_node(cluster.nodes[0])
        start = time.monotonic()
        p.publish("test.record", ["after-failover"])
        took = time.monotonic() - start
    print(f"publish after kill -9 of the client's node confirmed in {took:.2f}s")
    assert took < float(load().publish_timeout)
    wait_until(lambda: cluster_vhost.depth("default") == 2, 30, "both tasks queued")


def test_dlq_list_and_replay_keep_their_promises_on_the_cluster(cluster_vhost, cluster_env, quorum_topology,
                                                                 tmp_path):
    with Publisher() as p:
        for i in range(10):
            p.publish("test.permanent", [f"p{i}"])
    # No worker on this vhost yet: run one that dead-letters them all.
    worker = Worker(cluster_env, queues=["default"])
    try:
        worker.wait_ready(cluster_vhost, timeout=90)
        dead = queues.dead_letter_queue_name("default")
        wait_until(lambda: cluster_vhost.depth(dead) == 10, 60, "ten dead letters")
    finally:
        worker.stop()
    listed = _cli(cluster_env, "dlq", "list", "--queue", "default", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert len(rows) == 10
    assert cluster_vhost.depth(dead) == 10  # listing changed nothing
    replayed = _cli(cluster_env, "dlq", "replay", "--queue", "default", "--limit", "4")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert cluster_vhost.depth(dead) == 6
    assert cluster_vhost.depth("default") == 4


def test_a_stopped_node_rejoins_and_catches_up(restore_nodes, cluster_vhost, cluster_env, quorum_topology):
    cluster = restore_nodes
    node = cluster.nodes[2]
    cluster.stop_node(node)
    with Publisher() as p:
        p.publish_many(TaskRequest("test.record", [f"m{i}"]) for i in range(200))
    cluster.start_node(node)
    cluster.wait_all_running()

    def caught_up() -> bool:
        info = cluster.queue_info(cluster_vhost.name, "default")
        return node.name in info.get("online", []) and _member_caught_up(cluster, node, cluster_vhost.name)

    wait_until(caught_up, 60, f"{node.name} to be an online, caught-up member of 'default'", interval=1)
    # Through the rejoined node alone, every message is there.
    conn = cluster_vhost.connection(node)
    try:
        assert conn.channel().queue_declare("default", passive=True)[1] == 200
    finally:
        conn.close()


def _member_caught_up(cluster: TestCluster, node, vhost: str) -> bool:
    """Whether ``node``'s copy of 'default' has the leader's commit index (``rabbitmq-queues quorum_status``)."""
    done = subprocess.run(["rabbitmq-queues", "-q", "-n", node.name, "quorum_status", "default", "--vhost", vhost,
                           "--formatter", "json"], capture_output=True, text=True, timeout=30,
                          env={**_env(), **node.environment()})
    if done.returncode != 0:
        return False
    rows = json.loads(done.stdout or "[]")
    indexes = {row.get("Node Name"): row.get("Commit Index") for row in rows}
    return len(indexes) == 3 and len(set(indexes.values())) == 1


def _env() -> dict[str, str]:
    return dict(os.environ)
