"""Topology as code: idempotent declare, drift report, clear conflicts, and the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service import queues
from service.settings import load
from service.topology import TopologyConflict, connect, declare, verify
from tests.helpers import REPO


def run_cli(env, *args):
    return subprocess.run([sys.executable, "-m", "service", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_declare_is_idempotent_and_verify_finds_no_drift(kit_env):
    conn = connect(load())
    try:
        declare(conn)
        declare(conn)
        assert verify(conn) == []
    finally:
        conn.release()


def test_work_queues_are_priority_queues_that_dead_letter_into_their_own_queue():
    for queue in queues.WORK_QUEUES:
        assert queue.arguments["x-max-priority"] == queues.MAX_PRIORITY <= 5
        assert queue.arguments["x-dead-letter-exchange"] == queues.DEAD_LETTER_EXCHANGE
        assert queue.arguments["x-dead-letter-routing-key"] == queue.name
    per_work_queue = [q for q in queues.DEAD_LETTER_QUEUES if q.exchange == queues.DEAD_LETTER_EXCHANGE]
    assert {q.binding_key for q in per_work_queue} == set(queues.WORK_QUEUE_NAMES)
    # ... and unroutable.dead, behind the task exchange's alternate exchange.
    assert [q for q in queues.DEAD_LETTER_QUEUES if q not in per_work_queue] == [queues.UNROUTABLE]
    names = [q.name for q in queues.ALL_QUEUES]
    assert len(names) == len(set(names))


def test_verify_reports_a_missing_topology_without_creating_it(kit_env, vhost):
    result = run_cli(kit_env, "topology", "verify")
    assert result.returncode == 1
    assert "queue 'default' is missing" in result.stdout
    assert "Traceback" not in result.stderr
    with pytest.raises(Exception, match="NOT_FOUND"):
        vhost.counts("default")


def test_conflicting_arguments_are_named_with_the_fix(kit_env, vhost):
    conn = vhost.connection()
    arguments = dict(queues.work_queue("default").arguments, **{"x-max-priority": 10})
    conn.channel().queue_declare("default", durable=True, auto_delete=False, arguments=arguments)
    conn.close()
    kombu_conn = connect(load())
    try:
        with pytest.raises(TopologyConflict) as info:
            declare(kombu_conn)
        drift = verify(kombu_conn)
    finally:
        kombu_conn.release()
    assert (info.value.drift.name, info.value.drift.argument) == ("default", "x-max-priority")
    assert (info.value.drift.live, info.value.drift.wanted) == ("10", "3")
    assert any(d.name == "default" and d.argument == "x-max-priority" for d in drift)

    result = run_cli(kit_env, "topology", "declare")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for fragment in ("'default'", "x-max-priority=10", "x-max-priority=3", "delete_queue", "topology declare"):
        assert fragment in result.stderr


def test_cli_declare_then_verify(kit_env):
    declared = run_cli(kit_env, "topology", "declare")
    assert declared.returncode == 0, declared.stderr
    verified = run_cli(kit_env, "topology", "verify")
    assert verified.returncode == 0 and verified.stdout.startswith("ok:")


def test_cli_publish(kit_env, vhost, topology):
    result = run_cli(kit_env, "publish", "test.typed", "--args", "[1, 2]", "--priority", "high")
    assert result.returncode == 0, result.stderr
    [message] = vhost.drain("default")
    assert message.headers["id"] == result.stdout.strip()
    assert message.properties["priority"] == queues.PRIORITIES["high"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["publish", "x", "--args", "{"], "--args is not valid JSON"),
        (["publish", "x", "--kwargs", "[]"], "--kwargs must be a JSON object"),
        (["publish", "x", "--queue", "default.dead"], "Invalid value for '--queue'"),
        (["worker", "--queues", "default.dead"], "never published to or consumed directly"),
    ],
)
def test_cli_bad_input(kit_env, args, fragment):
    result = run_cli(kit_env, *args)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_broker_down(kit_env):
    env = dict(kit_env, KIT_BROKER_URL="pyamqp://guest:guest@127.0.0.1:1//", KIT_PUBLISH_TIMEOUT="1")
    result = run_cli(env, "publish", "test.record", "--args", '["x"]')
    assert result.returncode == 2
    assert result.stderr.startswith("error: the broker at pyamqp://guest:***@127.0.0.1:1//")
    assert "Traceback" not in result.stderr
