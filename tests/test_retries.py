"""Retries wait in the broker, with backoff, and keep their priority."""

from __future__ import annotations

from service import queues
from service.client import Publisher, TaskRequest
from tests.helpers import wait_until
from tests.worker_tasks import recorded


def test_transient_failures_are_retried_until_success(vhost, kit_env, start_worker, tmp_path):
    start_worker()
    with Publisher() as p:
        p.publish("test.flaky", ["f1", 2])
    wait_until(lambda: recorded(tmp_path, "done") == ["f1"], 30, "the flaky task to succeed")
    assert recorded(tmp_path, "attempt") == ["f1:0", "f1:1", "f1:2"]
    assert vhost.depth("default.dead") == 0


def test_self_retry_countdown_is_honoured_by_a_wait_queue(vhost, kit_env, start_worker, tmp_path):
    start_worker()
    with Publisher() as p:
        p.publish("test.retry_countdown", ["c1"])
    wait_until(lambda: recorded(tmp_path, "done") == ["c1"], 30, "the retried task")
    first, second = (float(line.split(":")[2]) for line in recorded(tmp_path, "attempt"))
    # countdown=1.5 s, served by the 2 s tier; the bound leaves room for the
    # retry's confirmed publish and a dispatch on a loaded machine.
    assert 1.4 <= second - first < 8.0


def test_publish_with_countdown_waits_in_the_broker(vhost, kit_env, start_worker, tmp_path):
    start_worker()
    with Publisher() as p:
        p.publish("test.record", ["later"], countdown=3.0)
    assert vhost.depth("tasks.wait.4s") == 1  # 4 s gives the check room on a loaded machine
    wait_until(lambda: recorded(tmp_path, "done") == ["later"], 15, "the delayed task")


def test_two_thousand_tasks_in_backoff_stay_in_the_broker_across_a_restart(vhost, kit_env, start_worker, tmp_path):
    """Each task fails once and waits 32-64 s for its retry. During the wait the
    worker holds no more than its prefetch (2, a thousandth of what waits); a
    worker killed with -9 during the wait loses nothing: all 2,000 complete on a
    new worker."""
    total = 2_000
    # The backoff must outlast putting all 2,000 into it (one confirmed publish
    # each: 250-300 failures/s on 2 free cores, about 150/s on a loaded one).
    # Delays are drawn from 32-64 s (all in the 64 s tier), so filling must take
    # under 32 s: about 8 s on 2 free cores, 14 s on a loaded machine.
    shortest_wait = 32
    kit_env["KIT_RETRY_BACKOFF_BASE"] = str(2 * shortest_wait)
    kit_env["KIT_RETRY_BACKOFF_MAX"] = str(2 * shortest_wait)
    with Publisher() as p:
        p.publish_many(TaskRequest("test.flaky", [f"b{i}", 1], queue="bulk", priority="low") for i in range(total))
    worker = start_worker(queues=["bulk"], concurrency=2)
    waiting = [q.name for q in queues.WAIT_QUEUES]

    def in_backoff() -> int:
        return sum(vhost.depths(waiting).values())

    # Before the first retry can be due: past it, a full count could no longer be seen.
    wait_until(lambda: in_backoff() == total, shortest_wait - 2, "all tasks to wait for their retry", interval=0.5)
    assert vhost.depth(f"{queues.TASK_EXCHANGE}.wait.{2 * shortest_wait}s") == total  # one tier holds them all
    assert vhost.unacked("bulk") <= 2  # prefetch: concurrency 2 x multiplier 1
    assert vhost.depth("bulk") == 0 and recorded(tmp_path, "done") == []
    worker.kill()
    assert recorded(tmp_path, "done") == []  # killed during the wait: no retry had come back yet
    start_worker(queues=["bulk"], concurrency=2)
    wait_until(lambda: len(recorded(tmp_path, "done")) >= total, 300, f"{total} retried tasks to finish", interval=0.5)
    assert sorted(set(recorded(tmp_path, "done"))) == sorted(f"b{i}" for i in range(total))
    assert vhost.depth("bulk.dead") == 0
