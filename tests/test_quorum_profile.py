"""The quorum profile (KIT_QUEUE_TYPE=quorum) on one broker node: what it declares and how tasks move.

Quorum queues run on a single node too (one member), so what does not need
a second node is shown here, quickly; tests/test_cluster.py has the rest.
"""

from __future__ import annotations

import json
import subprocess
import sys

import amqp
import pytest

from service import queues
from service.client import Publisher
from service.settings import ConfigError, load
from service.topology import TopologyConflict, connect, declare, verify
from tests.helpers import REPO, management, wait_until
from tests.worker_tasks import recorded

QUORUM = queues.topology("quorum")


@pytest.fixture
def quorum(kit_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The test's environment with KIT_QUEUE_TYPE=quorum (list it before ``topology`` and ``start_worker``)."""
    monkeypatch.setenv("KIT_QUEUE_TYPE", "quorum")
    kit_env["KIT_QUEUE_TYPE"] = "quorum"
    return kit_env


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def _queue(vhost, name: str) -> dict:
    return management("GET", f"/api/queues/{vhost.name}/{name}")


def test_every_queue_of_the_quorum_profile_is_a_quorum_queue_that_dead_letters_at_least_once():
    for queue in QUORUM.all_queues:
        assert queue.arguments["x-queue-type"] == "quorum", queue.name
        assert "x-max-priority" not in queue.arguments, queue.name  # quorum queues refuse it
        if "x-dead-letter-exchange" in queue.arguments:
            assert queue.arguments["x-dead-letter-strategy"] == "at-least-once", queue.name
            assert queue.arguments["x-overflow"] == "reject-publish", queue.name
    for queue in QUORUM.work_queues + QUORUM.lanes:
        assert queue.arguments["x-delivery-limit"] == queues.DELIVERY_LIMIT
    assert [lane.name for lane in QUORUM.lanes] == [f"{n}.high" for n in queues.WORK_QUEUE_NAMES]
    # A lane dead-letters into its work queue's dead-letter queue.
    assert {lane.arguments["x-dead-letter-routing-key"] for lane in QUORUM.lanes} == set(queues.WORK_QUEUE_NAMES)
    assert QUORUM.routing_key("bulk", queues.PRIORITIES["critical"]) == "bulk.high"
    assert QUORUM.routing_key("bulk", queues.PRIORITIES["high"]) == "bulk.high"
    assert QUORUM.routing_key("bulk", queues.PRIORITIES["normal"]) == "bulk"
    assert queues.topology("classic").routing_key("bulk", queues.PRIORITIES["critical"]) == "bulk"
    assert QUORUM.consumed(["urgent"]) == ["urgent", "urgent.high"]
    with pytest.raises(ValueError, match="unknown queue type 'mirrored'"):
        queues.topology("mirrored")


def test_a_worker_lost_limit_at_or_over_the_delivery_limit_is_refused(monkeypatch):
    monkeypatch.setenv("KIT_QUEUE_TYPE", "quorum")
    monkeypatch.setenv("KIT_MAX_WORKER_LOST", str(queues.DELIVERY_LIMIT))
    with pytest.raises(ConfigError, match="must be below the quorum work queues' x-delivery-limit"):
        load()
    monkeypatch.setenv("KIT_QUEUE_TYPE", "classic")
    assert load().max_worker_lost == queues.DELIVERY_LIMIT


def test_declare_and_verify_know_the_profile_and_name_a_queue_of_the_wrong_type(quorum, vhost):
    done = _cli(quorum, "topology", "declare")
    assert done.returncode == 0, done.stderr
    assert "quorum queues (3 work, 3 high lane, 4 dead-letter, 13 wait)" in done.stdout
    assert _queue(vhost, "default.high")["type"] == "quorum"
    assert _cli(quorum, "topology", "verify").returncode == 0
    classic = dict(quorum, KIT_QUEUE_TYPE="classic")
    done = _cli(classic, "topology", "verify")
    assert done.returncode == 1
    assert "drift: queue 'urgent' is a quorum queue on the broker, but KIT_QUEUE_TYPE=classic wants a classic" \
        in done.stdout
    assert "topology migrate --to classic --dry-run" in done.stdout
    # A worker (or `topology declare`) of the other profile refuses to start, with the same fix.
    conn = connect(load())
    try:
        with pytest.raises(TopologyConflict, match="KIT_QUEUE_TYPE=classic wants a classic queue"):
            declare(conn, queues.topology("classic"))
        assert verify(conn, QUORUM) == []
    finally:
        conn.release()


def test_high_and_critical_tasks_go_to_the_lane_and_a_retry_comes_back_to_it(quorum, vhost, start_worker,
                                                                               tmp_path):
    with Publisher() as p:
        p.publish("test.record", ["n"], priority="normal")
        p.publish("test.record", ["c"], priority="critical")
        p.publish("test.record", ["h"], priority="high")
    assert vhost.depths(["default", "default.high"]) == {"default": 1, "default.high": 2}
    vhost.drain("default")
    vhost.drain("default.high")
    worker = start_worker(queues=["default"])
    assert vhost.counts("default.high")[1] == 1  # -Q default consumes its lane too
    with Publisher() as p:
        p.publish("test.flaky", ["lane-retry", 1], priority="critical")
    wait_until(lambda: recorded(tmp_path, "done") == ["lane-retry"], 30, "the retried critical task")
    assert recorded(tmp_path, "attempt") == ["lane-retry:0", "lane-retry:1"]
    assert worker.process.poll() is None


def test_the_delivery_limit_dead_letters_a_message_returned_too_often(quorum, vhost, topology):
    with Publisher() as p:
        p.publish("test.record", ["returned"])
    conn = vhost.connection()
    try:
        channel = conn.channel()
        got: list = []

        def fetched() -> bool:
            got[:] = [channel.basic_get("default")]
            return got[0] is not None

        for delivery in range(queues.DELIVERY_LIMIT + 1):
            wait_until(fetched, 10, f"delivery {delivery + 1} of the returned message", interval=0.05)
            channel.basic_reject(got[0].delivery_tag, requeue=True)
    finally:
        conn.close()
    wait_until(lambda: vhost.depth("default.dead") == 1, 15, "the message in default.dead")
    assert vhost.depth("default") == 0
    listed = _cli(quorum, "dlq", "list", "--queue", "default", "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert row["reason"] == "broker-delivery_limit"


def test_the_dlq_tools_read_a_quorum_dead_letter_queue_past_two_thousand_letters(quorum, vhost, topology):
    """A quorum queue serves a reader with no prefetch limit only 2,000 unacked messages; the tools set one."""
    conn = vhost.connection()
    try:
        channel = conn.channel()
        channel.confirm_select()
        for i in range(2500):
            channel.basic_publish(amqp.Message(f"letter{i}".encode(), application_headers={"task": "test.record"}),
                                  queues.DEAD_LETTER_EXCHANGE, "default")
        channel.basic_publish_confirm(amqp.Message(b"last", application_headers={"task": "test.record"}),
                                      queues.DEAD_LETTER_EXCHANGE, "default")
    finally:
        conn.close()
    wait_until(lambda: vhost.depth("default.dead") == 2501, 30, "2,501 letters in default.dead")
    assert _queue(vhost, "default.dead")["type"] == "quorum"
    listed = _cli(quorum, "dlq", "list", "--queue", "default", "--json")
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 2501
    assert vhost.depth("default.dead") == 2501  # listing changed nothing


def test_a_lane_task_parked_in_unroutable_is_replayed_into_its_work_queue(kit_env, vhost, topology):
    """After a move back to classic, a publisher still on quorum parks high tasks (key ``default.high``)."""
    conn = vhost.connection()
    try:
        channel = conn.channel()
        channel.confirm_select()
        channel.basic_publish_confirm(
            amqp.Message(b'[["x"], {}, {}]', application_headers={"task": "test.record", "id": "lane-1"},
                         content_type="application/json", content_encoding="utf-8", priority=3),
            queues.TASK_EXCHANGE, "default.high")
    finally:
        conn.close()
    wait_until(lambda: vhost.depth(queues.UNROUTABLE_QUEUE) == 1, 15, "the lane task parked in unroutable.dead")
    done = _cli(kit_env, "dlq", "replay", "--queue", "unroutable")
    assert done.returncode == 0, done.stdout + done.stderr
    assert vhost.depths(["default", queues.UNROUTABLE_QUEUE]) == {"default": 1, queues.UNROUTABLE_QUEUE: 0}
