"""Dead-letter operations on the real broker: `python -m service dlq stats|list|show|replay|purge|export|import`.

Dead letters are seeded without workers: published (confirmed) to the dead-letter
exchange with the headers a worker writes, or dead-lettered by RabbitMQ itself
(a reject without requeue from a work queue, so they carry only x-death). One
test runs real workers end to end.
"""

from __future__ import annotations

import base64
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import amqp
import pytest

from service import deadletters as dl
from service import headers as h
from service.client import Publisher
from service.deadletters import EXPORT_FORMAT, Filters
from service.publishing import ConfirmedChannel, Outgoing
from service.settings import load
from service.topology import connect
from tests.helpers import REPO, Vhost, wait_until
from tests.worker_tasks import recorded

DEAD = {"urgent": "urgent.dead", "default": "default.dead", "bulk": "bulk.dead"}
BROKER_DOWN_URL = "pyamqp://guest:guest@127.0.0.1:1//"


# -- running the command line ---------------------------------------------------------------


def run_cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python -m service dlq ARGS`, standard input not a terminal."""
    return subprocess.run([sys.executable, "-m", "service", "dlq", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def ok(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    result = run_cli(env, *args)
    assert result.returncode == 0, f"dlq {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def cli_json(env: dict[str, str], *args: str) -> Any:
    return json.loads(ok(env, *args, "--json").stdout)


def start_cli(env: dict[str, str], tmp_path: Path, *args: str, code: str | None = None) -> subprocess.Popen:
    """Start `dlq ARGS` in its own session (to be killed), output into files."""
    name = uuid.uuid4().hex[:6]
    argv = ([sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "service", "dlq", *args])
    with (tmp_path / f"{name}.out").open("wb") as out, (tmp_path / f"{name}.err").open("wb") as err:
        return subprocess.Popen(argv, env=env, cwd=REPO, start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err)


def kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(10)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The command failed with exactly one line on stderr and no stack trace."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# -- seeding dead letters ---------------------------------------------------------------------

_IDS = uuid.UUID("6f1c1f0e-3a57-4d0c-9a55-5b4f9e0c2d11")


def letter_id(label: str) -> str:
    """A realistic (UUID) task id, the same for a label in every test."""
    return str(uuid.uuid5(_IDS, label))


BINARY = bytes(range(256)) + b"\x00\xff\xfe not utf-8 \x80\x81"


@dataclass
class Spec:
    """One dead letter to seed."""

    label: str
    task: str
    queue: str = "default"  # the work queue it died in
    exception: str = ""
    message: str = ""
    reason: str = h.REASON_RETRIES_EXHAUSTED
    died_at: str = "2026-03-01T08:00:00.000+00:00"
    priority: int = 1
    args: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    binary: bool = False
    replays: int = 0
    attempts: int = 1
    by_broker: bool = False  # rejected from the work queue: RabbitMQ dead-letters it, with x-death only
    extra_headers: dict = field(default_factory=dict)
    extra_properties: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return letter_id(self.label)

    def body(self) -> bytes:
        if self.binary:
            return BINARY + self.label.encode()
        return json.dumps([self.args, self.kwargs, {"callbacks": None, "errbacks": None, "chain": None,
                                                    "chord": None}]).encode()

    def headers(self) -> dict[str, Any]:
        headers: dict[str, Any] = {
            "lang": "py", "task": self.task, "id": self.id, "shadow": None, "eta": None, "expires": None,
            "retries": self.attempts - 1, "timelimit": [None, None], "root_id": self.id, "parent_id": None,
            "argsrepr": repr(self.args), "kwargsrepr": repr(self.kwargs), "origin": "gen1@test",
            "ignore_result": False, "stamps": {}, "kit-enqueued-at": 1772352000.25,
        }
        headers.update(self.extra_headers)
        if self.by_broker:
            return headers
        headers.update({
            h.REASON: self.reason,
            h.EXCEPTION_TYPE: self.exception,
            h.EXCEPTION_MESSAGE: self.message,
            h.TRACEBACK: (f'Traceback (most recent call last):\n  File "tasks.py", line 42, in run\n'
                          f"    deliver()\n{self.exception}: {self.message}"),
            h.ATTEMPTS: self.attempts,
            h.SOURCE_QUEUE: self.queue,
            h.FIRST_FAILURE_AT: "2026-02-28T08:00:00.000+00:00",
            h.LAST_FAILURE_AT: self.died_at,
            h.DEAD_LETTERED_AT: self.died_at,
            h.WORKER: "worker-1.example",
        })
        if self.replays:
            headers[h.REPLAYS] = self.replays
        return headers

    def properties(self) -> dict[str, Any]:
        return {
            "content_type": "application/octet-stream" if self.binary else "application/json",
            "content_encoding": "binary" if self.binary else "utf-8",
            "priority": self.priority,
            "correlation_id": self.id,
            "delivery_mode": 2,
            **self.extra_properties,
        }


def seed(vhost: Vhost, specs: list[Spec]) -> None:
    """Put ``specs`` into their dead-letter queues, in this order."""
    depth = {q: vhost.depth(q) for q in DEAD.values()}
    publisher = ConfirmedChannel(load())
    conn = vhost.connection()
    try:
        channel = conn.channel()
        channel.confirm_select()
        pending: list[Outgoing] = []
        for spec in specs:
            if not spec.by_broker:
                pending.append(Outgoing("tasks.dead", spec.queue, spec.body(), spec.headers(), spec.properties()))
                depth[DEAD[spec.queue]] += 1
                continue
            publisher.publish_many(pending, window=500)
            pending = []
            channel.basic_publish_confirm(
                amqp.Message(spec.body(), application_headers=spec.headers(), **spec.properties()),
                exchange="tasks", routing_key=spec.queue,
            )
            message = wait_until(lambda q=spec.queue: channel.basic_get(q), 10, "the message in its work queue")
            channel.basic_reject(message.delivery_tag, requeue=False)
            depth[DEAD[spec.queue]] += 1
            wait_until(lambda q=spec.queue: vhost.depth(DEAD[q]) == depth[DEAD[q]], 10,
                       "RabbitMQ to dead-letter the rejected message")
        publisher.publish_many(pending, window=500)
    finally:
        conn.close()
        publisher.close()
    assert {q: vhost.depth(q) for q in DEAD.values()} == depth


def standard_set() -> list[Spec]:
    """Dead letters of every kind, in three queues. Positions in each queue follow this order."""
    return [
        Spec("d1", "webhooks.deliver", exception="requests.exceptions.ConnectTimeout",
             message="connect timeout to hooks.example.com", died_at="2026-03-01T08:00:00.000+00:00",
             priority=1, attempts=6, kwargs={"url": "https://hooks.example.com/a", "payload": {"n": 1}}),
        Spec("d2", "webhooks.deliver", exception="requests.exceptions.ConnectTimeout",
             message="connect timeout to hooks.example.com", died_at="2026-03-02T08:00:00.000+00:00",
             priority=3, attempts=6, kwargs={"url": "https://hooks.example.com/b", "payload": {"n": 2}},
             # Every AMQP header type, and properties other producers set: all must survive a round trip.
             extra_headers={"app-extra": {"when": datetime(2026, 3, 1, 7, 59, 1), "price": Decimal("12.50"),
                                         "raw": b"\xff\x00\x80", "flag": True, "ratio": 0.25, "big": 2**40,
                                         "negative": -5, "nested": [1, "a", None, {"deep": []}], "empty": ""}},
             extra_properties={"message_id": "msg-d2", "timestamp": 1772348340, "app_id": "billing",
                               "type": "webhook", "reply_to": "replies"}),
        Spec("d3", "test.record", exception="kombu.exceptions.DecodeError", message="not JSON",
             reason=h.REASON_UNDECODABLE, died_at="2026-03-03T08:00:00.000+00:00", priority=0, binary=True),
        Spec("d4", "webhooks.deliver", exception="service.errors.PermanentError",
             message="HTTP 400 from /v1/charges: [invalid_request] amount must be > 0 (see [/docs/errors])",
             reason=h.REASON_PERMANENT, died_at="2026-03-04T08:00:00.000+00:00", priority=2,
             kwargs={"url": "https://hooks.example.com/c", "payload": {"n": 3}}),
        Spec("d5", "test.record", args=["broker-rejected"], priority=2, attempts=2, by_broker=True),
        Spec("d6", "webhooks.deliver", exception="requests.exceptions.ConnectTimeout",
             message="connect timeout again", died_at="2026-03-05T08:00:00.000+00:00", priority=1,
             attempts=6, replays=3, kwargs={"url": "https://hooks.example.com/d", "payload": {"n": 4}}),
        Spec("u1", "emails.send", queue="urgent", exception="smtplib.SMTPServerDisconnected",
             message="Connection unexpectedly closed", died_at="2026-03-02T12:00:00.000+00:00", priority=3,
             attempts=4, kwargs={"to": "alice@example.com", "subject": "Your invoice"}),
        Spec("u2", "emails.send", queue="urgent", exception="smtplib.SMTPRecipientsRefused",
             message="{'bob@example.invalid': (550, b'no such user')}", reason=h.REASON_PERMANENT,
             died_at="2026-03-03T12:00:00.000+00:00", priority=2, kwargs={"to": "bob@example.invalid"}),
        Spec("b1", "reports.export", queue="bulk", exception="billiard.exceptions.TimeLimitExceeded",
             message="TimeLimitExceeded(360,)", reason=h.REASON_TIME_LIMIT,
             died_at="2026-03-01T00:00:00.000+00:00", priority=0, binary=True),
    ]


SPECS = {s.label: s for s in standard_set()}
ORDER = {q: [s.label for s in standard_set() if DEAD[s.queue] == q] for q in DEAD.values()}
ALL_IN_LIST_ORDER = ORDER["urgent.dead"] + ORDER["default.dead"] + ORDER["bulk.dead"]
LABEL_OF = {letter_id(label): label for label in SPECS}


@pytest.fixture
def seeded(vhost: Vhost, kit_env: dict[str, str], topology: None) -> dict[str, list[dict]]:
    """The standard set in the test's vhost; returns a peek of every dead-letter queue."""
    seed(vhost, standard_set())
    return {q: peek(vhost, q) for q in DEAD.values()}


# -- looking at queues without the code under test -------------------------------------------------


def _view(message: amqp.Message) -> dict[str, Any]:
    properties = {k: v for k, v in message.properties.items() if k != "application_headers"}
    headers = dict(message.properties.get("application_headers") or {})
    return {"id": headers.get("id"), "body": bytes(message.body), "headers": headers, "properties": properties}


def peek(vhost: Vhost, queue: str) -> list[dict[str, Any]]:
    """Every message of ``queue`` in order; consumed unacked and returned when the connection closes."""
    conn = vhost.connection()
    try:
        channel = conn.channel()
        channel.auto_decode = False
        _, count, _ = channel.queue_declare(queue, passive=True)
        received: list[amqp.Message] = []
        if count:
            channel.basic_qos(0, 0, False)
            channel.basic_consume(queue, no_ack=False, callback=received.append)
            while len(received) < count:
                conn.drain_events(timeout=5)
        return [_view(m) for m in received[:count]]
    finally:
        conn.close()


def take_all(vhost: Vhost, queue: str) -> list[dict[str, Any]]:
    """Remove and return every message of ``queue`` (bodies as bytes)."""
    conn = vhost.connection()
    try:
        channel = conn.channel()
        channel.auto_decode = False
        taken = []
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            taken.append(_view(message))
        return taken
    finally:
        conn.close()


def labels(items: list[dict[str, Any]]) -> list[str]:
    """The seed labels of messages or of rows the command printed, in order."""
    return [LABEL_OF.get(item["id"], item["id"]) for item in items]


def lock_free(vhost: Vhost, dead_queue: str) -> bool:
    """True when no replay or purge holds ``dead_queue`` (its exclusive lock queue is gone)."""
    try:
        vhost.counts(f"{dead_queue}.lock")
    except amqp.exceptions.NotFound:
        return True
    except amqp.exceptions.ResourceLocked:
        return False
    return False


def reject_back(vhost: Vhost, work_queue: str, count: int = 1) -> None:
    """Let RabbitMQ dead-letter ``count`` messages of a work queue (reject without requeue)."""
    dead = DEAD[work_queue]
    before = vhost.depth(dead)
    conn = vhost.connection()
    try:
        channel = conn.channel()
        for _ in range(count):
            message = wait_until(lambda: channel.basic_get(work_queue), 10, "a message to reject")
            channel.basic_reject(message.delivery_tag, requeue=False)
    finally:
        conn.close()
    wait_until(lambda: vhost.depth(dead) == before + count, 10, "the rejected messages in the dead-letter queue")


# -- stats --------------------------------------------------------------------------------------


def test_stats_counts_oldest_newest_and_groups(kit_env, seeded):
    broker_died = seeded["default.dead"][ORDER["default.dead"].index("d5")]["headers"]["x-death"][0]["time"]
    broker_died = broker_died.replace(tzinfo=UTC).isoformat(timespec="seconds")
    stats = {s["queue"]: s for s in cli_json(kit_env, "stats")}
    assert list(stats) == ["urgent.dead", "default.dead", "bulk.dead", "unroutable.dead"]
    default = stats["default.dead"]
    assert default["count"] == 6
    assert default["oldest"] == "2026-03-01T08:00:00+00:00"
    assert default["newest"] == broker_died  # RabbitMQ's own x-death time for d5
    assert default["by_task"] == {"webhooks.deliver": 4, "test.record": 2}
    assert default["by_exception"] == {"requests.exceptions.ConnectTimeout": 3, "kombu.exceptions.DecodeError": 1,
                                       "service.errors.PermanentError": 1, "(none)": 1}
    assert default["by_reason"] == {"retries-exhausted": 3, "undecodable": 1, "permanent-error": 1,
                                    "broker-rejected": 1}
    assert stats["urgent.dead"]["count"] == 2
    assert (stats["urgent.dead"]["oldest"], stats["urgent.dead"]["newest"]) == (
        "2026-03-02T12:00:00+00:00", "2026-03-03T12:00:00+00:00")
    assert stats["urgent.dead"]["by_exception"] == {"smtplib.SMTPServerDisconnected": 1,
                                                    "smtplib.SMTPRecipientsRefused": 1}
    assert stats["bulk.dead"]["by_reason"] == {"time-limit": 1}

    [only_bulk] = cli_json(kit_env, "stats", "--queue", "bulk")
    assert only_bulk["queue"] == "bulk.dead" and only_bulk["count"] == 1

    text = ok(kit_env, "stats", "--queue", "urgent.dead").stdout
    assert "urgent.dead: 2 dead letter(s), oldest 2026-03-02T12:00:00+00:00, newest 2026-03-03T12:00:00+00:00" in text
    assert "by task: emails.send 2" in text
    assert "smtplib.SMTPServerDisconnected 1" in text and "permanent-error 1" in text


def test_stats_of_empty_queues(kit_env, topology):
    stats = cli_json(kit_env, "stats")
    assert [(s["queue"], s["count"], s["oldest"], s["newest"]) for s in stats] == [
        ("urgent.dead", 0, None, None), ("default.dead", 0, None, None), ("bulk.dead", 0, None, None),
        ("unroutable.dead", 0, None, None)]
    assert "default.dead: 0 dead letter(s)" in ok(kit_env, "stats").stdout


# -- list -----------------------------------------------------------------------------------------


def test_list_shows_what_died_where_and_why(kit_env, seeded):
    rows = cli_json(kit_env, "list")
    assert labels(rows) == ALL_IN_LIST_ORDER
    by_label = dict(zip(labels(rows), rows, strict=True))
    for label, spec in SPECS.items():
        row = by_label[label]
        assert row["id"] == spec.id
        assert row["task"] == spec.task
        assert row["queue"] == DEAD[spec.queue]
        assert row["source_queue"] == spec.queue
        assert row["attempts"] == spec.attempts
        assert row["replays"] == spec.replays
        if not spec.by_broker:
            assert row["exception"] == spec.exception
            assert row["reason"] == spec.reason
            assert row["died_at"] == datetime.fromisoformat(spec.died_at).isoformat(timespec="seconds")
    assert [by_label[label]["position"] for label in ORDER["default.dead"]] == [1, 2, 3, 4, 5, 6]
    broker = by_label["d5"]
    assert broker["reason"] == "broker-rejected" and broker["exception"] == ""
    assert abs(datetime.fromisoformat(broker["died_at"]) - datetime.now(UTC)).total_seconds() < 120


def test_list_prints_whole_ids_when_not_on_a_terminal(kit_env, seeded):
    """The id is what `dlq show` and `--id` need: a pipe (| grep, | less, CI logs) must get it whole."""
    text = ok(kit_env, "list").stdout
    for spec in SPECS.values():
        assert spec.id in text, f"id of {spec.label} cut in:\n{text}"
        assert spec.task in text
    assert "9 dead letter(s)" in text


LIST_FILTERS = [
    ([], ALL_IN_LIST_ORDER),
    (["--queue", "default"], ["d1", "d2", "d3", "d4", "d5", "d6"]),
    (["--queue", "default.dead"], ["d1", "d2", "d3", "d4", "d5", "d6"]),
    (["-q", "urgent", "-q", "bulk.dead"], ["u1", "u2", "b1"]),
    (["-q", "default", "-q", "default.dead"], ["d1", "d2", "d3", "d4", "d5", "d6"]),  # one queue, listed once
    (["--task", "webhooks.deliver"], ["d1", "d2", "d4", "d6"]),
    (["--task", "emails.*"], ["u1", "u2"]),
    (["--task", "emails.*", "--task", "reports.*"], ["u1", "u2", "b1"]),
    (["--exception", "ConnectTimeout"], ["d1", "d2", "d6"]),
    (["--exception", "requests.exceptions.ConnectTimeout"], ["d1", "d2", "d6"]),
    (["--exception", "*Timeout*"], ["d1", "d2", "d6"]),
    (["--exception", "SMTP*", "--exception", "TimeLimitExceeded"], ["u1", "u2", "b1"]),
    (["--reason", "permanent-error"], ["u2", "d4"]),
    (["--reason", "broker-rejected"], ["d5"]),
    (["--id", letter_id("d2"), "--id", letter_id("u1")], ["u1", "d2"]),
    (["--since", "2026-03-02T08:00:00Z", "--until", "2026-03-03T12:00:00Z"], ["u1", "u2", "d2", "d3"]),
    (["--since", "2026-03-04"], ["d4", "d5", "d6"]),
    (["--until", "2026-03-01T08:00:00+00:00"], ["d1", "b1"]),
    (["--until", "2026-03-01T10:00:00+02:00"], ["d1", "b1"]),
    (["--since", "1h"], ["d5"]),
    (["--since", "30d", "--queue", "urgent"], []),
    (["--limit", "2"], ["u1", "u2"]),
    (["-q", "default", "--limit", "3"], ["d1", "d2", "d3"]),
    (["--task", "webhooks.*", "--exception", "ConnectTimeout", "--since", "2026-03-02"], ["d2", "d6"]),
    (["--task", "no.such.task"], []),
    # --search: text in the exception's message or class name, any case, no pattern characters.
    (["--search", "CONNECTION unexpectedly"], ["u1"]),
    (["--search", "timeout"], ["d1", "d2", "d6"]),  # ConnectTimeout, "connect timeout ..."
    (["--search", "smtplib"], ["u1", "u2"]),  # the qualified class name
    (["--search", "[invalid_request]"], ["d4"]),  # brackets are text, not a pattern
    (["--search", "no such text anywhere"], []),
    (["--search", "timeout", "--task", "webhooks.*", "--since", "2026-03-02"], ["d2", "d6"]),
]


@pytest.mark.parametrize(("args", "expected"), LIST_FILTERS, ids=[" ".join(a) or "all" for a, _ in LIST_FILTERS])
def test_list_filters(kit_env, seeded, args, expected):
    assert labels(cli_json(kit_env, "list", *args)) == expected


def test_looking_changes_nothing(vhost, kit_env, seeded, tmp_path):
    """list, show, stats, export and dry runs leave every queue identical: same bodies, headers, order."""
    for args in (["list"], ["list", "--json"], ["list", "-q", "default", "--task", "webhooks.*"],
                 ["list", "--exception", "ConnectTimeout", "--limit", "1"], ["stats"], ["stats", "--json"],
                 ["show", letter_id("d4"), "--json"], ["show", letter_id("b1"), "--json"],
                 ["show", letter_id("d5"), "--hide-args"], ["show", letter_id("u1")],
                 ["export", "-o", str(tmp_path / "export.jsonl")], ["export", "-q", "default", "-o", "-"],
                 ["replay", "--dry-run"], ["replay", "-q", "default", "--exception", "ConnectTimeout", "--dry-run"]):
        ok(kit_env, *args)
        assert {q: peek(vhost, q) for q in DEAD.values()} == seeded, f"dlq {' '.join(args)} changed a queue"
    conn = connect(load())
    try:
        assert [d.id for d in dl.browse(conn, "default.dead")] == [m["id"] for m in seeded["default.dead"]]
        assert [d.body for d in dl.browse(conn, "default.dead")] == [m["body"] for m in seeded["default.dead"]]
    finally:
        conn.release()
    assert vhost.depths(["urgent", "default", "bulk"]) == {"urgent": 0, "default": 0, "bulk": 0}
    # Finally take them out for real: exactly what was seeded, in order, byte for byte.
    for queue in DEAD.values():
        taken = take_all(vhost, queue)
        assert taken == seeded[queue]
        assert labels(taken) == ORDER[queue]
        for message in taken:
            spec = SPECS[LABEL_OF[message["id"]]]
            assert message["body"] == spec.body()
            assert message["properties"]["priority"] == spec.priority


# -- show -------------------------------------------------------------------------------------------


def test_show_a_dead_letter_with_everything_about_it(kit_env, seeded):
    spec = SPECS["u1"]
    info = cli_json(kit_env, "show", spec.id)
    assert (info["id"], info["task"], info["queue"], info["position"]) == (spec.id, "emails.send", "urgent.dead", 1)
    assert info["reason"] == "retries-exhausted"
    assert info["exception"] == "smtplib.SMTPServerDisconnected"
    assert info["message"] == "Connection unexpectedly closed"
    assert info["attempts"] == 4 and info["replays"] == 0
    assert info["source_queue"] == "urgent"
    assert info["died_at"] == "2026-03-02T12:00:00+00:00"
    assert info["first_failure_at"] == "2026-02-28T08:00:00.000+00:00"
    assert info["traceback"].startswith("Traceback (most recent call last):")
    assert info["traceback"].endswith("smtplib.SMTPServerDisconnected: Connection unexpectedly closed")
    assert (info["args"], info["kwargs"]) == ([], {"to": "alice@example.com", "subject": "Your invoice"})
    assert info["headers"]["kit-worker"] == "worker-1.example"
    assert info["headers"]["argsrepr"] == "[]"
    assert info["properties"]["priority"] == 3
    assert info["body_bytes"] == len(spec.body())
    assert info["x_death"] == []

    text = ok(kit_env, "show", spec.id).stdout
    for fragment in (spec.id, "emails.send", "urgent.dead", "retries-exhausted", "smtplib.SMTPServerDisconnected",
                     "Connection unexpectedly closed", 'File "tasks.py", line 42, in run', "alice@example.com",
                     "2026-03-02T12:00:00+00:00", "kit-worker"):
        assert fragment in text

    # Looking in the right queue finds it; in another one it is not there.
    assert cli_json(kit_env, "show", spec.id, "--queue", "urgent")["id"] == spec.id
    missing = one_line_error(run_cli(kit_env, "show", spec.id, "--queue", "default"))
    assert spec.id in missing and "default.dead" in missing


def test_show_the_x_death_history_of_a_message_rabbitmq_dead_lettered(kit_env, seeded):
    spec = SPECS["d5"]
    info = cli_json(kit_env, "show", spec.id)
    assert info["reason"] == "broker-rejected"
    assert info["source_queue"] == "default"
    [death] = info["x_death"]
    assert (death["reason"], death["queue"], death["exchange"], death["count"]) == ("rejected", "default", "tasks", 1)
    assert death["routing-keys"] == ["default"]
    died = datetime.fromisoformat(death["time"]["$datetime"]).replace(tzinfo=UTC)
    assert info["died_at"] == died.isoformat(timespec="seconds")
    assert info["args"] == ["broker-rejected"]
    assert info["attempts"] == 2  # Celery's retries header + 1: it was delivered twice

    text = ok(kit_env, "show", spec.id).stdout
    assert "x-death" in text and '"reason": "rejected"' in text and "broker-rejected" in text


def test_show_can_hide_the_arguments(kit_env, seeded):
    spec = SPECS["u1"]
    text = ok(kit_env, "show", spec.id, "--hide-args").stdout
    assert spec.id in text and "smtplib.SMTPServerDisconnected" in text
    assert "alice@example.com" not in text and "Your invoice" not in text
    info = cli_json(kit_env, "show", spec.id, "--hide-args")
    assert "args" not in info and "kwargs" not in info
    assert info["headers"]["kwargsrepr"] == "<hidden>" and info["headers"]["argsrepr"] == "<hidden>"
    assert "alice@example.com" not in json.dumps(info)
    assert info["headers"]["task"] == "emails.send"


def test_show_prints_exception_messages_verbatim(kit_env, seeded):
    """Square brackets in an exception message are text, not console markup."""
    spec = SPECS["d4"]
    assert cli_json(kit_env, "show", spec.id)["message"] == spec.message
    result = run_cli(kit_env, "show", spec.id)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert spec.message in result.stdout


def test_binary_bodies_are_shown_without_arguments(kit_env, seeded):
    info = cli_json(kit_env, "show", letter_id("d3"))
    assert info["body_bytes"] == len(SPECS["d3"].body())
    assert (info["args"], info["kwargs"]) == (None, None)
    assert info["properties"]["content_type"] == "application/octet-stream"


# -- replay ---------------------------------------------------------------------------------------------

REPLAYS = [
    # (args, replayed, refused, skipped, target queue or None for each one's source)
    (["-q", "default", "--exception", "ConnectTimeout"], ["d1", "d2"], ["d6"], 3, None),
    (["--task", "emails.*"], ["u1", "u2"], [], 7, None),
    (["--id", letter_id("d4")], ["d4"], [], 8, None),
    (["--since", "2026-03-03", "--until", "2026-03-04T23:59:59Z"], ["u2", "d3", "d4"], [], 6, None),
    (["-q", "default", "--limit", "2"], ["d1", "d2"], [], 4, None),
    (["--limit", "3"], ["u1", "u2", "d1"], [], 5, None),  # the limit spans queues; bulk.dead is not walked
    (["-q", "default", "--reason", "broker-rejected"], ["d5"], [], 5, None),
    (["--reason", "permanent-error", "--reason", "time-limit"], ["u2", "d4", "b1"], [], 6, None),
    ([], ["u1", "u2", "d1", "d2", "d3", "d4", "d5", "b1"], ["d6"], 0, None),
    (["-q", "default", "--id", letter_id("d6"), "--force"], ["d6"], [], 5, None),
    (["--to", "bulk", "--task", "webhooks.deliver", "--max-replays", "5"], ["d1", "d2", "d4", "d6"], [], 5, "bulk"),
    (["--queue", "bulk", "--to", "urgent"], ["b1"], [], 0, "urgent"),
    (["--search", "AGAIN", "--force"], ["d6"], [], 8, None),
]


@pytest.mark.parametrize(("args", "replayed", "refused", "skipped", "target"), REPLAYS,
                         ids=[" ".join(a) or "all" for a, *_ in REPLAYS])
def test_replay_puts_matching_dead_letters_back(vhost, kit_env, seeded, args, replayed, refused, skipped, target):
    result = ok(kit_env, "replay", *args)
    summary = result.stdout.strip().splitlines()[-1]
    assert summary == f"replayed {len(replayed)}, skipped {skipped}, refused {len(refused)}, failed 0"
    if refused:
        assert "--force" in result.stderr
        for label in refused:
            assert letter_id(label) in result.stdout

    # What did not match, and what was refused, stays where it was, in its order.
    for queue in DEAD.values():
        remaining = [m for m in seeded[queue] if LABEL_OF[m["id"]] not in replayed]
        assert peek(vhost, queue) == remaining

    # Each replayed message is on its source queue (or --to): same body and priority, fresh retry budget.
    arrived = {q: take_all(vhost, q) for q in ("urgent", "default", "bulk")}
    expected_queue = {label: target or SPECS[label].queue for label in replayed}
    assert {q: sorted(labels(m)) for q, m in arrived.items()} == {
        q: sorted(label for label in replayed if expected_queue[label] == q) for q in ("urgent", "default", "bulk")}
    for queue, messages in arrived.items():
        for message in messages:
            spec = SPECS[LABEL_OF[message["id"]]]
            original = next(m for m in seeded[DEAD[spec.queue]] if m["id"] == spec.id)
            assert message["body"] == spec.body() == original["body"]
            assert message["properties"]["priority"] == spec.priority
            assert message["properties"] == original["properties"]  # content type, encoding, ids, priority
            headers = message["headers"]
            assert headers["retries"] == 0  # a fresh retry budget
            assert headers["eta"] is None
            assert headers[h.REPLAYS] == spec.replays + 1
            assert datetime.fromisoformat(headers[h.REPLAYED_AT]) > datetime(2026, 3, 6, tzinfo=UTC)
            assert not any(k.startswith("x-") for k in headers), headers
            assert h.WORKER_LOST not in headers and "kit-wait" not in headers
            renewed = ("retries", h.REPLAYS, "kit-enqueued-at")
            kept = {k: v for k, v in original["headers"].items() if not k.startswith("x-") and k not in renewed}
            assert {k: v for k, v in headers.items() if k in kept} == kept  # task, id, argsrepr, kit-*, ...
        # A priority queue: the most urgent replayed message comes out first.
        assert [m["properties"]["priority"] for m in messages] == sorted(
            (m["properties"]["priority"] for m in messages), reverse=True), queue


def test_replay_that_cannot_publish_keeps_the_messages_and_says_so(vhost, kit_env, seeded):
    conn = vhost.connection()
    conn.channel().queue_delete("urgent")  # nowhere to put them: the broker returns them unroutable
    conn.close()
    result = run_cli(kit_env, "replay", "-q", "urgent")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"replayed 0, skipped 0, refused 0, failed [12]", summary), summary  # it stops at the first
    assert all("failed: " in line for line in result.stdout.strip().splitlines()[:-1])
    assert "topology declare" in result.stdout
    assert peek(vhost, "urgent.dead") == seeded["urgent.dead"]


def test_the_library_releases_its_lock_when_it_returns(vhost, kit_env, seeded):
    conn = connect(load())
    other = connect(load())
    try:
        outcome = dl.replay(conn, load(), "urgent.dead", Filters(ids=(letter_id("u1"),)))
        assert [d.id for d in outcome.taken] == [letter_id("u1")]
        assert lock_free(vhost, "urgent.dead")
        outcome = dl.purge(other, "urgent.dead", Filters())
        assert [d.id for d in outcome.taken] == [letter_id("u2")]
        assert lock_free(vhost, "urgent.dead")
        assert dl.replay(conn, load(), "urgent.dead", Filters()).counts()["taken"] == 0
    finally:
        conn.release()
        other.release()


def test_replay_json_summary(kit_env, seeded):
    outcome = cli_json(kit_env, "replay", "-q", "default", "--task", "webhooks.deliver")
    assert outcome["dry_run"] is False
    assert outcome["totals"] == {"taken": 3, "skipped": 2, "refused": 1, "failed": 0}
    actions = {LABEL_OF[m["id"]]: (m["action"], m["to"]) for m in outcome["messages"]}
    assert actions == {"d1": ("replayed", "default"), "d2": ("replayed", "default"), "d4": ("replayed", "default"),
                       "d6": ("refused", None)}


def test_dry_run_prints_exactly_what_would_be_replayed_and_changes_nothing(vhost, kit_env, seeded):
    args = ["--exception", "ConnectTimeout", "--exception", "SMTP*"]
    text = ok(kit_env, "replay", *args, "--dry-run")
    lines = text.stdout.strip().splitlines()
    assert lines[-1] == "would replay 4, skipped 4, refused 1, failed 0 (dry run: nothing changed)"
    would = [line for line in lines if line.startswith("would replay ") and "-> " in line]
    assert len(would) == 4
    for label in ("u1", "u2", "d1", "d2"):
        [line] = [line for line in would if letter_id(label) in line]
        assert line.endswith(f"-> {SPECS[label].queue}")
    assert any(line.startswith("refused") and letter_id("d6") in line for line in lines)
    dry = cli_json(kit_env, "replay", *args, "--dry-run")
    assert dry["dry_run"] is True
    assert {q: peek(vhost, q) for q in DEAD.values()} == seeded
    assert vhost.depths(["urgent", "default", "bulk"]) == {"urgent": 0, "default": 0, "bulk": 0}

    real = cli_json(kit_env, "replay", *args)
    strip = [{k: v for k, v in m.items() if k != "action"} for m in dry["messages"]]
    assert strip == [{k: v for k, v in m.items() if k != "action"} for m in real["messages"]]
    assert [m["action"] for m in dry["messages"]] == ["would replay"] * 4 + ["refused"]
    assert [m["action"] for m in real["messages"]] == ["replayed"] * 4 + ["refused"]
    assert dry["totals"] == real["totals"] == {"taken": 4, "skipped": 4, "refused": 1, "failed": 0}
    assert sorted(labels(take_all(vhost, "urgent")) + labels(take_all(vhost, "default"))) == ["d1", "d2", "u1", "u2"]


def test_replay_rate_limit(vhost, kit_env, topology):
    seed(vhost, [Spec(f"r{i}", "test.record", args=[i]) for i in range(6)])
    ok(kit_env, "replay", "--rate", "10")
    replayed = take_all(vhost, "default")
    assert [m["id"] for m in replayed] == [letter_id(f"r{i}") for i in range(6)]
    moments = sorted(datetime.fromisoformat(m["headers"][h.REPLAYED_AT]) for m in replayed)
    assert (moments[-1] - moments[0]).total_seconds() >= 0.45  # 6 messages at 10/s: 5 gaps of 0.1 s


def test_replay_budget_is_counted_in_kit_replays_and_refused_unless_forced(vhost, kit_env, topology):
    spec = Spec("again", "webhooks.deliver", exception="requests.exceptions.ConnectTimeout", priority=2)
    seed(vhost, [spec])
    for round_ in (1, 2, 3):  # KIT_MAX_REPLAYS defaults to 3
        assert ok(kit_env, "replay").stdout.strip() == "replayed 1, skipped 0, refused 0, failed 0"
        [message] = peek(vhost, "default")
        assert message["headers"][h.REPLAYS] == round_ and message["headers"]["retries"] == 0
        assert message["properties"]["priority"] == 2
        reject_back(vhost, "default")  # it died again: RabbitMQ dead-letters it, kit-replays travels along
        [dead] = peek(vhost, "default.dead")
        assert dead["headers"][h.REPLAYS] == round_ and dead["headers"]["x-death"][0]["reason"] == "rejected"

    refused = run_cli(kit_env, "replay")
    assert refused.returncode in (0, 1) and "Traceback" not in refused.stderr
    assert refused.stdout.strip().splitlines()[-1] == "replayed 0, skipped 0, refused 1, failed 0"
    assert spec.id in refused.stdout and "replays=3" in refused.stdout
    assert "replayed 3 time(s) already" in refused.stderr and "--force" in refused.stderr
    assert vhost.depths(["default", "default.dead"]) == {"default": 0, "default.dead": 1}

    dry = cli_json(kit_env, "replay", "--dry-run")
    assert [(m["action"], m["replays"]) for m in dry["messages"]] == [("refused", 3)]
    assert "refused 1" in ok(kit_env, "replay", "--max-replays", "2").stdout

    # A bigger budget, from the environment or the option, lets it through.
    env = dict(kit_env, KIT_MAX_REPLAYS="5")
    assert ok(env, "replay").stdout.strip() == "replayed 1, skipped 0, refused 0, failed 0"
    assert peek(vhost, "default")[0]["headers"][h.REPLAYS] == 4
    reject_back(vhost, "default")
    assert "refused 1" in ok(env, "replay", "--max-replays", "4").stdout
    env_small = dict(kit_env, KIT_MAX_REPLAYS="1")
    assert "refused 1" in ok(env_small, "replay").stdout
    assert ok(env_small, "replay", "--force").stdout.strip() == "replayed 1, skipped 0, refused 0, failed 0"
    [message] = take_all(vhost, "default")
    assert message["headers"][h.REPLAYS] == 5
    assert message["body"] == spec.body()
    assert vhost.depth("default.dead") == 0


def test_budget_refusals_do_not_move_anything_and_keep_the_order(vhost, kit_env, topology):
    specs = [Spec(f"m{i}", "webhooks.deliver", replays=i % 3) for i in range(9)]
    seed(vhost, specs)
    before = peek(vhost, "default.dead")
    result = ok(kit_env, "replay", "--max-replays", "1")
    assert result.stdout.strip().splitlines()[-1] == "replayed 3, skipped 0, refused 6, failed 0"
    assert peek(vhost, "default.dead") == [m for m in before if m["headers"].get(h.REPLAYS, 0) >= 1]
    assert sorted(m["id"] for m in take_all(vhost, "default")) == sorted(s.id for s in specs if s.replays == 0)


# -- crashes and concurrency ------------------------------------------------------------------------------


def test_kill_9_midway_loses_nothing_and_a_second_replay_finishes(vhost, kit_env, topology, tmp_path):
    specs = [Spec(f"k{i:03d}", "test.record", args=[i], priority=i % 4) for i in range(300)]
    seed(vhost, specs)
    all_ids = [s.id for s in specs]
    replay = start_cli(kit_env, tmp_path, "replay", "--rate", "50")
    try:
        wait_until(lambda: vhost.depth("default") >= 25, 30, "the replay to be under way")
        assert replay.poll() is None, "the replay finished before it could be killed"
    finally:
        kill(replay)
    # The broker requeues what the dead process held and drops its lock when its connection goes.
    wait_until(lambda: vhost.counts("default.dead")[1] == 0 and lock_free(vhost, "default.dead"), 15,
               "the broker to notice the killed replay")
    wait_until(lambda: sum(vhost.depths(["default", "default.dead"]).values()) >= 300, 10, "the requeue")
    dead = [m["id"] for m in peek(vhost, "default.dead")]
    work = [m["id"] for m in peek(vhost, "default")]
    assert 0 < len(dead) < 300
    assert set(dead) | set(work) == set(all_ids)  # nothing lost
    assert len(set(dead) & set(work)) <= 1  # at worst one duplicate
    assert len(work) == len(set(work)) and len(dead) == len(set(dead))
    assert dead == [i for i in all_ids if i in set(dead)]  # what is left kept its order

    # Running it again finishes the job.
    summary = ok(kit_env, "replay").stdout.strip()
    assert summary == f"replayed {len(dead)}, skipped 0, refused 0, failed 0"
    assert vhost.depth("default.dead") == 0
    work = [m["id"] for m in take_all(vhost, "default")]
    assert set(work) == set(all_ids) and len(work) - len(set(work)) <= 1


_KILL_BEFORE_SECOND_REMOVAL = """
import os, signal, sys
from service import deadletters as dl
acks = 0
real_ack = dl.Walk.ack
def ack(self, letter):
    global acks
    acks += 1
    if acks == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    real_ack(self, letter)
dl.Walk.ack = ack
from service.cli import main
main(args=["dlq", *sys.argv[1:]], prog_name="python -m service")
"""


@pytest.mark.parametrize("pace", [["--rate", "50"], []], ids=["paced", "unpaced"])
def test_a_kill_at_any_moment_duplicates_at_most_one_message(vhost, kit_env, topology, tmp_path, pace):
    """Killed right before it removes its second message (after the first one's copy is confirmed)."""
    specs = [Spec(f"w{i:03d}", "test.record", args=[i]) for i in range(250)]
    seed(vhost, specs)
    replay = start_cli(kit_env, tmp_path, "replay", *pace, code=_KILL_BEFORE_SECOND_REMOVAL)
    assert replay.wait(30) == -signal.SIGKILL
    wait_until(lambda: vhost.counts("default.dead")[1] == 0 and lock_free(vhost, "default.dead"), 15,
               "the broker to notice the killed replay")
    dead = [m["id"] for m in take_all(vhost, "default.dead")]
    work = [m["id"] for m in take_all(vhost, "default")]
    assert set(dead) | set(work) == {s.id for s in specs}
    duplicates = set(dead) & set(work)
    assert len(duplicates) <= 1, f"{len(duplicates)} messages are both replayed and still dead-lettered"


def _replay_under_way(vhost: Vhost, kit_env: dict[str, str], tmp_path: Path, count: int = 200) -> subprocess.Popen:
    """A slow replay (5/s) of ``count`` dead letters of the default queue, holding its lock."""
    seed(vhost, [Spec(f"c{i:02d}", "test.record", args=[i]) for i in range(count)])
    replay = start_cli(kit_env, tmp_path, "replay", "-q", "default", "--rate", "5")
    wait_until(lambda: vhost.depth("default") >= 1, 20, "the first replay to be under way")
    assert replay.poll() is None
    return replay


def _finish_after_kill(vhost: Vhost, kit_env: dict[str, str], count: int = 200) -> None:
    wait_until(lambda: lock_free(vhost, "default.dead") and vhost.counts("default.dead")[1] == 0, 30,
               "the lock to be released")
    left = vhost.depth("default.dead")
    assert ok(kit_env, "replay", "-q", "default").stdout.strip() == f"replayed {left}, skipped 0, refused 0, failed 0"
    assert lock_free(vhost, "default.dead")  # a finished replay releases its lock at once
    work = [m["id"] for m in take_all(vhost, "default")]
    assert set(work) == {letter_id(f"c{i:02d}") for i in range(count)} and len(work) - len(set(work)) <= 1


def test_a_second_replay_of_the_same_queue_is_refused(vhost, kit_env, topology, tmp_path):
    first = _replay_under_way(vhost, kit_env, tmp_path)
    try:
        second = run_cli(kit_env, "replay", "-q", "default")
        line = one_line_error(second)
        assert "another replay" in line and "'default.dead'" in line
        # It names the holder: the OS user, host, pid and command of the first, and since when.
        assert f"@{socket.gethostname()} pid {first.pid} (dlq replay) since 20" in line, line
        assert second.stdout == ""
        # The library refuses other connections the same way, with the holder's record.
        conn = connect(load())
        try:
            with pytest.raises(dl.QueueBusy, match="another replay") as refused:
                dl.hold(conn, "default.dead")
            assert refused.value.holder["pid"] == first.pid
            assert refused.value.holder["holder"].endswith(f"pid {first.pid} (dlq replay)")
            assert dl.holder_of(conn, "default.dead") == refused.value.holder
        finally:
            conn.release()
        # list says who holds the queue whose letters it cannot see.
        listed = ok(kit_env, "list", "-q", "default")
        assert f"pid {first.pid} (dlq replay) since 20" in listed.stderr and "holds default.dead" in listed.stderr
        assert first.poll() is None
    finally:
        kill(first)
    _finish_after_kill(vhost, kit_env)


def test_a_purge_during_a_replay_is_refused(vhost, kit_env, topology, tmp_path):
    """Not "nothing matches": the replay holds every message, and the operator must be told why."""
    first = _replay_under_way(vhost, kit_env, tmp_path)
    try:
        purge = run_cli(kit_env, "purge", "-q", "default", "--yes")
        assert f"pid {first.pid} (dlq replay)" in one_line_error(purge)
        # An import into the queue waits for the replay too: it publishes nothing.
        seed(vhost, [Spec("i1", "test.record", queue="urgent")])
        archive = tmp_path / "one.jsonl"
        ok(kit_env, "export", "-q", "urgent", "-o", str(archive))
        imported = run_cli(kit_env, "import", str(archive), "-q", "default")
        assert "another replay" in one_line_error(imported) and f"pid {first.pid}" in imported.stderr
    finally:
        kill(first)
    _finish_after_kill(vhost, kit_env)


# -- end to end with real workers ---------------------------------------------------------------------------


def test_replayed_tasks_run_and_succeed_once_the_cause_is_fixed(vhost, kit_env, start_worker, tmp_path):
    worker = start_worker()
    markers = {"low": "t-low", "high": "t-high", "critical": "t-critical"}
    with Publisher() as publisher:
        ids = {name: publisher.publish("test.until_fixed", [marker], priority=name) for name, marker in markers.items()}
    wait_until(lambda: vhost.depth("default.dead") == 3, 30, "the tasks to exhaust their retries")
    assert worker.terminate() == 0
    wait_until(lambda: vhost.counts("default")[1] == 0, 15, "the worker to stop consuming")

    rows = cli_json(kit_env, "list", "-q", "default")
    assert sorted(r["id"] for r in rows) == sorted(ids.values())
    for row in rows:
        assert (row["task"], row["reason"], row["exception"]) == ("test.until_fixed", "retries-exhausted",
                                                                    "ConnectionError")
        assert row["attempts"] == 2 and row["source_queue"] == "default" and row["replays"] == 0
    for marker in markers.values():
        assert recorded(tmp_path, "attempt").count(f"{marker}:0") == 1
        assert recorded(tmp_path, "attempt").count(f"{marker}:1") == 1

    # The cause is fixed (with one last hiccup each, which needs a fresh retry budget to get through).
    (tmp_path / "fixed").write_text("1")
    assert ok(kit_env, "replay").stdout.strip() == "replayed 3, skipped 0, refused 0, failed 0"
    assert vhost.depth("default.dead") == 0
    waiting = peek(vhost, "default")  # nobody consumes: look at what was replayed
    priority = {"low": 0, "high": 2, "critical": 3}
    assert [m["id"] for m in waiting] == [ids["critical"], ids["high"], ids["low"]]
    for name, task_id in ids.items():
        [message] = [m for m in waiting if m["id"] == task_id]
        assert message["properties"]["priority"] == priority[name]
        assert message["headers"]["retries"] == 0 and message["headers"][h.REPLAYS] == 1

    start_worker()
    wait_until(lambda: sorted(recorded(tmp_path, "done")) == sorted(markers.values()), 30,
               "the replayed tasks to succeed")
    for marker in markers.values():
        assert [a for a in recorded(tmp_path, "attempt") if a.startswith(f"{marker}:")] == [
            f"{marker}:0", f"{marker}:1", f"{marker}:0", f"{marker}:1"]
    wait_until(lambda: vhost.depths(["default", "default.dead"]) == {"default": 0, "default.dead": 0}, 10,
               "the queues to be empty")
    assert recorded(tmp_path, "done").count("t-low") == 1


# -- purge, export, import ------------------------------------------------------------------------------------


def test_purge_asks_first_and_refuses_without_a_terminal(vhost, kit_env, seeded):
    result = run_cli(kit_env, "purge", "-q", "default")
    line = one_line_error(result)
    assert "6 dead letter(s) match" in line and "--yes" in line
    assert {q: peek(vhost, q) for q in DEAD.values()} == seeded

    for answer, purged in ((b"n\n", False), (b"y\n", True)):
        leader, follower = pty.openpty()
        try:
            process = subprocess.Popen([sys.executable, "-m", "service", "dlq", "purge", "-q", "urgent"],
                                       env=kit_env, cwd=REPO, stdin=follower, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE)
            os.write(leader, answer)
            out, err = process.communicate(timeout=30)
        finally:
            os.close(leader)
            os.close(follower)
        assert b"Purge 2 dead letter(s) from urgent.dead?" in out
        assert b"Traceback" not in err
        if purged:
            assert process.returncode == 0 and b"purged 2, kept 0" in out
            assert vhost.depth("urgent.dead") == 0
        else:
            assert process.returncode != 0
            assert peek(vhost, "urgent.dead") == seeded["urgent.dead"]
    assert peek(vhost, "default.dead") == seeded["default.dead"]


def test_purge_with_filters_keeps_the_rest_in_order(vhost, kit_env, seeded):
    result = ok(kit_env, "purge", "--exception", "ConnectTimeout", "--yes")
    assert result.stdout.strip() == "purged 3, kept 6"
    assert peek(vhost, "default.dead") == [m for m in seeded["default.dead"] if LABEL_OF[m["id"]] not in
                                           ("d1", "d2", "d6")]
    assert peek(vhost, "urgent.dead") == seeded["urgent.dead"]
    nothing = ok(kit_env, "purge", "--task", "nothing.matches", "--yes")
    assert nothing.stdout.strip() == "nothing matches: nothing purged"
    assert ok(kit_env, "purge", "-q", "urgent", "--limit", "1", "--yes").stdout.strip() == "purged 1, kept 1"
    assert labels(peek(vhost, "urgent.dead")) == ["u2"]
    assert vhost.depths(["urgent", "default", "bulk"]) == {"urgent": 0, "default": 0, "bulk": 0}


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_export_purge_import_round_trip_byte_for_byte(vhost, kit_env, seeded, tmp_path):
    exported = tmp_path / "export.jsonl"
    assert ok(kit_env, "export", "-o", str(exported)).stdout.strip() == f"exported 9 dead letter(s) to {exported}"
    records = _records(exported)
    assert [LABEL_OF[r["id"]] for r in records] == ALL_IN_LIST_ORDER
    for record in records:
        spec = SPECS[LABEL_OF[record["id"]]]
        assert record["format"] == EXPORT_FORMAT and record["queue"] == DEAD[spec.queue]
        assert base64.b64decode(record["body"]) == spec.body()
    assert {q: peek(vhost, q) for q in DEAD.values()} == seeded  # export changes nothing

    archive = tmp_path / "archive.jsonl"
    assert ok(kit_env, "purge", "--yes", "--archive", str(archive)).stdout.strip() == (
        f"purged 9, kept 0; archived in {archive}")
    assert vhost.depths(list(DEAD.values())) == {q: 0 for q in DEAD.values()}
    strip = [{k: v for k, v in r.items() if k != "exported_at"} for r in _records(archive)]
    assert strip == [{k: v for k, v in r.items() if k != "exported_at"} for r in records]

    assert ok(kit_env, "import", str(archive)).stdout.strip() == f"imported 9 dead letter(s) from {archive}"
    # Back where they were: same bodies byte for byte, same headers (x-death too), priority and order.
    assert {q: peek(vhost, q) for q in DEAD.values()} == seeded

    # The export file imports too, into another queue if asked.
    assert ok(kit_env, "import", str(exported), "--queue", "bulk").stdout.strip() == (
        f"imported 9 dead letter(s) from {exported}")
    bulk = peek(vhost, "bulk.dead")
    assert labels(bulk) == ["b1"] + ALL_IN_LIST_ORDER
    every = [m for q in DEAD.values() for m in seeded[q]]
    assert sorted((m["id"], m["body"]) for m in bulk[1:]) == sorted((m["id"], m["body"]) for m in every)
    for message in bulk[1:]:
        [original] = [m for m in every if m["id"] == message["id"]]
        assert message["headers"] == original["headers"]
        assert message["properties"] == original["properties"]


def test_export_filters_and_standard_output(vhost, kit_env, seeded):
    result = ok(kit_env, "export", "--task", "emails.*", "-o", "-")
    assert [LABEL_OF[r["id"]] for r in map(json.loads, result.stdout.splitlines())] == ["u1", "u2"]
    assert result.stderr.strip() == "exported 2 dead letter(s)"
    limited = ok(kit_env, "export", "-q", "default", "--limit", "2", "-o", "-").stdout.splitlines()
    assert [LABEL_OF[json.loads(line)["id"]] for line in limited] == ["d1", "d2"]


def test_archive_kept_after_purging_more_and_a_replay_of_imported_letters(vhost, kit_env, seeded, tmp_path):
    """purge --archive appends; imported dead letters replay like any other."""
    archive = tmp_path / "dead.jsonl"
    ok(kit_env, "purge", "-q", "urgent", "--yes", "--archive", str(archive))
    ok(kit_env, "purge", "-q", "bulk", "--yes", "--archive", str(archive))
    assert [LABEL_OF[r["id"]] for r in _records(archive)] == ["u1", "u2", "b1"]
    ok(kit_env, "import", str(archive))
    assert peek(vhost, "urgent.dead") == seeded["urgent.dead"] and peek(vhost, "bulk.dead") == seeded["bulk.dead"]
    ok(kit_env, "replay", "-q", "urgent")
    assert [m["body"] for m in take_all(vhost, "urgent")] == [SPECS["u1"].body(), SPECS["u2"].body()]


# -- bad input ----------------------------------------------------------------------------------------------


def _bad_archive(tmp_path: Path) -> str:
    good = {"format": EXPORT_FORMAT, "queue": "default.dead", "id": "x", "body": "eA==", "headers": {},
            "properties": {}}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + '{"format": "something else"}\n')
    return str(path)


BAD_INPUT = [
    (["stats", "--queue", "nope"], "unknown queue 'nope'"),
    (["list", "--queue", "nope"], "unknown queue 'nope'"),
    (["list", "--queue", "tasks.wait.1s"], "unknown queue 'tasks.wait.1s'"),
    (["show", "some-id", "--queue", "nope"], "unknown queue 'nope'"),
    (["replay", "--queue", "nope"], "unknown queue 'nope'"),
    (["purge", "--queue", "nope", "--yes"], "unknown queue 'nope'"),
    (["export", "--queue", "nope", "-o", "-"], "unknown queue 'nope'"),
    (["import", "whatever.jsonl", "--queue", "nope"], "unknown queue 'nope'"),
    (["show", "no-such-id"], "no dead letter with id 'no-such-id'"),
    (["replay", "--to", "default.dead"], "unknown work queue 'default.dead'"),
    (["replay", "--to", "nowhere"], "unknown work queue 'nowhere'"),
    (["import", "missing.jsonl"], "cannot read missing.jsonl"),
    (["export", "-o", "/no/such/dir/out.jsonl"], "/no/such/dir/out.jsonl"),
    (["purge", "--yes", "--archive", "/no/such/dir/archive.jsonl"], "/no/such/dir/archive.jsonl"),
    (["import", "BAD_ARCHIVE"], "bad.jsonl:2: not a dead-letter record"),
]


@pytest.mark.parametrize(("args", "fragment"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_clear_line(vhost, kit_env, seeded, tmp_path, args, fragment):
    args = [_bad_archive(tmp_path) if a == "BAD_ARCHIVE" else a for a in args]
    result = subprocess.run([sys.executable, "-m", "service", "dlq", *args], env=kit_env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert fragment in one_line_error(result)
    assert {q: peek(vhost, q) for q in DEAD.values()} == seeded  # nothing imported, taken or moved
    assert vhost.depths(["urgent", "default", "bulk"]) == {"urgent": 0, "default": 0, "bulk": 0}


BAD_OPTIONS = [
    (["list", "--since", "yesterday"], "Invalid value for '--since': cannot read the time 'yesterday'"),
    (["replay", "--until", "2026-13-45"], "Invalid value for '--until': cannot read the time '2026-13-45'"),
    (["purge", "--since", "2 hours", "--yes"], "Invalid value for '--since'"),
    (["export", "--until", "soon", "-o", "-"], "Invalid value for '--until'"),
    (["replay", "--rate", "0"], "Invalid value for '--rate'"),
    (["replay", "--rate", "fast"], "Invalid value for '--rate'"),
    (["list", "--limit", "0"], "Invalid value for '--limit'"),
    (["replay", "--max-replays", "-1"], "Invalid value for '--max-replays'"),
]


@pytest.mark.parametrize(("args", "fragment"), BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_malformed_filters_and_dates_are_refused(vhost, kit_env, topology, args, fragment):
    seed(vhost, [Spec("only", "test.record")])
    result = run_cli(kit_env, *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert fragment in result.stderr
    if "time" in fragment:
        assert "use ISO 8601" in result.stderr and "30m, 2h, 7d" in result.stderr
    assert [m["id"] for m in peek(vhost, "default.dead")] == [letter_id("only")]


def test_broker_down_is_one_clear_line_for_every_command(kit_env, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    env = dict(kit_env, KIT_BROKER_URL=BROKER_DOWN_URL, KIT_CONNECT_TIMEOUT="1", KIT_PUBLISH_TIMEOUT="1")
    commands = [["stats"], ["list"], ["show", "x"], ["replay"], ["replay", "--dry-run"], ["purge", "--yes"],
                ["export", "-o", "-"], ["import", str(empty)]]
    processes = [subprocess.Popen([sys.executable, "-m", "service", "dlq", *args], env=env, cwd=REPO, text=True,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for args in commands]
    for args, process in zip(commands, processes, strict=True):
        out, err = process.communicate(timeout=60)
        result = subprocess.CompletedProcess(args, process.returncode, out, err)
        line = one_line_error(result)
        assert line.startswith("error: cannot connect to the broker at pyamqp://guest:***@127.0.0.1:1//"), (args, line)


def test_missing_topology_names_the_fix(kit_env, vhost):
    for args in (["list", "-q", "default"], ["stats"], ["replay", "-q", "urgent"], ["show", "x"]):
        line = one_line_error(run_cli(kit_env, *args))
        assert "does not exist on the broker" in line and "topology declare" in line, (args, line)


def test_export_with_a_bad_queue_leaves_the_output_file_alone(kit_env, seeded, tmp_path):
    target = tmp_path / "yesterday.jsonl"
    target.write_text("an archive from yesterday\n")
    one_line_error(run_cli(kit_env, "export", "--queue", "nope", "-o", str(target)))
    assert target.read_text() == "an archive from yesterday\n"
