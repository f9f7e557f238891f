"""The example tasks, run by a real worker against real SMTP and HTTP servers on loopback.

Nothing is mocked: aiosmtpd and http.server listen on 127.0.0.1, the worker is
a real ``celery worker`` process, and outcomes are read from what the servers
received, from files, from the worker's log and from the dead-letter queues.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from service import headers as h
from service import queues
from service.client import Publisher
from tests.helpers import wait_until

# -- helpers ----------------------------------------------------------------------


def set_env(kit_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    """Set variables for this process and for the workers started afterwards."""
    for key, value in values.items():
        monkeypatch.setenv(key, value)
        kit_env[key] = value


def dead_letters(vhost, queue: str, count: int = 1, timeout: float = 20) -> list:
    """Wait for ``count`` dead letters in ``queue``'s dead-letter queue and take them."""
    dlq = queues.dead_letter_queue_name(queue)
    wait_until(lambda: vhost.depth(dlq) >= count, timeout, f"{count} dead letter(s) in {dlq}")
    messages = vhost.drain(dlq)
    assert len(messages) == count, [m.headers.get("task") for m in messages]
    return messages


def wait_succeeded(worker, task_id: str, times: int = 1, timeout: float = 20) -> None:
    """Wait until the worker logged ``times`` successful runs of ``task_id``."""
    wait_until(
        lambda: worker.log().count(f"[{task_id}] succeeded") >= times,
        timeout,
        f"task {task_id} to succeed {times} time(s)",
    )


def publish(name: str, task_id: str | None = None, **kwargs: Any) -> str:
    with Publisher() as p:
        return p.publish(name, kwargs=kwargs, task_id=task_id)


# -- SMTP server ------------------------------------------------------------------


class PortZeroController(Controller):
    """aiosmtpd's Controller on a free port: its start-up probe connects to ``self.port``."""

    def _trigger_server(self) -> None:
        if self.port == 0:
            self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class MailHandler:
    """Accepts mail; ``flaky@`` gets 451 on its first RCPT, ``nobody@`` always 550."""

    def __init__(self) -> None:
        self.received: list[tuple[list[str], EmailMessage]] = []
        self.rcpt_attempts: Counter[str] = Counter()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options) -> str:  # noqa: N802
        self.rcpt_attempts[address] += 1
        local = address.split("@", 1)[0]
        if local == "nobody":
            return "550 5.1.1 No such user here"
        if local == "flaky" and self.rcpt_attempts[address] == 1:
            return "451 4.3.0 Temporary local problem, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802
        message = message_from_bytes(envelope.original_content, policy=policy.default)
        self.received.append((list(envelope.rcpt_tos), message))
        return "250 Message accepted for delivery"

    def to(self, address: str) -> list[EmailMessage]:
        return [m for rcpts, m in self.received if address in rcpts]


@pytest.fixture
def smtp(kit_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[MailHandler]:
    """A real SMTP server on 127.0.0.1, configured in KIT_SMTP_* (start workers after this)."""
    handler = MailHandler()
    controller = PortZeroController(handler, hostname="127.0.0.1", port=0, server_hostname="smtp.test")
    controller.start()
    set_env(kit_env, monkeypatch, KIT_SMTP_HOST="127.0.0.1", KIT_SMTP_PORT=str(controller.port),
            KIT_SMTP_TIMEOUT="5", KIT_MAIL_FROM="kit@sender.test")
    yield handler
    controller.stop()


# -- HTTP server ------------------------------------------------------------------


class WebhookReceiver:
    """Records every POST; answers by path (see ``answer``)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.release = threading.Event()  # lets /slow handlers go at teardown
        self.base_url = ""

    def record(self, path: str, headers: Any, body: bytes) -> int:
        with self.lock:
            self.hits[path] += 1
            # ``headers`` (an email.message.Message) looks names up case-insensitively:
            # urllib sends "X-Signature-Sha256" for "X-Signature-SHA256".
            self.requests.append({"path": path, "headers": headers, "body": body, "at": time.monotonic()})
            return self.hits[path]

    def on(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["path"] == path]

    def answer(self, path: str, hit: int) -> tuple[int, dict[str, str]] | None:
        """(status, headers) for the ``hit``-th request to ``path``; None means never answer."""
        if path == "/ok":
            return 200, {}
        if path == "/unavailable-twice":
            if hit == 1:
                return 503, {"Retry-After": "1"}
            return (503, {}) if hit == 2 else (200, {})
        if path == "/slow":
            self.release.wait(10)
            return None
        return 404, {}


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    """A real HTTP server on 127.0.0.1 in a thread."""
    state = WebhookReceiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            hit = state.record(self.path, self.headers, body)
            reply = state.answer(self.path, hit)
            if reply is None:
                return
            status, headers = reply
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    state.release.set()
    server.shutdown()
    server.server_close()
    thread.join(5)


# -- e-mail -----------------------------------------------------------------------


def test_email_is_delivered_with_a_message_id_from_the_task_id(smtp, start_worker):
    worker = start_worker()
    task_id = publish("emails.send", to="alice@example.test", subject="Your invoice",
                      body="Hello Alice,\nhere it is.", reply_to="billing@sender.test")
    wait_succeeded(worker, task_id)
    [message] = smtp.to("alice@example.test")
    assert message["Subject"] == "Your invoice"
    assert message["To"] == "alice@example.test"
    assert message["From"] == "kit@sender.test"
    assert message["Reply-To"] == "billing@sender.test"
    assert message["Message-ID"] == f"<{task_id}@sender.test>"
    assert message.get_content().replace("\r\n", "\n") == "Hello Alice,\nhere it is.\n"


def test_email_answered_451_is_retried_and_then_delivered(vhost, smtp, start_worker):
    worker = start_worker()
    task_id = publish("emails.send", to="flaky@example.test", subject="Second time lucky", body="hi")
    wait_succeeded(worker, task_id)
    assert smtp.rcpt_attempts["flaky@example.test"] == 2
    [message] = smtp.to("flaky@example.test")
    assert message["Message-ID"] == f"<{task_id}@sender.test>"
    assert "retry 1 of emails.send" in worker.log()
    assert vhost.depth("urgent.dead") == 0


def test_email_answered_550_or_with_a_bad_address_is_dead_lettered_at_once(vhost, smtp, start_worker):
    start_worker()
    refused = publish("emails.send", to="nobody@example.test", subject="Lost", body="hi")
    invalid = publish("emails.send", to="not an address", subject="Never", body="hi")
    dead = {m.headers["id"]: m for m in dead_letters(vhost, "urgent", count=2)}

    headers = dead[refused].headers
    assert headers[h.REASON] == h.REASON_PERMANENT
    assert headers[h.ATTEMPTS] == 1
    assert headers[h.SOURCE_QUEUE] == "urgent"
    assert headers[h.EXCEPTION_TYPE] == "service.errors.PermanentError"
    assert "nobody@example.test: 550" in headers[h.EXCEPTION_MESSAGE]
    assert smtp.rcpt_attempts["nobody@example.test"] == 1  # not retried

    headers = dead[invalid].headers
    assert headers[h.REASON] == h.REASON_PERMANENT
    assert "'not an address' is not a valid e-mail address" in headers[h.EXCEPTION_MESSAGE]
    assert smtp.received == []


# -- webhooks ---------------------------------------------------------------------


def test_webhook_is_posted_as_signed_json(receiver, kit_env, monkeypatch, start_worker, tmp_path):
    secret = tmp_path / "webhook-secret"
    secret.write_text("s3cret-key\n")
    set_env(kit_env, monkeypatch, KIT_WEBHOOK_SECRET_FILE=str(secret))
    worker = start_worker()
    payload = {"order": 42, "status": "paid", "note": "naïve ✓"}
    task_id = publish("webhooks.deliver", url=receiver.base_url + "/ok", payload=payload, event="order.paid")
    wait_succeeded(worker, task_id)

    [request] = receiver.on("/ok")
    body, headers = request["body"], request["headers"]
    assert json.loads(body) == payload
    assert headers["Content-Type"].startswith("application/json")
    assert headers["User-Agent"].startswith("celery-rabbitmq-kit")
    assert headers["X-Webhook-Id"] == task_id
    assert headers["X-Webhook-Event"] == "order.paid"
    expected = hmac.new(b"s3cret-key", body, hashlib.sha256).hexdigest()
    assert headers["X-Signature-SHA256"] == expected


def test_webhook_answered_503_is_retried_honouring_retry_after(vhost, receiver, start_worker):
    worker = start_worker()
    task_id = publish("webhooks.deliver", url=receiver.base_url + "/unavailable-twice", payload={"n": 1})
    wait_succeeded(worker, task_id)

    first, second, third = receiver.on("/unavailable-twice")
    assert {r["headers"]["X-Webhook-Id"] for r in (first, second, third)} == {task_id}
    assert "X-Signature-SHA256" not in first["headers"]  # no secret configured
    assert second["at"] - first["at"] >= 0.9  # Retry-After: 1 was honoured
    assert vhost.depth("default.dead") == 0


def test_webhook_answered_404_or_with_a_bad_url_is_dead_lettered_at_once(vhost, receiver, start_worker):
    start_worker()
    missing = publish("webhooks.deliver", url=receiver.base_url + "/missing", payload={"n": 1})
    not_http = publish("webhooks.deliver", url="file:///etc/passwd", payload={"n": 1})
    dead = {m.headers["id"]: m.headers for m in dead_letters(vhost, "default", count=2)}

    assert dead[missing][h.REASON] == h.REASON_PERMANENT
    assert dead[missing][h.ATTEMPTS] == 1
    assert "HTTP 404" in dead[missing][h.EXCEPTION_MESSAGE]
    assert receiver.base_url + "/missing" in dead[missing][h.EXCEPTION_MESSAGE]
    assert len(receiver.on("/missing")) == 1

    assert dead[not_http][h.REASON] == h.REASON_PERMANENT
    assert "is not an http:// or https:// URL" in dead[not_http][h.EXCEPTION_MESSAGE]


def test_webhook_that_never_answers_is_retried_then_dead_lettered(vhost, receiver, kit_env, monkeypatch,
                                                                 start_worker):
    set_env(kit_env, monkeypatch, KIT_WEBHOOK_TIMEOUT="1", KIT_MAX_RETRIES="1")
    start_worker()
    task_id = publish("webhooks.deliver", url=receiver.base_url + "/slow", payload={"n": 1})
    [dead] = dead_letters(vhost, "default")

    assert dead.headers["id"] == task_id
    assert dead.headers[h.REASON] == h.REASON_RETRIES_EXHAUSTED
    assert dead.headers[h.ATTEMPTS] == 2
    assert dead.headers[h.EXCEPTION_TYPE] == "TimeoutError"
    assert "did not answer within 1s" in dead.headers[h.EXCEPTION_MESSAGE]
    assert len(receiver.on("/slow")) == 2


# -- report export ----------------------------------------------------------------


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_report_is_written_and_a_redelivery_overwrites_it(kit_env, start_worker):
    worker = start_worker()
    report_dir = Path(kit_env["KIT_REPORT_DIR"])
    rows = [{"region": "north", "total": 10, "note": 'says "hi", twice'}, {"region": "süd", "total": 5, "tags": ["a"]}]
    task_id = publish("reports.export", report="sales_2024-q1", rows=rows)
    wait_succeeded(worker, task_id)

    path = report_dir / f"sales_2024-q1-{task_id}.csv"
    assert read_csv(path) == [
        ["region", "total", "note", "tags"],
        ["north", "10", 'says "hi", twice', ""],
        ["süd", "5", "", '["a"]'],
    ]

    # The same task delivered again (same id) replaces its file rather than adding one.
    publish("reports.export", task_id=task_id, report="sales_2024-q1", rows=rows[:1], columns=["total", "region"])
    wait_succeeded(worker, task_id, times=2)
    assert read_csv(path) == [["total", "region"], ["10", "north"]]
    assert sorted(p.name for p in report_dir.iterdir()) == [path.name]  # no temporary files left


def test_report_with_bad_input_is_dead_lettered(vhost, kit_env, start_worker):
    start_worker()
    bad_name = publish("reports.export", report="../../etc/cron", rows=[{"a": 1}])
    bad_rows = publish("reports.export", report="ok", rows=[{"a": 1}, "not a dict"])
    dead = {m.headers["id"]: m.headers for m in dead_letters(vhost, "bulk", count=2)}

    assert dead[bad_name][h.REASON] == h.REASON_PERMANENT
    assert "invalid report name '../../etc/cron'" in dead[bad_name][h.EXCEPTION_MESSAGE]
    assert dead[bad_rows][h.REASON] == h.REASON_PERMANENT
    assert "rows[1] is a str" in dead[bad_rows][h.EXCEPTION_MESSAGE]
    report_dir = Path(kit_env["KIT_REPORT_DIR"])
    assert not report_dir.exists() or list(report_dir.iterdir()) == []


# -- clean-up ---------------------------------------------------------------------


def test_cleanup_deletes_old_exports_and_keeps_new_ones(kit_env, start_worker):
    report_dir = Path(kit_env["KIT_REPORT_DIR"])
    report_dir.mkdir(parents=True)
    old, new, other = report_dir / "old.csv", report_dir / "new.csv", report_dir / "old-notes.txt"
    for path in (old, new, other):
        path.write_text("a\n1\n")
    long_ago = time.time() - 200 * 3600  # KIT_REPORT_MAX_AGE_HOURS defaults to 168
    os.utime(old, (long_ago, long_ago))
    os.utime(other, (long_ago, long_ago))

    worker = start_worker()
    task_id = publish("maintenance.cleanup_reports")
    wait_succeeded(worker, task_id)

    assert f"[{task_id}] succeeded" in worker.log()
    assert not old.exists()
    assert new.exists()
    assert other.exists()  # only *.csv exports are cleaned up
