"""Priorities under a backlog, and workers that die or are stopped mid-task."""

from __future__ import annotations

from service.client import Publisher, TaskRequest
from tests.helpers import wait_until
from tests.worker_tasks import recorded


def test_critical_task_overtakes_a_backlog_of_two_thousand(vhost, kit_env, start_worker, tmp_path, topology):
    with Publisher() as p:
        p.publish_many(TaskRequest("test.record", [f"low{i}"], priority="low") for i in range(2000))
        p.publish("test.record", ["CRITICAL"], priority="critical")
    start_worker(queues=["default"], concurrency=2)
    wait_until(lambda: "CRITICAL" in recorded(tmp_path, "started"), 60, "the critical task to start")
    position = recorded(tmp_path, "started").index("CRITICAL")
    assert position <= 4, f"critical task started after {position} low ones"


def test_kill_9_of_a_worker_mid_task_loses_nothing(vhost, kit_env, start_worker, tmp_path):
    worker = start_worker()
    with Publisher() as p:
        p.publish("test.record", ["survivor", 3.0])
    wait_until(lambda: "survivor" in recorded(tmp_path, "started"), 15, "the task to start")
    worker.kill()
    wait_until(lambda: vhost.depth("default") == 1, 15, "the unacked message to return to its queue")
    start_worker()
    wait_until(lambda: "survivor" in recorded(tmp_path, "done"), 30, "the task to complete on a new worker")
    assert recorded(tmp_path, "started") == ["survivor", "survivor"]  # at-least-once: ran again


def test_sigterm_lets_the_running_task_finish_and_keeps_the_rest(vhost, kit_env, start_worker, tmp_path):
    worker = start_worker(queues=["default"], concurrency=1)
    with Publisher() as p:
        p.publish("test.record", ["running", 2.0])
        p.publish_many(TaskRequest("test.record", [f"queued{i}"]) for i in range(5))
    wait_until(lambda: "running" in recorded(tmp_path, "started"), 15, "the slow task to start")
    assert worker.terminate(timeout=30) == 0
    assert "running" in recorded(tmp_path, "done")
    assert recorded(tmp_path, "started") == ["running"]
    wait_until(lambda: vhost.depth("default") == 5, 10, "the 5 queued tasks to remain queued")
