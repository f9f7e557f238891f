"""The example web service for real: `python -m service web` (uvicorn) on a free port, real workers, real
Redis (the result backend), real HTTP.

Submit an export, poll it until completed with its progress seen rising, download the file and check its
rows; cancel a queued export; a failing export ends as failed with its dead letter; downloads refuse
anything but an export file; bad input is 422 naming the field; a broker that is down (or silent) is a
quick 503; /metrics counts the requests, /docs answers.
"""

from __future__ import annotations

import csv
import http.client
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openpyxl
import pytest

from service.tasks import work_logs
from tests.helpers import REPO, spawn, wait_until
from tests.helpers.redis import free_port
from tests.test_sentry import SentryEndpoint

pytestmark = pytest.mark.broker

#: Seconds the web service may take to answer /healthz after it starts.
START_TIMEOUT = 30
#: Pause per chunk of rows of an export: 20 chunks, so about a second per export, progress in steps of 5 %.
EXPORT_PAUSE = "0.05"
EMPLOYEES = [f"emp_{n:03d}" for n in range(1, 11)]


@dataclass
class WebService:
    """A running `python -m service web` and an HTTP client of it."""

    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    client: httpx.Client

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def raw_get(self, path: str) -> tuple[int, bytes]:
        """GET ``path`` exactly as written (httpx would normalise ``..`` and encodings)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.putrequest("GET", path, skip_accept_encoding=True)
            conn.endheaders()
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def poll(self, task_id: str, done: Callable[[dict[str, Any]], bool], timeout: float,
             interval: float = 0.02) -> list[dict[str, Any]]:
        """GET the task's status until ``done`` says yes; every answer seen, in order."""
        return self.poll_all([task_id], done, timeout, interval)[task_id]

    def poll_all(self, task_ids: list[str], done: Callable[[dict[str, Any]], bool], timeout: float,
                 interval: float = 0.02) -> dict[str, list[dict[str, Any]]]:
        """Poll several tasks side by side until ``done`` says yes for each; every answer seen, per task."""
        seen: dict[str, list[dict[str, Any]]] = {task_id: [] for task_id in task_ids}

        def check() -> bool:
            for task_id, answers in seen.items():
                if answers and done(answers[-1]):
                    continue
                response = self.client.get(f"/api/tasks/{task_id}")
                assert response.status_code == 200, response.text
                answers.append(response.json())
            return all(answers and done(answers[-1]) for answers in seen.values())

        try:
            wait_until(check, timeout, f"tasks {task_ids} to be done", interval=interval)
        except AssertionError as exc:
            last = {task_id: answers[-1:] for task_id, answers in seen.items()}
            raise AssertionError(f"{exc}; last status {last}\nweb log:\n{self.log()[-3000:]}") from None
        return seen

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


@pytest.fixture
def start_web(kit_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., WebService]]:
    """Start `python -m service web` on a free port with the test's environment (plus ``extra``)."""
    started: list[WebService] = []

    def start(**extra: str) -> WebService:
        port = free_port()
        log_path = tmp_path / f"web-{port}.log"
        with log_path.open("wb") as log:
            process = spawn([sys.executable, "-m", "service", "web", "--port", str(port)],
                            env={**kit_env, **extra}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        service = WebService(f"http://127.0.0.1:{port}", port, process, log_path,
                             httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15))
        started.append(service)

        def healthy() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"the web service exited with {process.returncode}:\n{service.log()}")
            try:
                return service.client.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, START_TIMEOUT, "the web service to answer /healthz", interval=0.1)
        assert f"web service on http://127.0.0.1:{port}" in service.log()
        return service

    yield start
    for service in started:
        service.stop()


def submit_export(web: WebService, **body: Any) -> str:
    response = web.client.post("/api/export/work-logs", json=body)
    assert response.status_code == 202, response.text
    answer = response.json()
    assert set(answer) == {"task_id", "status", "message", "status_url"}
    assert answer["status"] == "pending" and answer["status_url"] == f"/api/tasks/{answer['task_id']}"
    return answer["task_id"]


def finished(answer: dict[str, Any]) -> bool:
    return answer["status"] in ("completed", "failed", "cancelled", "expired")


def expected_rows(start: str, end: str, employees: list[str], kind: str) -> list[list[Any]]:
    """The rows the task writes: text cells in a CSV file, typed ones (numbers) in an XLSX file."""
    from datetime import date

    rows = work_logs.work_log_rows(date.fromisoformat(start), date.fromisoformat(end), employees)
    return [[str(row[c]) if kind == "csv" else row[c] for c in work_logs.COLUMNS] for row in rows]


# --------------------------------------------------------------------------- the export loop


def test_export_progress_download_and_listing(result_backend, start_worker, start_web) -> None:
    web = start_web(KIT_WEB_EXPORT_PAUSE=EXPORT_PAUSE)
    start_worker(queues=["bulk"])
    csv_id = submit_export(web, start_date="2024-01-01", end_date="2024-01-31", employee_ids=EMPLOYEES,
                           export_format="csv")
    xlsx_id = submit_export(web, start_date="2024-02-01", end_date="2024-02-29", employee_ids=EMPLOYEES[:5],
                            export_format="xlsx")

    polled = web.poll_all([csv_id, xlsx_id], finished, 60)
    for task_id, start, end, employees, kind in (
            (csv_id, "2024-01-01", "2024-01-31", EMPLOYEES, "csv"),
            (xlsx_id, "2024-02-01", "2024-02-29", EMPLOYEES[:5], "xlsx")):
        seen = polled[task_id]
        final = seen[-1]
        assert final["status"] == "completed", final
        assert final["state"] == "succeeded" and final["progress"] == 100 and final["error"] is None
        # Progress seen rising while the file was written: several values strictly between 0 and 100.
        steps = [s["progress"] for s in seen if s["status"] == "processing" and 0 < s["progress"] < 100]
        assert len(set(steps)) >= 3, [(s["status"], s["progress"]) for s in seen]
        assert steps == sorted(steps), steps
        running = next(s for s in seen if s["status"] == "processing" and s["progress"] > 0)
        assert {"current", "total", "percent"} <= set(running["result"]), running
        statuses = [s["status"] for s in seen]
        assert set(statuses) <= {"unknown", "pending", "processing", "completed"}, statuses

        result = final["result"]
        rows = expected_rows(start, end, employees, kind)
        assert result["rows"] == len(rows) and result["format"] == kind
        assert result["file_name"] == f"work_logs_{start}_{end}_{task_id}.{kind}"
        assert final["download_url"] == f"/api/download/{result['file_name']}"

        download = web.client.get(final["download_url"])
        assert download.status_code == 200, download.text
        assert len(download.content) == result["size"]
        assert f'filename="{result["file_name"]}"' in download.headers["content-disposition"]
        if kind == "csv":
            assert download.headers["content-type"].startswith("text/csv")
            table = list(csv.reader(io.StringIO(download.content.decode())))
        else:
            sheet = openpyxl.load_workbook(io.BytesIO(download.content), read_only=True).active
            table = [list(row) for row in sheet.iter_rows(values_only=True)]
        assert table[0] == list(work_logs.COLUMNS)
        assert table[1:] == rows

    listing = web.client.get("/api/exports").json()
    names = {f["file_name"]: f for f in listing["files"]}
    assert listing["count"] == 2 == len(names)
    for name, entry in names.items():
        assert entry["download_url"] == f"/api/download/{name}" and entry["size"] > 0 and entry["created_at"]


def test_failing_export_ends_failed_with_its_dead_letter(result_backend, start_worker, start_web) -> None:
    """An employee the directory does not know: only the task can tell; it is dead-lettered."""
    web = start_web()
    start_worker(queues=["bulk"])
    task_id = submit_export(web, start_date="2024-01-01", end_date="2024-01-05", employee_ids=["emp_999"])
    final = web.poll(task_id, finished, 30, interval=0.1)[-1]
    assert final["status"] == "failed" and final["state"] == "dead-lettered", final
    assert final["dead_letter"]["queue"] == "bulk.dead"
    assert final["dead_letter"]["reason"] == "permanent-error"
    assert "unknown employee ids: emp_999" in final["error"]
    assert final["download_url"] is None


def test_cancel_a_queued_export_and_it_never_runs(result_backend, kit_env, vhost, start_worker, start_web) -> None:
    web = start_web()
    task_id = submit_export(web, start_date="2024-03-01", end_date="2024-03-31", export_format="csv")
    wait_until(lambda: vhost.depth("bulk") == 1, 10, "the export to be queued")
    cancelled = web.client.delete(f"/api/tasks/{task_id}")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["state"] == "revoked"

    start_worker(queues=["bulk"])  # the worker now sees the message, and must not run it
    # Accounted for: parked in the dead-letter queue (reason revoked), not run.
    wait_until(lambda: vhost.depth("bulk") == 0 and vhost.depth("bulk.dead") == 1, 30,
               "the cancelled export to be dead-lettered")
    answer = web.client.get(f"/api/tasks/{task_id}").json()
    assert answer["status"] == "cancelled", answer
    assert not list(Path(kit_env["KIT_REPORT_DIR"]).glob(f"*{task_id}*")), "the cancelled export ran"


def test_notification_and_cleanup(result_backend, kit_env, start_worker, start_web) -> None:
    report_dir = Path(kit_env["KIT_REPORT_DIR"])
    report_dir.mkdir(parents=True)
    old, new = report_dir / "work_logs_old.xlsx", report_dir / "work_logs_new.csv"
    for path in (old, new):
        path.write_text("x\n")
    long_ago = time.time() - 3 * 86400
    os.utime(old, (long_ago, long_ago))
    web = start_web()
    start_worker(queues=["urgent", "bulk"])

    response = web.client.post("/api/notifications", json={"user_id": "user_001", "message": "Your report is ready",
                                                          "notification_type": "email"})
    assert response.status_code == 202, response.text
    notification = web.poll(response.json()["task_id"], finished, 30, interval=0.05)[-1]
    assert notification["status"] == "completed", notification
    outbox = Path(kit_env["KIT_STATE_DIR"]) / "notifications" / notification["result"]["outbox_file"]
    assert '"message": "Your report is ready"' in outbox.read_text()

    response = web.client.post("/api/cleanup", params={"days_old": 2})
    assert response.status_code == 202, response.text
    cleanup = web.poll(response.json()["task_id"], finished, 30, interval=0.05)[-1]
    assert cleanup["status"] == "completed" and cleanup["result"] == 1, cleanup
    assert not old.exists() and new.exists()


# --------------------------------------------------------------------------- what is refused


def test_download_serves_export_files_and_nothing_else(kit_env, tmp_path, start_web) -> None:
    report_dir = Path(kit_env["KIT_REPORT_DIR"])
    report_dir.mkdir(parents=True)
    (report_dir / "work_logs_ok.csv").write_text("date\n2024-01-01\n")
    secret = tmp_path / "secret.csv"
    secret.write_text("TOP SECRET\n")
    (report_dir / ".work_logs_partial.csv.tmp").write_text("TOP SECRET\n")
    (report_dir / "link_out.csv").symlink_to(secret)
    (report_dir / "link_in.csv").symlink_to(report_dir / "work_logs_ok.csv")
    (report_dir / "folder.csv").mkdir()
    (report_dir / "notes.txt").write_text("TOP SECRET\n")
    web = start_web()

    status, body = web.raw_get("/api/download/work_logs_ok.csv")
    assert (status, body) == (200, b"date\n2024-01-01\n")
    attempts = [
        "/api/download/../secret.csv", "/api/download/..%2Fsecret.csv", "/api/download/..%2fsecret.csv",
        "/api/download/%2E%2E%2Fsecret.csv", "/api/download/..%252Fsecret.csv", "/api/download/%2e%2e",
        "/api/download/..", "/api/download/%2F" + "%2F".join(str(secret).strip("/").split("/")),
        "/api/download/" + str(secret), "/api/download/..%5Csecret.csv", "/api/download/link_out.csv",
        "/api/download/link_in.csv", "/api/download/folder.csv", "/api/download/.work_logs_partial.csv.tmp",
        "/api/download/notes.txt", "/api/download/secret.csv", "/api/download/%00.csv",
        "/api/download/work_logs_ok.csv%00.txt", "/api/download/~%2Fsecret.csv",
    ]
    for path in attempts:
        status, body = web.raw_get(path)
        assert status in (400, 404), (path, status, body)
        assert b"TOP SECRET" not in body and b"date\n2024" not in body, path
    assert [f["file_name"] for f in web.client.get("/api/exports").json()["files"]] == ["work_logs_ok.csv"]


def test_bad_input_is_422_naming_the_field_and_metrics_count_it(kit_env, start_web) -> None:
    web = start_web()
    good = {"start_date": "2024-01-01", "end_date": "2024-01-31"}
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("/api/export/work-logs", {**good, "end_date": "2023-12-31"}, "end_date"),
        ("/api/export/work-logs", {**good, "start_date": "2020-01-01"}, "end_date"),
        ("/api/export/work-logs", {**good, "start_date": "01/01/2024"}, "start_date"),
        ("/api/export/work-logs", {**good, "start_date": 1704067200}, "start_date"),
        ("/api/export/work-logs", {**good, "end_date": "2024-02-30"}, "end_date"),
        ("/api/export/work-logs", {"end_date": "2024-01-31"}, "start_date"),
        ("/api/export/work-logs", {**good, "export_format": "pdf"}, "export_format"),
        ("/api/export/work-logs", {**good, "employee_ids": []}, "employee_ids"),
        ("/api/export/work-logs", {**good, "employee_ids": ["emp 1"]}, "employee_ids.0"),
        ("/api/export/work-logs", {**good, "employee_ids": ["emp_001", "emp_001"]}, "employee_ids"),
        ("/api/export/work-logs", {**good, "employee_ids": [f"e{n}" for n in range(201)]}, "employee_ids"),
        ("/api/export/work-logs", {**good, "format": "csv"}, "format"),
        ("/api/notifications", {"user_id": "u1", "message": "hi", "notification_type": "fax"}, "notification_type"),
        ("/api/notifications", {"user_id": "u 1", "message": "hi"}, "user_id"),
        ("/api/notifications", {"user_id": "u1", "message": "   "}, "message"),
        ("/api/notifications", {"user_id": "u1", "message": "x" * 2001}, "message"),
    ]
    for path, body, field in cases:
        response = web.client.post(path, json=body)
        assert response.status_code == 422, (body, response.text)
        answer = response.json()
        assert answer["detail"].startswith(f"{field}: "), (body, answer["detail"])
        assert "\n" not in answer["detail"]
    for days in ("0", "-1", "abc", "100000"):
        response = web.client.post("/api/cleanup", params={"days_old": days})
        assert response.status_code == 422 and response.json()["detail"].startswith("days_old: "), response.text
    response = web.client.post("/api/export/work-logs", content=b"{not json", headers={"content-type":
                                                                                          "application/json"})
    assert response.status_code == 422 and response.json()["detail"].startswith("body: "), response.text
    assert web.client.request("BREW", "/healthz").status_code == 405  # any token is a method to HTTP

    metrics = web.client.get("/metrics").text
    exports = sum(1 for p, _, _ in cases if p == "/api/export/work-logs") + 1
    assert (f'kit_web_requests_total{{method="POST",route="/api/export/work-logs",status="422"}} '
            f'{float(exports)}') in metrics, metrics
    assert 'kit_web_requests_total{method="POST",route="/api/cleanup",status="422"} 4.0' in metrics
    assert 'kit_web_requests_total{method="GET",route="/healthz",status="200"}' in metrics
    assert 'kit_web_requests_total{method="other",route="/healthz",status="405"} 1.0' in metrics
    assert 'method="BREW"' not in metrics
    assert "# TYPE kit_web_publish_duration_seconds histogram" in metrics

    docs = web.client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = web.client.get("/openapi.json").json()["paths"]
    assert {"/api/export/work-logs", "/api/tasks/{task_id}", "/api/download/{file_name}", "/api/exports",
            "/api/notifications", "/api/cleanup"} <= set(paths)


def _closed_port() -> int:
    return free_port()  # nothing listens on it (a race with another process is harmless here: it would refuse)


def test_broker_down_is_a_quick_503_reported_to_sentry(kit_env, start_web) -> None:
    closed = _closed_port()
    sentry = SentryEndpoint()
    web = start_web(KIT_BROKER_URL=f"pyamqp://nobody@127.0.0.1:{closed}/kit", KIT_PUBLISH_TIMEOUT="1",
                    KIT_CONNECT_TIMEOUT="0.5", KIT_RESULT_BACKEND=f"redis://127.0.0.1:{_closed_port()}/0",
                    SENTRY_DSN=sentry.dsn)
    body = {"start_date": "2024-01-01", "end_date": "2024-01-31"}
    for method, path, kwargs, what in (
            ("POST", "/api/export/work-logs", {"json": body}, "broker"),
            ("POST", "/api/notifications", {"json": {"user_id": "u1", "message": "hi"}}, "broker"),
            ("GET", f"/api/tasks/{uuid.uuid4()}", {}, "result backend"),
            ("DELETE", f"/api/tasks/{uuid.uuid4()}", {}, "result backend")):
        started = time.monotonic()
        response = web.client.request(method, path, **kwargs)
        elapsed = time.monotonic() - started
        assert response.status_code == 503, (path, response.text)
        detail = response.json()["detail"]
        assert what in detail and "\n" not in detail, detail
        assert elapsed < 3, f"{method} {path} took {elapsed:.1f}s"
        print(f"{method} {path}: 503 in {elapsed:.2f}s")
    metrics = web.client.get("/metrics").text
    assert 'kit_web_publish_duration_seconds_count{outcome="BrokerUnavailable",task="reports.work_logs"} 1.0' \
        in metrics, metrics
    try:
        def reported() -> set[str]:
            return {value["type"] for event in sentry.items("event")
                    for value in event.get("exception", {}).get("values", [])}

        wait_until(lambda: {"BrokerUnavailable", "ResultBackendUnavailable"} <= reported(), 10,
                   "the 503s to reach Sentry", interval=0.1)
    finally:
        sentry.close()


def test_a_silent_broker_is_a_503_at_the_request_timeout_and_the_loop_stays_free(kit_env, start_web) -> None:
    """A broker that accepts the connection and never answers: the request deadline answers for it."""
    sentry = SentryEndpoint()
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # AMQP never answers: the connection is accepted below, and nothing is sent
        silent.settimeout(10)
        port = silent.getsockname()[1]
        web = start_web(KIT_BROKER_URL=f"pyamqp://nobody@127.0.0.1:{port}/kit", KIT_PUBLISH_TIMEOUT="20",
                        KIT_CONNECT_TIMEOUT="20", KIT_WEB_REQUEST_TIMEOUT="1.5", SENTRY_DSN=sentry.dsn)
        answers: list[httpx.Response] = []
        body = {"start_date": "2024-01-01", "end_date": "2024-01-31"}
        started = time.monotonic()
        threads = [threading.Thread(target=lambda: answers.append(web.client.post("/api/export/work-logs",
                                                                                  json=body))) for _ in range(2)]
        for thread in threads:
            thread.start()
        peer, _ = silent.accept()  # the publish is now waiting for the broker (at most 10 s for it to connect)
        try:
            probe = time.monotonic()
            assert web.client.get("/healthz").status_code == 200
            assert time.monotonic() - probe < 0.5, "the event loop is blocked by the waiting publish"
            for thread in threads:
                thread.join(10)
        finally:
            peer.close()
        elapsed = time.monotonic() - started
        assert len(answers) == 2 and all(a.status_code == 503 for a in answers), [a.text for a in answers]
        assert "KIT_WEB_REQUEST_TIMEOUT" in answers[0].json()["detail"]
        assert 1.4 < elapsed < 4, elapsed
    metrics = web.client.get("/metrics").text
    # The deadline cancelled both publishes: counted as such, not as "ok".
    assert ('kit_web_publish_duration_seconds_count{outcome="CancelledError",task="reports.work_logs"} 2.0'
            in metrics), metrics
    assert 'outcome="ok"' not in metrics
    try:
        def timed_out() -> list[dict[str, Any]]:
            return [event for event in sentry.items("event") for value in event.get("exception", {}).get("values", [])
                    if value["type"] == "RequestTimedOut"]

        wait_until(timed_out, 10, "the timed-out request to reach Sentry", interval=0.1)
        assert "KIT_WEB_REQUEST_TIMEOUT" in timed_out()[0]["exception"]["values"][0]["value"]
    finally:
        sentry.close()


# --------------------------------------------------------------------------- without a server


def test_the_request_deadline_answers_only_its_own_expiry_and_reports_once_a_minute(monkeypatch) -> None:
    import asyncio

    from service.web import app as web_app

    reported: list[BaseException] = []
    monkeypatch.setattr(web_app.sentry_sdk, "capture_exception", reported.append)

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(10)

    async def own_timeout(scope: Any, receive: Any, send: Any) -> None:
        raise TimeoutError("the app's own")

    async def call(deadline: Any) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await deadline({"type": "http", "method": "GET", "path": "/x"}, None, send)
        return sent

    async def main() -> None:
        deadline = web_app.RequestTimeout(slow, 0.05)
        for _ in range(3):  # an outage: every request times out, Sentry hears of the first
            assert (await call(deadline))[0]["status"] == 503
        with pytest.raises(TimeoutError, match="the app's own"):  # not the deadline's: not a 503
            await call(web_app.RequestTimeout(own_timeout, 5))

    asyncio.run(main())
    assert len(reported) == 1 and isinstance(reported[0], web_app.RequestTimedOut)


def test_an_export_opened_and_never_streamed_closes_its_file(tmp_path) -> None:
    import gc

    from service.web.exports import open_export

    (tmp_path / "work_logs_a.csv").write_text("date\n")
    opened = open_export(tmp_path, "work_logs_a.csv")
    fd, chunks = opened.fd, opened.chunks()  # a response made, its streaming never started
    del opened, chunks
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)
