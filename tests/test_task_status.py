"""Task status on real workers, a real Redis (tests/helpers/redis.py) and RabbitMQ: every state, as
``service.status.status`` and ``python -m service task status`` report it; without a backend, what the
broker shows; with a Redis that does not answer, one line and no hang."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import amqp
import pytest
import redis

from service import headers as h
from service.client import Publisher, TaskRequest
from service.errors import InvalidTaskInput, ResultBackendUnavailable
from service.settings import ConfigError, load
from service.status import STATES, TaskStatus, check_task_id, status
from service.status.lookup import from_meta
from service.status.store import KEY_PREFIX
from tests.helpers import Vhost, wait_until
from tests.helpers.status import STATUS_TASK_MODULES, publish, run_cli, wait_state
from tests.status_tasks import go_ahead
from tests.worker_tasks import recorded


@pytest.fixture
def status_env(kit_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The test environment with the status tests' tasks loaded by the workers."""
    monkeypatch.setenv("KIT_TASK_MODULES", STATUS_TASK_MODULES)
    kit_env["KIT_TASK_MODULES"] = STATUS_TASK_MODULES
    return kit_env


# -- pure: the model, ids, the stored meta, the settings ------------------------------------------


def test_a_status_is_json_safe_and_knows_its_final_states():
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    found = TaskStatus("t1", "retrying", attempt=2, due_at=moment, progress={"x": object()}, source="backend")
    data = found.to_dict()
    assert json.loads(json.dumps(data))["due_at"] == "2026-01-02T03:04:05+00:00"
    assert data["progress"]["x"].startswith("<object") and data["final"] is False
    assert [s for s in STATES if TaskStatus("t", s).final] == ["succeeded", "dead-lettered", "expired", "revoked"]
    with pytest.raises(ValueError, match="unknown task state"):
        TaskStatus("t", "failed")


@pytest.mark.parametrize("bad", ["", "a b", "x" * 256, None, 12, "é"])
def test_a_malformed_task_id_is_refused(bad):
    with pytest.raises(InvalidTaskInput):
        check_task_id(bad)


def test_celery_states_written_elsewhere_map_to_the_kit_states():
    failure = {"status": "FAILURE", "result": {"exc_type": "ValueError", "exc_message": ["bad"]}}
    assert (from_meta("t", failure, False).state, from_meta("t", failure, False).error) == (
        "dead-lettered", "ValueError: bad")
    custom = from_meta("t", {"status": "UPLOADING", "result": {"part": 3}}, False)
    assert (custom.state, custom.progress) == ("progress", {"part": 3}) and "UPLOADING" in custom.note
    assert from_meta("t", None, True).state == "revoked"
    assert "cancel asked while it runs" in from_meta("t", {"status": "STARTED", "result": {}}, True).note


@pytest.mark.parametrize("url, fragment", [
    ("foo://x", "not a result backend URL Celery knows"),
    ("redis:///0", "names no host"),
    ("redis://h/zero", "database number"),
    ("rediss://h:6380/0", "ssl_cert_reqs"),
    ("redis://:secret@h:99999/0", "port"),
])
def test_a_bad_result_backend_url_is_one_line(monkeypatch, url, fragment):
    monkeypatch.setenv("KIT_RESULT_BACKEND", url)
    with pytest.raises(ConfigError, match=fragment) as caught:
        load()
    assert "secret" not in str(caught.value)


def test_celery_is_configured_from_the_result_backend_setting(monkeypatch):
    from service.status.backend import KitRedisBackend, celery_config

    monkeypatch.setenv("KIT_RESULT_BACKEND", "")
    assert celery_config(load())["task_ignore_result"] is True
    monkeypatch.setenv("KIT_RESULT_BACKEND", "redis://127.0.0.1:6379/3")
    monkeypatch.setenv("KIT_RESULT_EXPIRES", "600")
    config = celery_config(load())
    assert config["result_backend"].endswith("+redis://127.0.0.1:6379/3") and KitRedisBackend.__name__ in (
        config["result_backend"])
    assert (config["task_ignore_result"], config["task_track_started"], config["result_expires"]) == (
        False, True, 600)
    monkeypatch.setenv("KIT_RESULT_BACKEND", "db+sqlite:///results.db")
    assert celery_config(load())["result_backend"] == "db+sqlite:///results.db"


# -- on real workers ----------------------------------------------------------------------------


def test_a_task_is_unknown_queued_running_in_progress_then_succeeded(result_backend, status_env, start_worker,
                                                                     tmp_path):
    assert status(str(uuid.uuid4())).state == "unknown"
    marker = uuid.uuid4().hex[:8]
    task_id = publish("test.status_steps", marker)
    queued = wait_state(task_id, "queued", timeout=10)  # the publisher records it; no worker runs yet
    assert (queued.name, queued.source) == ("test.status_steps", "backend")

    worker = start_worker()
    running = wait_state(task_id, "running")
    assert running.worker and running.worker.startswith(worker.name.split("@")[0] + "@")
    assert running.attempt == 1 and running.name == "test.status_steps"
    go_ahead(tmp_path, marker, "started")
    progress = wait_state(task_id, "progress")
    assert progress.progress == {"done": 1, "total": 2, "marker": marker} and progress.worker == running.worker
    go_ahead(tmp_path, marker, "progressed")
    done = wait_state(task_id, "succeeded")
    assert done.result == {"marker": marker, "rows": 2} and done.final and done.updated_at is not None

    shown = run_cli(status_env, "task", "status", task_id, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["state"] == "succeeded"
    watched = run_cli(status_env, "task", "status", task_id, "--watch", "--interval", "0.1")
    assert watched.returncode == 0 and watched.stdout.startswith(f"{task_id}: succeeded"), watched.stdout
    cancelled = run_cli(status_env, "task", "cancel", task_id)
    assert cancelled.returncode == 1 and "already succeeded" in cancelled.stdout, cancelled.stdout


def test_retrying_dead_lettered_worker_lost_expired_then_replayed(result_backend, status_env, kit_env,
                                                                  start_worker, vhost: Vhost, monkeypatch):
    kit_env["KIT_MAX_WORKER_LOST"] = "1"  # a process killed once is poison: dead-lettered at once
    worker = start_worker()
    waiting = publish("test.status_retry_later", "w1", 30)
    permanent = publish("test.permanent", "p1")
    poison = publish("test.die", "d1")
    with Publisher() as publisher:
        past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
        [expired] = publisher.publish_many([TaskRequest("test.record", ["e1"], extra_headers={"expires": past})])

    retrying = wait_state(waiting, "retrying")
    assert retrying.attempt == 1 and retrying.error == "ConnectionError: w1 not reachable yet"
    assert retrying.due_at is not None and 20 < (retrying.due_at - datetime.now(UTC)).total_seconds() <= 30

    dead = wait_state(permanent, "dead-lettered")
    assert (dead.reason, dead.dead_letter_queue, dead.replayable) == (h.REASON_PERMANENT, "default.dead", True)
    assert dead.error == "service.errors.PermanentError: recipient p1 does not exist"
    assert dead.worker == retrying.worker
    lost = wait_state(poison, "dead-lettered")
    assert lost.reason == h.REASON_WORKER_LOST
    gone = wait_state(expired, "expired")
    assert (gone.reason, gone.dead_letter_queue) == (h.REASON_EXPIRED, "default.dead")
    wait_until(lambda: vhost.depth("default.dead") == 3, 30, "three dead letters")

    # Celery's own FAILURE/REVOKED writes (the pool's trace, the main process's worker-lost and expiry
    # handling) come before or after the kit's; none is left as the final state.
    stored = redis.Redis.from_url(result_backend)
    assert [json.loads(stored.get(KEY_PREFIX + i))["status"] for i in (permanent, poison, expired)] == [
        "DEAD-LETTERED", "DEAD-LETTERED", "EXPIRED"]

    assert worker.terminate() == 0  # the replayed task stays in its queue: replayed is what status says
    replay = run_cli(kit_env, "dlq", "replay", "--queue", "default", "--id", permanent)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    replayed = status(permanent)
    assert replayed.state == "replayed" and replayed.name == "test.permanent"
    assert vhost.depth("default") == 1


def test_without_a_backend_status_reports_dead_letters_and_waits_and_says_what_it_cannot_know(
        status_env, start_worker, vhost: Vhost, monkeypatch):
    monkeypatch.setenv("KIT_RESULT_BACKEND", "")
    start_worker()
    permanent = publish("test.permanent", "p2")
    waiting = publish("test.status_retry_later", "w2", 30)
    wait_until(lambda: vhost.depth("default.dead") == 1 and recorded_attempt(status_env, "w2"), 30,
               "a dead letter and a waiting retry")

    dead = status(permanent)
    assert (dead.state, dead.source, dead.reason, dead.dead_letter_queue) == (
        "dead-lettered", "broker", h.REASON_PERMANENT, "default.dead")
    assert dead.replayable and dead.name == "test.permanent" and "KIT_RESULT_BACKEND" in dead.note
    retrying = wait_until(lambda: (s := status(waiting)).state == "retrying" and s, 10, "the retry to wait")
    assert retrying.source == "broker" and retrying.attempt == 1 and retrying.due_at is not None
    assert retrying.error == "ConnectionError: w2 not reachable yet"

    unknown = status(str(uuid.uuid4()))
    assert (unknown.state, unknown.source) == ("unknown", "broker")
    assert "queued, running, done" in unknown.note and "cannot tell" in unknown.note
    assert vhost.depth("default.dead") == 1  # looked at, not taken

    shown = run_cli(dict(status_env, KIT_RESULT_BACKEND=""), "task", "status", permanent)
    assert shown.returncode == 0 and f"{permanent}: dead-lettered" in shown.stdout and "source: broker" in (
        shown.stdout)


def recorded_attempt(env: dict[str, str], marker: str) -> bool:
    from pathlib import Path

    return f"{marker}:0" in recorded(Path(env["KIT_TEST_OUTPUT_DIR"]), "attempt")


@pytest.fixture
def silent_redis() -> Iterator[str]:
    """A Redis URL whose server accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    finally:
        server.close()


def test_a_result_backend_that_does_not_answer_is_one_line_not_a_hang(kit_env, silent_redis, monkeypatch):
    env = dict(kit_env, KIT_RESULT_BACKEND=silent_redis, KIT_CONNECT_TIMEOUT="1")
    for command in (["task", "status", "some-id"], ["task", "cancel", "some-id"],
                    ["task", "status", "some-id", "--watch"]):
        started = time.monotonic()
        done = run_cli(env, *command)
        assert done.returncode == 2 and time.monotonic() - started < 15
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: the result backend") and "1s" in lines[0], lines
    monkeypatch.setenv("KIT_RESULT_BACKEND", silent_redis)
    monkeypatch.setenv("KIT_CONNECT_TIMEOUT", "1")
    with pytest.raises(ResultBackendUnavailable, match="is Redis running"):
        status("some-id")


def test_workers_and_publishers_go_on_when_the_result_backend_is_down(status_env, start_worker, vhost: Vhost,
                                                                      tmp_path, monkeypatch):
    with socket.socket() as probe:  # a port nothing listens on: connections are refused
        probe.bind(("127.0.0.1", 0))
        closed = f"redis://127.0.0.1:{probe.getsockname()[1]}/0"
    status_env["KIT_RESULT_BACKEND"] = closed
    monkeypatch.setenv("KIT_RESULT_BACKEND", closed)
    worker = start_worker()
    publish("test.record", "r1")
    publish("test.permanent", "p3")
    publish("test.flaky", "f1", 1)
    wait_until(lambda: {"r1", "f1"} <= set(recorded(tmp_path, "done")) and vhost.depth("default.dead") == 1, 30,
               "the tasks to run, retry and dead-letter without a result backend")
    assert recorded(tmp_path, "done").count("r1") == 1  # not re-run over a failed state write
    assert "could not store state" in worker.log() or "could not record" in worker.log()


def test_publishers_mark_queued_in_the_background_without_overwriting_a_later_state(result_backend):
    from service.status import QueuedMarker
    from service.status.store import StateStore

    marker = QueuedMarker(load())
    store = StateStore.from_settings(load())
    assert store is not None and store.record("ran-first", "STARTED", {"hostname": "w1@h"})
    for task_id in ("q1", "q2", "ran-first"):
        marker.add(task_id, "test.record")
    assert marker.flush(5)
    assert [status(i).state for i in ("q1", "q2", "ran-first")] == ["queued", "queued", "running"]

    child = os.fork()
    if child == 0:  # a forked web worker: its own thread and list
        marker.add("from-child", "test.record")
        os._exit(0 if marker.flush(5) else 1)
    _, code = os.waitpid(child, 0)
    assert os.WEXITSTATUS(code) == 0 and status("from-child").state == "queued"


def test_async_status_and_cancel(result_backend):
    from service.status import arevoke, astatus

    async def both() -> tuple[TaskStatus, TaskStatus, TaskStatus]:
        return await astatus("a1"), await arevoke("a1"), await astatus("a1")

    before, cancelled, after = asyncio.run(both())
    assert (before.state, cancelled.state, after.state) == ("unknown", "revoked", "revoked")
    assert "dead-letters it as revoked" in after.note


def test_without_a_backend_only_the_first_messages_of_a_long_queue_are_searched(kit_env, topology, vhost: Vhost,
                                                                               monkeypatch):
    from service.status import broker as broker_lookup

    monkeypatch.setenv("KIT_RESULT_BACKEND", "")
    monkeypatch.setattr(broker_lookup, "SCAN_LIMIT", 2)
    conn = vhost.connection()
    try:
        channel = conn.channel()
        channel.confirm_select()
        for number in range(3):
            channel.basic_publish_confirm(amqp.Message(b"[[], {}, {}]", application_headers={
                "id": f"dead-{number}", "task": "test.record", h.REASON: h.REASON_PERMANENT}, delivery_mode=2),
                "tasks.dead", "default")
    finally:
        conn.close()
    assert status("dead-1").state == "dead-lettered"
    missed = status("dead-2")
    assert missed.state == "unknown" and "only the first 2 messages of default.dead were searched" in missed.note
    assert vhost.depth("default.dead") == 3


# -- marks, replays, the broker behind the backend, other backends, config ------------------------


def test_cancel_marks_outlive_the_longest_countdown_until_the_worker_dead_letters_the_task(result_backend):
    from service.status.store import MARK_EXPIRES_S, StateStore, revoke_key
    from service.task_message import MAX_COUNTDOWN_S

    store = StateStore.from_settings(load())
    assert store is not None and MARK_EXPIRES_S == MAX_COUNTDOWN_S
    store.cancel("waits-long", {"reason": "revoked"})
    store.set_mark("runs-now")
    stored = redis.Redis.from_url(result_backend)
    for task_id in ("waits-long", "runs-now"):
        assert MAX_COUNTDOWN_S < stored.ttl(revoke_key(task_id)) <= MAX_COUNTDOWN_S + 86400
    assert store.end_mark("waits-long")  # dead-lettered as revoked: a redelivery is still stopped a day long
    assert 0 < stored.ttl(revoke_key("waits-long")) <= 86400
    store._paused_until = time.monotonic() + 60  # a write failed a moment ago: the cancel check still asks
    assert store.has_mark("waits-long") is True and store.has_mark("never-cancelled") is False


def test_the_cancel_check_asks_every_time_with_its_own_short_timeout(silent_redis, caplog):
    from service.status.store import MARK_CHECK_TIMEOUT_S, StateStore

    store = StateStore(silent_redis, 86400, timeout=5.0)
    for _ in range(2):  # not paused after the first failure: asked again, and again within the short timeout
        started = time.monotonic()
        assert store.has_mark("t1") is None
        assert time.monotonic() - started < MARK_CHECK_TIMEOUT_S + 1
    assert caplog.text.count("could not check the cancel mark of task t1") == 2


def test_a_replay_never_overwrites_a_state_a_worker_wrote_after_it_started(result_backend):
    from service.status.store import DEAD_LETTERED, StateStore, now_iso

    store = StateStore.from_settings(load())
    assert store is not None
    store.record("dead-before", DEAD_LETTERED, {"reason": "permanent-error"})
    started = now_iso()  # the replay's publish starts here
    store.record("dead-again", DEAD_LETTERED, {"reason": "permanent-error"})  # a worker ran it and it failed again
    assert store.record_replayed([("dead-before", "test.permanent"), ("dead-again", "test.permanent")], started)
    assert (status("dead-before").state, status("dead-again").state) == ("replayed", "dead-lettered")


def _dead_letter_in_broker(vhost: Vhost, task_id: str) -> None:
    conn = vhost.connection()
    try:
        channel = conn.channel()
        channel.confirm_select()
        channel.basic_publish_confirm(amqp.Message(b"[[], {}, {}]", application_headers={
            "id": task_id, "task": "test.record", h.REASON: h.REASON_PERMANENT}, delivery_mode=2),
            "tasks.dead", "default")
    finally:
        conn.close()


def test_with_a_backend_a_task_it_has_no_record_of_is_looked_for_in_the_broker(result_backend, topology,
                                                                                 vhost: Vhost):
    _dead_letter_in_broker(vhost, "old-dead")  # its record in the backend expired long ago
    found = status("old-dead")
    assert (found.state, found.source, found.reason, found.dead_letter_queue) == (
        "dead-lettered", "broker", h.REASON_PERMANENT, "default.dead")
    assert "no record in the result backend" in found.note
    missing = status(str(uuid.uuid4()))
    assert (missing.state, missing.source) == ("unknown", "backend")
    assert "KIT_RESULT_EXPIRES" in missing.note and "no dead letter or waiting retry has this id either" in (
        missing.note)
    assert vhost.depth("default.dead") == 1  # looked at, not taken


def test_a_rejected_dead_letter_is_recorded_as_the_broker_shows_it(result_backend, monkeypatch):
    from service.status import recorder

    monkeypatch.setattr(recorder, "_store_pid", 0)  # this test's backend, not the one of an earlier test
    monkeypatch.setattr(recorder, "_store", None)
    headers = {"id": "rejected-1", "task": "test.record"}
    failure = {"exception_type": "Revoked", "exception_message": "cancelled", "attempts": 1}
    recorder.record_dead_lettered(headers, h.REASON_REVOKED, failure, "default", published=False)
    found = status("rejected-1")
    assert (found.state, found.reason, found.dead_letter_queue) == ("revoked", "broker-rejected", "default.dead")
    assert found.note.startswith(f"dead-lettered as {h.REASON_REVOKED}, but the dead letter could not be published")


def test_another_backend_that_hangs_is_one_line_within_the_deadline(monkeypatch, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    os.mkfifo(results / "celery-task-meta-hangs")  # opening it for reading waits for a writer: forever
    monkeypatch.setenv("KIT_RESULT_BACKEND", f"file://{results}")
    monkeypatch.setenv("KIT_CONNECT_TIMEOUT", "1")
    started = time.monotonic()
    try:
        with pytest.raises(ResultBackendUnavailable, match=r"did not answer within 1s") as caught:
            status("hangs")
        assert time.monotonic() - started < 5 and "\n" not in str(caught.value)
    finally:  # let the reader thread go (it waits in open(): a reader, so this open does not fail)
        with contextlib.suppress(OSError):
            os.close(os.open(results / "celery-task-meta-hangs", os.O_WRONLY | os.O_NONBLOCK))


def test_config_hides_the_password_of_every_url(monkeypatch):
    from click.testing import CliRunner

    from service.cli import main

    made_up = secrets.token_hex(8)  # per run: no password in the source
    env = {"KIT_BROKER_URL": "pyamqp://kit:" + made_up + "b@127.0.0.1:5672/kit",
           "KIT_RESULT_BACKEND": "redis://:" + made_up + "r@127.0.0.1:6379/0",
           "SENTRY_DSN": "https://" + made_up + "d@sentry.example/1"}
    result = CliRunner().invoke(main, ["config"], env=env)
    assert result.exit_code == 0, result.output
    assert made_up not in result.output
    assert "KIT_RESULT_BACKEND=redis://:***@127.0.0.1:6379/0" in result.output
    assert "KIT_BROKER_URL=pyamqp://kit:***@127.0.0.1:5672/kit" in result.output


@pytest.mark.parametrize("url", ["rpc://", "cache+memory://"])
def test_a_result_backend_only_its_own_process_can_read_is_refused(monkeypatch, url):
    monkeypatch.setenv("KIT_RESULT_BACKEND", url)
    with pytest.raises(ConfigError, match="other processes") as caught:
        load()
    assert "\n" not in str(caught.value)
