"""Cancel (``service.status.revoke``, ``python -m service task cancel``) on real workers and a real Redis:
a cancelled task that waits in its queue, in a retry's wait queue or for its countdown never runs, also
across a worker restart, and ends revoked and dead-lettered with reason ``revoked``; a replay runs it."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
import redis

from service import headers as h
from service.errors import ResultBackendUnavailable
from service.status import revoke
from service.status.store import revoke_key
from tests.helpers import REPO, Vhost, wait_until
from tests.helpers.status import STATUS_TASK_MODULES, publish, run_cli, wait_state
from tests.worker_tasks import recorded


@pytest.fixture
def status_env(kit_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The test environment with the status tests' tasks loaded by the workers."""
    monkeypatch.setenv("KIT_TASK_MODULES", STATUS_TASK_MODULES)
    kit_env["KIT_TASK_MODULES"] = STATUS_TASK_MODULES
    return kit_env


def test_cancelled_tasks_never_run_across_a_worker_restart_and_a_replay_runs_one(
        result_backend, status_env, start_worker, vhost: Vhost, tmp_path):
    first = start_worker()
    retried = publish("test.status_retry_later", "wait1", 3)
    wait_state(retried, "retrying")  # its first run asked for a retry in 3 s: it waits in the broker
    assert first.terminate() == 0
    queued = publish("test.record", "queued1")
    later = publish("test.record", "later1", countdown=4)
    wait_state(queued, "queued", timeout=10)

    cancelled = run_cli(status_env, "task", "cancel", queued)
    assert cancelled.returncode == 0 and cancelled.stdout.startswith(f"{queued}: revoked"), cancelled.stdout
    for task_id in (retried, later):
        assert revoke(task_id).state == "revoked"

    start_worker()  # a new worker process: Celery's in-memory revoke list would be empty here
    wait_until(lambda: vhost.depth("default.dead") == 3, 30, "the three cancelled tasks to be dead-lettered")
    marks = redis.Redis.from_url(result_backend)
    for task_id in (queued, retried, later):
        ended = wait_state(task_id, "revoked")
        assert (ended.reason, ended.dead_letter_queue, ended.replayable) == (h.REASON_REVOKED, "default.dead", True)
        assert ended.worker and ended.final
        # Dead-lettered: the mark (ten years and more until then) is kept one KIT_RESULT_EXPIRES more.
        wait_until(lambda i=task_id: 0 < marks.ttl(revoke_key(i)) <= 86400, 10, f"the mark of {task_id} to shorten")
    assert {"queued1", "later1"}.isdisjoint(recorded(tmp_path, "started"))
    assert [a for a in recorded(tmp_path, "attempt") if a.startswith("wait1:")] == ["wait1:0"]

    listed = run_cli(status_env, "dlq", "list", "--queue", "default", "--reason", "revoked", "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted((row["id"], row["reason"]) for row in json.loads(listed.stdout)) == sorted(
        (task_id, h.REASON_REVOKED) for task_id in (queued, retried, later))

    replay = run_cli(status_env, "dlq", "replay", "--queue", "default", "--id", queued)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert wait_state(queued, "succeeded").result == "queued1"  # the replay cleared the cancel
    assert recorded(tmp_path, "done").count("queued1") == 1


def test_celery_terminate_of_a_running_task_ends_it_revoked_and_dead_lettered_once(
        result_backend, status_env, start_worker, vhost: Vhost, tmp_path):
    """Celery's own revoke(terminate=True) (Flower's Terminate) kills the run; Celery would ack it away and
    leave the state running: the worker dead-letters it as revoked, once."""
    from celery import Celery

    worker = start_worker()
    marker = uuid.uuid4().hex[:8]
    task_id = publish("test.status_steps", marker)
    wait_state(task_id, "running")
    control = Celery("kit-test-control", broker=status_env["KIT_BROKER_URL"], set_as_current=False)
    try:
        control.control.revoke(task_id, terminate=True)
    finally:
        control.close()
    ended = wait_state(task_id, "revoked")
    assert (ended.reason, ended.dead_letter_queue) == (h.REASON_REVOKED, "default.dead"), ended
    assert ended.error == "Revoked: terminated by Celery's revoke(terminate=True) while it ran"
    listed = run_cli(status_env, "dlq", "list", "--queue", "default", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(row["id"], row["reason"]) for row in json.loads(listed.stdout)] == [(task_id, h.REASON_REVOKED)]
    assert "was terminated: dead-lettering it" in worker.log()
    assert recorded(tmp_path, "started") == [marker]  # ran once, and not again


@pytest.mark.parametrize("backend", ["", "db+sqlite:///results.db"])
def test_cancel_needs_a_redis_result_backend(monkeypatch, backend):
    monkeypatch.setenv("KIT_RESULT_BACKEND", backend)
    with pytest.raises(ResultBackendUnavailable, match="needs a Redis result backend.*KIT_RESULT_BACKEND"):
        revoke("some-id")
    done = subprocess.run([sys.executable, "-m", "service", "task", "cancel", "some-id"], cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "KIT_RESULT_BACKEND" in lines[0], done.stderr
