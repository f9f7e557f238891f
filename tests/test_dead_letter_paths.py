"""Every way a task can end badly lands in its dead-letter queue with the reason (issue 4a-4g)."""

from __future__ import annotations

from service import headers as h
from service.client import Publisher
from tests.helpers import wait_until
from tests.worker_tasks import recorded


def _dead_letters(vhost, queue="default", count=1, timeout=30):
    dlq = f"{queue}.dead"
    wait_until(lambda: vhost.depth(dlq) >= count, timeout, f"{count} dead letter(s) in {dlq}")
    return vhost.drain(dlq)


def test_retries_exhausted(vhost, kit_env, start_worker, tmp_path):
    start_worker()
    with Publisher() as p:
        task_id = p.publish("test.fail_always", ["m1"], priority="high")
    [dead] = _dead_letters(vhost)
    headers = dead.headers
    assert headers[h.REASON] == h.REASON_RETRIES_EXHAUSTED
    assert headers["id"] == task_id and headers["task"] == "test.fail_always"
    assert headers[h.EXCEPTION_TYPE] == "ConnectionError"
    assert "upstream unavailable for m1" in headers[h.EXCEPTION_MESSAGE]
    assert "ConnectionError" in headers[h.TRACEBACK]
    assert headers[h.ATTEMPTS] == 3  # first run + max_retries=2
    assert headers[h.SOURCE_QUEUE] == "default"
    assert headers[h.FIRST_FAILURE_AT] < headers[h.LAST_FAILURE_AT]
    assert dead.properties["priority"] == 2  # kept across retries
    assert recorded(tmp_path, "attempt") == ["m1:0", "m1:1", "m1:2"]


def test_permanent_error_is_not_retried(vhost, kit_env, start_worker, tmp_path):
    start_worker()
    with Publisher() as p:
        p.publish("test.permanent", ["p1"])
        p.publish("test.declared_permanent", ["p2"])
    dead = {m.headers["task"]: m.headers for m in _dead_letters(vhost, count=2)}
    assert dead["test.permanent"][h.REASON] == h.REASON_PERMANENT
    assert dead["test.permanent"][h.EXCEPTION_TYPE] == "service.errors.PermanentError"
    assert dead["test.declared_permanent"][h.REASON] == h.REASON_PERMANENT
    assert dead["test.declared_permanent"][h.EXCEPTION_TYPE] == "tests.worker_tasks.Unfixable"
    assert all(d[h.ATTEMPTS] == 1 for d in dead.values())
    assert sorted(recorded(tmp_path, "attempt")) == ["p1", "p2"]  # each ran exactly once


def test_a_declared_exception_that_cannot_be_pickled_is_still_not_retried(vhost, kit_env, start_worker, tmp_path):
    start_worker()
    with Publisher() as p:
        p.publish("test.unpicklable_permanent", ["u1"])
    [dead] = _dead_letters(vhost)
    assert dead.headers[h.REASON] == h.REASON_PERMANENT
    assert dead.headers[h.EXCEPTION_TYPE] == "tests.worker_tasks.CardDeclined"
    assert "card_declined: for u1" in dead.headers[h.EXCEPTION_MESSAGE]
    assert recorded(tmp_path, "attempt") == ["u1"]


def test_hard_time_limit_is_dead_lettered_not_requeued(vhost, kit_env, start_worker, tmp_path):
    worker = start_worker()
    with Publisher() as p:
        task_id = p.publish("test.sleep", ["t1"])
        p.publish("test.record", ["after"])
    [dead] = _dead_letters(vhost)
    assert dead.headers[h.REASON] == h.REASON_TIME_LIMIT
    assert dead.headers["id"] == task_id
    assert "TimeLimitExceeded" in dead.headers[h.EXCEPTION_TYPE]
    wait_until(lambda: "after" in recorded(tmp_path, "done"), 20, "the next task to run")
    # No requeue loop: the message ran once and nothing is left in the queue.
    assert recorded(tmp_path, "attempt") == ["t1"]
    assert vhost.counts("default") == (0, 1)
    assert vhost.depth("default.dead") == 0
    assert worker.process.poll() is None


def test_poison_message_that_kills_its_process(vhost, kit_env, start_worker, tmp_path):
    worker = start_worker()
    with Publisher() as p:
        p.publish("test.die", ["poison"])
    [dead] = _dead_letters(vhost, timeout=60)
    assert dead.headers[h.REASON] == h.REASON_WORKER_LOST
    assert dead.headers[h.WORKER_LOST] == 3  # KIT_MAX_WORKER_LOST default
    assert "WorkerLostError" in dead.headers[h.EXCEPTION_TYPE]
    assert recorded(tmp_path, "attempt") == ["poison"] * 3
    # The worker survived and still serves other tasks.
    with Publisher() as p:
        p.publish("test.record", ["still-serving"])
    wait_until(lambda: "still-serving" in recorded(tmp_path, "done"), 20, "a task after the poison")
    assert worker.process.poll() is None


def _raw_publish(vhost, body: bytes, content_type: str, headers: dict, queue: str = "default") -> None:
    import amqp

    conn = vhost.connection()
    try:
        channel = conn.channel()
        channel.confirm_select()
        channel.basic_publish_confirm(
            amqp.Message(body, content_type=content_type, application_headers=headers, delivery_mode=2),
            exchange="tasks", routing_key=queue,
        )
    finally:
        conn.close()


def test_undecodable_and_disallowed_bodies_are_dead_lettered(vhost, kit_env, start_worker, tmp_path):
    import pickle

    start_worker()
    garbage = bytes(range(256)) * 4
    pickled = pickle.dumps(([1], {}, {}))
    _raw_publish(vhost, garbage, "application/json", {"task": "test.record", "id": "garbage-json"})
    _raw_publish(vhost, pickled, "application/x-python-serialize", {"task": "test.record", "id": "pickled"})
    _raw_publish(vhost, garbage, "application/octet-stream", {})
    dead = _dead_letters(vhost, count=3)
    by_id = {m.headers.get("id", "none"): m for m in dead}
    assert by_id["garbage-json"].headers[h.REASON] == h.REASON_UNDECODABLE
    assert by_id["pickled"].headers[h.REASON] == h.REASON_CONTENT_DISALLOWED
    assert "application/x-python-serialize" in by_id["pickled"].headers[h.EXCEPTION_MESSAGE]
    assert by_id["none"].headers[h.REASON] == h.REASON_CONTENT_DISALLOWED  # octet-stream is not JSON
    # Bodies are kept byte for byte, so nothing is lost and they can be inspected.
    assert by_id["garbage-json"].body == garbage
    assert by_id["pickled"].body == pickled
    assert recorded(tmp_path, "started") == []  # none of them ran


def test_unknown_task_name(vhost, kit_env, start_worker):
    start_worker()
    with Publisher() as p:
        task_id = p.publish("no.such.task", [1, 2])
    [dead] = _dead_letters(vhost)
    assert dead.headers[h.REASON] == h.REASON_UNKNOWN_TASK
    assert dead.headers["id"] == task_id
    assert "no.such.task" in dead.headers[h.EXCEPTION_MESSAGE]


def test_arguments_that_do_not_fit_the_signature(vhost, kit_env, start_worker, tmp_path):
    start_worker()
    with Publisher() as p:
        p.publish("test.typed", [1, 2, 3])
        p.publish("test.typed", [1], {"c": 2})
        p.publish("test.typed", [1, 2])
    dead = _dead_letters(vhost, count=2)
    assert [d.headers[h.REASON] for d in dead] == [h.REASON_INVALID_ARGUMENTS] * 2
    assert all(d.headers[h.ATTEMPTS] == 1 for d in dead)  # not retried
    wait_until(lambda: recorded(tmp_path, "done") == ["1+2"], 10, "the well-formed call")
