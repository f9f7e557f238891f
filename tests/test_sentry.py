"""Sentry, for real: workers and beat send envelopes to an HTTP endpoint on loopback.

The endpoint is a stdlib HTTP server that plays Sentry's ingestion API
(``POST /api/<project>/envelope/``, gzip-compressed envelopes), so what the
tests assert is what would reach sentry.io.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sentry_sdk
from celery.beat import PersistentScheduler
from celery.schedules import crontab
from celery.schedules import schedule as celery_schedule

from service import headers as h
from service.client import Publisher, TaskRequest
from service.monitoring import sentry
from tests.helpers import REPO, running_beat, wait_until
from tests.worker_tasks import recorded

SECRET_TASK = "test.secret_arguments"
PERMANENT = "service.errors.PermanentError"


class SentryEndpoint:
    """Collects the envelopes POSTed to it, like Sentry's ingestion API."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                endpoint._record(self.path, body)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.dsn = f"http://public@127.0.0.1:{self._server.server_address[1]}/1"

    def _record(self, path: str, body: bytes) -> None:
        with self._lock:
            self.requests.append({"path": path, "raw": body, "items": parse_envelope(body)})

    def items(self, kind: str) -> list[dict[str, Any]]:
        """Payloads of every item of type ``kind`` received so far."""
        with self._lock:
            return [payload for r in self.requests for header, payload in r["items"] if header.get("type") == kind]

    def raw(self) -> bytes:
        """Everything received so far, decompressed."""
        with self._lock:
            return b"\n".join(r["raw"] for r in self.requests)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def parse_envelope(body: bytes) -> list[tuple[dict[str, Any], Any]]:
    """(item header, payload) pairs of an envelope: a header line, then item header + payload pairs."""
    _, _, rest = body.partition(b"\n")
    items = []
    while rest.strip():
        line, _, rest = rest.partition(b"\n")
        header = json.loads(line)
        if "length" in header:
            payload, rest = rest[: header["length"]], rest[header["length"]:].removeprefix(b"\n")
        else:
            payload, _, rest = rest.partition(b"\n")
        try:
            items.append((header, json.loads(payload)))
        except ValueError:
            items.append((header, payload))
    return items


@pytest.fixture
def endpoint() -> Iterator[SentryEndpoint]:
    server = SentryEndpoint()
    yield server
    server.close()


@pytest.fixture
def sentry_env(endpoint: SentryEndpoint, kit_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """SENTRY_DSN pointing at the endpoint, for the test and its workers (set before start_worker)."""
    values = {"SENTRY_DSN": endpoint.dsn, "SENTRY_ENVIRONMENT": "kit-test", "SENTRY_RELEASE": "kit@test"}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
        kit_env[key] = value
    return kit_env


@pytest.fixture(autouse=True)
def _no_sentry_left_behind() -> Iterator[None]:
    """No Sentry client outlives a test in this process."""
    yield
    if sentry_sdk.is_initialized():
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)


@pytest.fixture
def host_sentry(endpoint: SentryEndpoint) -> Iterator[Any]:
    """The web app's own Sentry in this test process (no integrations: nothing patched here)."""
    sentry_sdk.init(dsn=endpoint.dsn.replace("/1", "/2"), default_integrations=False, auto_enabling_integrations=False)
    yield sentry_sdk.get_client()


def _secret(n: int) -> tuple[str, str]:
    return f"alice{n}.secret@example.com", f"tok_{n}_f3a9c1d7e5b2"


def _events(endpoint: SentryEndpoint, mechanism: str) -> list[dict[str, Any]]:
    return [e for e in endpoint.items("event")
            if e.get("exception", {}).get("values", [{}])[-1].get("mechanism", {}).get("type") == mechanism]


def test_dead_letters_are_reported_grouped_and_without_arguments(
    vhost, sentry_env, endpoint, host_sentry, start_worker, tmp_path
):
    start_worker()
    with sentry_sdk.isolation_scope():  # one request of the web app
        trace_id = sentry_sdk.get_traceparent().split("-")[0]
        with Publisher() as p:
            ids = [p.publish(SECRET_TASK, list(_secret(n))) for n in (1, 2)]
    # The client left the web app's own Sentry alone.
    assert sentry_sdk.get_client() is host_sentry

    wait_until(lambda: vhost.depth("default.dead") == 2, 30, "two dead letters")
    dead = wait_until(lambda: len(_events(endpoint, "kit.dead_letter")) >= 2 and _events(endpoint, "kit.dead_letter"),
                      20, "the dead-letter events")
    failed = wait_until(lambda: len(_events(endpoint, "celery")) >= 2 and _events(endpoint, "celery"),
                        20, "the integration's events from the pool processes")

    # One Sentry issue per task and exception type, whichever process reported it.
    expected = ["kit-dead-letter", SECRET_TASK, PERMANENT]
    assert [e["fingerprint"] for e in dead + failed] == [expected] * 4
    assert sorted(e["contexts"]["dead_letter"]["task_id"] for e in dead) == sorted(ids)
    for event in dead:
        assert event["level"] == "error"
        assert event["tags"]["queue"] == "default"
        assert event["tags"]["reason"] == h.REASON_PERMANENT
        assert event["tags"]["task"] == SECRET_TASK
        assert event["tags"]["kit.role"] == "worker"
        assert event["environment"] == "kit-test" and event["release"] == "kit@test"
        [exc] = event["exception"]["values"]
        assert (exc["module"], exc["type"]) == ("service.errors", "PermanentError")
        assert exc["value"] == "the mail server refused the message"
        assert event["contexts"]["dead_letter"]["attempts"] == 1
        assert "PermanentError" in event["contexts"]["dead_letter"]["traceback"]
    for event in failed:
        assert event["extra"]["celery-job"]["args"] == "[Filtered]"
        assert event["extra"]["celery-job"]["kwargs"] == "[Filtered]"
        assert not any("vars" in frame for frame in event["exception"]["values"][-1]["stacktrace"]["frames"])
    # Both continue the trace of the web request that published the tasks.
    assert {e["contexts"]["trace"]["trace_id"] for e in dead + failed} == {trace_id}

    raw = endpoint.raw()
    for n in (1, 2):
        for secret in _secret(n):
            assert secret.encode() not in raw
    assert len(recorded(tmp_path, "attempt")) == 2


def test_nothing_is_sent_without_a_dsn(vhost, kit_env, endpoint, monkeypatch, start_worker):
    monkeypatch.delenv("SENTRY_DSN", raising=False)
    kit_env.pop("SENTRY_DSN", None)
    worker = start_worker()
    with Publisher() as p:
        p.publish(SECRET_TASK, list(_secret(3)))
    assert not sentry_sdk.is_initialized()  # the client did not turn it on either
    wait_until(lambda: vhost.depth("default.dead") == 1, 30, "the dead letter")
    assert worker.terminate() == 0  # a warm shutdown flushes whatever Sentry had queued
    assert endpoint.requests == []


def test_the_client_turns_sentry_on_in_a_process_without_its_own(sentry_env, endpoint, topology, vhost):
    script = (
        "import sentry_sdk\n"
        "from service.client import publish\n"
        "publish('test.record', ['from-a-script'])\n"
        "sentry_sdk.capture_message('hello from a script')\n"
        "sentry_sdk.flush(5)\n"
    )
    subprocess.run([sys.executable, "-c", script], env=sentry_env, cwd=REPO, check=True, timeout=30)
    [event] = endpoint.items("event")
    assert event["message"] == "hello from a script"
    assert event["tags"]["kit.role"] == "client"
    assert vhost.depth("default") == 1


def _seed_overdue_schedule(state_dir: Path, overdue: timedelta) -> None:
    """Leave beat a schedule file whose clean-up last ran ``overdue`` ago (as after a beat restart)."""
    from service.app import make_app

    scheduler = PersistentScheduler(app=make_app(), schedule_filename=str(state_dir / "celerybeat-schedule"))
    try:
        entry = scheduler.schedule["maintenance.cleanup_reports"]
        entry.last_run_at = entry.last_run_at - overdue
    finally:
        scheduler.close()


def test_beat_schedules_are_sentry_crons_monitors(sentry_env, endpoint, monkeypatch, start_worker, tmp_path):
    # Sentry Crons take whole minutes only (a 1 s interval is skipped with a
    # warning), so the clean-up runs every minute and beat finds it overdue.
    state_dir = tmp_path / "beat-state"
    state_dir.mkdir()
    for key, value in {"KIT_CLEANUP_INTERVAL": "60", "KIT_STATE_DIR": str(state_dir)}.items():
        monkeypatch.setenv(key, value)
        sentry_env[key] = value
    _seed_overdue_schedule(state_dir, timedelta(minutes=2))

    start_worker(queues=("bulk",))
    with running_beat(sentry_env, tmp_path / "beat.log") as still_running:
        def check_ins() -> list[dict[str, Any]]:
            still_running()
            found = [c for c in endpoint.items("check_in") if c["monitor_slug"] == "maintenance.cleanup_reports"]
            return found if {c["status"] for c in found} >= {"in_progress", "ok"} else []

        found = wait_until(check_ins, 60, "the in_progress and ok check-ins", interval=0.1)

    started = next(c for c in found if c["status"] == "in_progress")  # from beat
    done = next(c for c in found if c["status"] == "ok")  # from the worker that ran it
    assert done["check_in_id"] == started["check_in_id"]
    assert started["monitor_config"]["schedule"] == {"type": "interval", "value": 1, "unit": "minute"}
    assert done["duration"] >= 0
    assert started["environment"] == done["environment"] == "kit-test"


def _monitored(slug: str) -> dict[str, Any]:
    """The Crons headers sentry-sdk's beat integration puts on a scheduled task (top level and nested)."""
    monitor = {
        "sentry-monitor-slug": slug,
        "sentry-monitor-check-in-id": uuid.uuid4().hex,
        "sentry-monitor-config": {"schedule": {"type": "interval", "value": 1, "unit": "hour"}, "timezone": "UTC"},
        "sentry-monitor-start-timestamp-s": f"{time.time():.9f}",
    }
    return {**monitor, "headers": dict(monitor)}


def test_crons_check_ins_wait_for_the_kits_retries_and_dead_letters(
    sentry_env, endpoint, host_sentry, start_worker, tmp_path
):
    start_worker()
    flaky, unknown = _monitored("kit-test-flaky"), _monitored("kit-test-unknown")
    with Publisher() as p:
        p.publish_many([
            TaskRequest("test.flaky", ["f1", 1], extra_headers=flaky),  # fails once, then succeeds
            TaskRequest("test.no_such_task", extra_headers=unknown),  # dead-lettered by the main process
        ])

    def statuses(headers: dict[str, Any]) -> list[str]:
        return [c["status"] for c in endpoint.items("check_in")
                if c["check_in_id"] == headers["sentry-monitor-check-in-id"]]

    wait_until(lambda: "ok" in statuses(flaky), 20, "the ok check-in of the retried task")
    assert recorded(tmp_path, "attempt") == ["f1:0", "f1:1"]
    assert statuses(flaky) == ["ok"]  # the retry did not close the check-in as failed
    wait_until(lambda: statuses(unknown) == ["error"], 20, "the error check-in of the dead letter")
    [dead] = _events(endpoint, "kit.dead_letter")
    assert dead["tags"]["reason"] == h.REASON_UNKNOWN_TASK and dead["tags"]["task"] == "test.no_such_task"


def test_scrubbing_and_grouping_of_events():
    event = {
        "extra": {"celery-job": {"task_name": "emails.send", "args": ["a@example.com"], "kwargs": {"token": "t"}}},
        "logentry": {"message": "bad message: headers=%r", "params": [{"task": "x", "argsrepr": "['a@example.com']"}]},
        "breadcrumbs": {"values": [{"message": "m", "data": {"kwargsrepr": "{'token': 't'}", "queue": "default"}}]},
    }
    prepared = sentry.prepare_event(event, {"exc_info": (ValueError, ValueError("x"), None)})
    text = json.dumps(prepared)
    assert "a@example.com" not in text and "'t'" not in text
    assert prepared["extra"]["celery-job"] == {"task_name": "emails.send", "args": "[Filtered]", "kwargs": "[Filtered]"}
    assert prepared["logentry"]["formatted"] == "bad message: headers={'task': 'x', 'argsrepr': '[Filtered]'}"
    assert prepared["breadcrumbs"]["values"][0]["data"] == {"kwargsrepr": "[Filtered]", "queue": "default"}
    assert prepared["fingerprint"] == ["kit-dead-letter", "emails.send", "ValueError"]


def test_intervals_sentry_crons_cannot_monitor_are_named():
    schedule = {
        "every-second": {"schedule": 1.0},
        "every-90s": {"schedule": timedelta(seconds=90)},
        "hourly": {"schedule": celery_schedule(3600)},
        "every-5-minutes": {"schedule": 300},
        "nightly": {"schedule": crontab(hour=4, minute=0)},
    }
    assert sentry.unmonitored(schedule) == ["every-second", "every-90s"]
