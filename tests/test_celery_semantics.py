"""Celery as users know it keeps its meaning on the kit: routing, time zones, one configuration.

On a real broker with real workers and beat (issue 9: items 1, 5 and 6).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from celery import Celery

from service.app import make_app
from service.client import Publisher
from service.errors import InvalidTaskInput
from tests.helpers import REPO, running_beat, spawn, wait_until
from tests.observability import free_port
from tests.worker_tasks import recorded


@pytest.fixture
def kit_app(kit_env) -> Celery:
    """The kit's Celery app, built from the test's environment (as a web app importing it would)."""
    app = make_app()
    yield app
    app.close()


def test_every_way_of_naming_a_queue_is_honoured(vhost, kit_env, kit_app, start_worker, tmp_path):
    start_worker(queues=("bulk",))  # a task that went to `default` would never run

    # Declared in tests.worker_tasks with @app.task(queue="bulk"); Celery shares tasks with every app.
    decorated = kit_app.tasks["test.record_bulk"]

    kit_app.send_task("test.record", ["send_task queue"], queue="bulk")
    kit_app.send_task("test.record", ["send_task routing_key"], routing_key="bulk")
    kit_app.signature("test.record", ["signature queue"]).apply_async(queue="bulk")
    decorated.apply_async(["task queue"])
    decorated.apply_async(["apply_async queue"], queue="bulk")
    with Publisher() as p:
        p.publish("test.record", ["client queue"], queue="bulk")
    expected = {"send_task queue", "send_task routing_key", "signature queue", "task queue", "apply_async queue",
                "client queue"}
    try:
        wait_until(lambda: set(recorded(tmp_path, "done")) == expected, 30, "every task to run from bulk")
    except AssertionError:
        depths = vhost.depths(["urgent", "default"])
        raise AssertionError(f"ran {recorded(tmp_path, 'done')}; queues {depths}") from None
    assert vhost.depth("default") == 0


def test_flower_async_apply_honours_its_queue_option(vhost, kit_env, start_worker, tmp_path):
    start_worker(queues=("bulk",))
    port = free_port()
    env = dict(kit_env, FLOWER_UNAUTHENTICATED_API="true")
    log = (tmp_path / "flower.log").open("wb")
    flower = spawn([sys.executable, "-m", "celery", "-A", "service.app", "flower", "--address=127.0.0.1",
                    f"--port={port}"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        body = json.dumps({"args": ["flower"], "queue": "bulk"}).encode()  # top-level keys are apply_async options

        def applied() -> bool:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/api/task/async-apply/test.record", data=body,
                                             headers={"Content-Type": "application/json"}, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_until(applied, 60, "Flower to accept async-apply", interval=0.5)
        wait_until(lambda: recorded(tmp_path, "done") == ["flower"], 30, "the Flower task to run from bulk")
    finally:
        flower.terminate()
        flower.wait(15)
        log.close()


@pytest.mark.parametrize("options, fragment", [
    ({"routing_key": "high_priority"}, "unknown work queue 'high_priority'"),
    ({"queue": "bulk", "routing_key": "urgent"}, "disagree"),
])
def test_a_queue_the_kit_does_not_have_raises_before_anything_is_sent(vhost, kit_env, kit_app, topology, options,
                                                                       fragment):
    with pytest.raises(InvalidTaskInput, match=fragment):
        kit_app.send_task("test.record", ["x"], **options)
    assert sum(vhost.depths(["urgent", "default", "bulk"]).values()) == 0


def test_a_naive_eta_means_the_kit_time_zone(vhost, kit_env, kit_app, start_worker, tmp_path, monkeypatch):
    zone = "Asia/Kolkata"  # +05:30: a naive time read as UTC would be 5.5 hours late
    kit_env["KIT_TIMEZONE"] = zone
    monkeypatch.setenv("KIT_TIMEZONE", zone)
    start_worker()
    due = datetime.now(ZoneInfo(zone)).replace(tzinfo=None) + timedelta(seconds=4)
    sent = time.time()
    kit_app.send_task("test.record_waits", ["naive"], eta=due)  # naive, as datetime.now() + ... gives
    wait_until(lambda: recorded(tmp_path, "waits"), 30, "the task with a naive local ETA to run")
    ran_at = float(recorded(tmp_path, "waits")[0].split(":")[1])
    assert sent + 4 - 0.5 <= ran_at < sent + 20


def test_a_crontab_entry_fires_at_its_local_minute(vhost, kit_env, start_worker, tmp_path):
    zone = ZoneInfo("Asia/Kolkata")
    now = datetime.now(zone)
    target = (now + timedelta(minutes=1 if now.second < 45 else 2)).replace(second=0, microsecond=0)
    env = dict(kit_env, KIT_TIMEZONE="Asia/Kolkata", KIT_TASK_MODULES="tests.worker_tasks,tests.beat_entries",
               KIT_TEST_CRONTAB=f"{target.hour}:{target.minute}", KIT_STATE_DIR=str(tmp_path))
    start_worker()
    with running_beat(env, tmp_path / "beat.log") as still_running:
        def fired() -> list[str]:
            still_running()
            return recorded(tmp_path, "waits")

        wait_until(fired, 150, f"the crontab entry for {target:%H:%M} Asia/Kolkata", interval=0.5)
    ran_at = datetime.fromtimestamp(float(recorded(tmp_path, "waits")[0].split(":")[1]), zone)
    assert ran_at.replace(second=0, microsecond=0) == target, ran_at


def test_replacing_the_beat_schedule_warns_about_the_kit_entries_it_drops(kit_env, topology, tmp_path):
    env = dict(kit_env, KIT_TASK_MODULES="tests.worker_tasks,tests.beat_entries", KIT_TEST_REPLACE_BEAT_SCHEDULE="1",
               KIT_STATE_DIR=str(tmp_path))
    log_path = tmp_path / "beat.log"
    with running_beat(env, log_path) as still_running:
        def warned() -> bool:
            still_running()
            return "dropped the kit's beat entries maintenance.cleanup_reports" in log_path.read_text(errors="replace")

        wait_until(warned, 60, "beat to warn about the dropped entries", interval=0.3)


@pytest.mark.parametrize("variable, value, fragment", [
    ("CELERY_BROKER_URL", "pyamqp://other:secret@127.0.0.1:5672/elsewhere", "disagrees with KIT_BROKER_URL"),
    ("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/0", "store no results"),
])
def test_celery_settings_that_disagree_with_the_kit_stop_the_worker(kit_env, topology, variable, value, fragment):
    env = dict(kit_env, **{variable: value})
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "service.app", "worker", "-Q", "default"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], done.stderr
    assert variable in lines[0] and "secret" not in lines[0]


def test_a_celery_broker_url_equal_to_the_kit_one_is_fine(kit_env):
    from service.app import check_one_source_of_configuration
    from service.settings import load

    settings = load()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CELERY_BROKER_URL", kit_env["KIT_BROKER_URL"])
        check_one_source_of_configuration(settings)  # does not raise
