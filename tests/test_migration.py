"""``topology migrate``: a running deployment moves between classic and quorum queues with every message.

Each broker test declares the classic topology in a fresh vhost and puts
messages in every kind of queue: work queues (every priority), a wait queue
(countdowns, as the client sends them), a dead-letter queue and unroutable.dead.
Then it moves them with the command, as an operator would, and compares what
each queue holds, message by message.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from typing import Any
from urllib.parse import quote

import amqp
import pytest
from kombu import Connection

from service import headers as h
from service import queues
from service.client import Publisher, TaskRequest
from service.deadletters import browse
from service.migration import REPORT_EVERY, WINDOW, held_message, migrate, restored_expiration, restored_message, run
from service.settings import load
from service.topology import connect, declare, verify
from tests.helpers import REPO, Vhost, management, wait_until

QUORUM = queues.topology("quorum")
CLASSIC = queues.topology("classic")
WAIT_QUEUE = "tasks.wait.512s"  # a countdown of 300 s waits there


def run_cli(env: dict[str, str], *args: str, queue_type: str = "classic") -> subprocess.CompletedProcess[str]:
    """``python -m service ARGS`` with KIT_QUEUE_TYPE=queue_type, stdin not a terminal."""
    return subprocess.run([sys.executable, "-m", "service", *args], env={**env, "KIT_QUEUE_TYPE": queue_type},
                          cwd=REPO, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def queue_types(vhost: Vhost) -> dict[str, str]:
    """Every queue of the vhost and its type, from the management API."""
    return {q["name"]: q["type"] for q in management("GET", f"/api/queues/{quote(vhost.name, safe='')}")}


def peek(queue: str) -> list[Any]:
    """The messages of ``queue`` as DeadLetter records (read unacked and returned: nothing changes)."""
    conn = connect(load())
    try:
        return browse(conn, queue)
    finally:
        conn.release()


def ids(queue: str) -> list[str]:
    return sorted(letter.id for letter in peek(queue))


def sent_ids(sent: dict[str, Any], *kinds: str) -> list[str]:
    return sorted(task_id for kind in kinds for task_id in sent[kind])


def publish_raw(vhost: Vhost, exchange: str, routing_key: str, headers: dict[str, Any], **properties: Any) -> str:
    """Publish one task message as a worker or another app would (confirmed); returns its id."""
    task_id = str(uuid.uuid4())
    conn = vhost.connection()
    try:
        channel = conn.channel()
        channel.confirm_select()
        channel.basic_publish_confirm(
            amqp.Message(json.dumps([[task_id], {}, {}]).encode(), content_type="application/json",
                         content_encoding="utf-8", delivery_mode=2, correlation_id=task_id,
                         application_headers={"task": "test.record", "id": task_id, **headers}, **properties),
            exchange, routing_key, mandatory=True, confirm_timeout=10)
    finally:
        conn.close()
    return task_id


@pytest.fixture
def classic_deployment(kit_env: dict[str, str], vhost: Vhost, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The classic topology with messages in every kind of queue; what went where.

    Keys: a priority name -> the ids published to ``urgent`` with it, ``bulk``
    (normal tasks), ``waiting`` (a countdown of 300 s, normal), ``waiting_high``
    (the same, critical), ``dead`` (in default.dead), ``unroutable``.
    """
    monkeypatch.setenv("KIT_QUEUE_TYPE", "classic")
    declare_conn = connect(load())
    try:
        declare(declare_conn, CLASSIC)
    finally:
        declare_conn.release()
    sent: dict[str, Any] = {}
    with Publisher(load()) as publisher:
        for name in queues.PRIORITIES:
            sent[name] = [publisher.publish("emails.send", kwargs={"n": n}, priority=name) for n in range(3)]
        sent["bulk"] = [publisher.publish("reports.export", kwargs={"n": n}) for n in range(5)]
        sent["waiting"] = [publisher.publish("webhooks.deliver", kwargs={"n": n}, countdown=300) for n in range(3)]
        sent["waiting_high"] = [publisher.publish("webhooks.deliver", countdown=300, priority="critical")]
    sent["dead"] = [publish_raw(vhost, queues.DEAD_LETTER_EXCHANGE, "default", {
        h.REASON: h.REASON_PERMANENT, h.SOURCE_QUEUE: "default", h.EXCEPTION_TYPE: "ValueError"})]
    sent["unroutable"] = [publish_raw(vhost, queues.TASK_EXCHANGE, "high_priority", {})]
    sent["depths"] = vhost.depths([q.name for q in CLASSIC.all_queues])
    return sent


def assert_in_place_after_quorum(sent: dict[str, Any]) -> None:
    """Every message of ``classic_deployment`` where the quorum profile puts it, with what it had."""
    assert ids("urgent") == sorted(sent["low"] + sent["normal"])
    assert ids("urgent.high") == sorted(sent["high"] + sent["critical"])
    assert ids("bulk") == sorted(sent["bulk"])
    waiting = {letter.id: letter for letter in peek(WAIT_QUEUE)}
    assert sorted(waiting) == sorted(sent["waiting"] + sent["waiting_high"])
    for task_id, letter in waiting.items():
        # Routing key: where its wait ends (a critical task in the lane); expiration: no more than it had left.
        assert letter.routing_key == ("default.high" if task_id in sent["waiting_high"] else "default")
        assert 0 < int(letter.properties["expiration"]) <= 300_000
        assert letter.headers[queues.WAIT_HEADER] == "512s"
    (dead,) = peek("default.dead")
    assert (dead.id, dead.reason, dead.source_queue, dead.routing_key) == (sent["dead"][0], "permanent-error",
                                                                           "default", "default")
    (parked,) = peek(queues.UNROUTABLE_QUEUE)
    assert (parked.id, parked.routing_key, parked.published_to) == (sent["unroutable"][0], "high_priority", "tasks")
    for queue in ("urgent", "urgent.high", "bulk", WAIT_QUEUE, "default.dead", queues.UNROUTABLE_QUEUE):
        for letter in peek(queue):
            assert not [k for k in letter.headers if k.startswith("kit-migrating")]
            assert letter.properties["correlation_id"] == letter.id
            assert json.loads(letter.body)  # the body as it was published


def assert_clean(vhost: Vhost, profile: queues.Topology) -> None:
    types = queue_types(vhost)
    assert {q.name: types.get(q.name) for q in profile.all_queues} == {q.name: profile.queue_type
                                                                        for q in profile.all_queues}
    assert [name for name in types if name.endswith(queues.MIGRATING_SUFFIX)
            or (name.endswith(".high") and not profile.lanes)] == []
    conn = connect(load())
    try:
        assert verify(conn, profile) == []
    finally:
        conn.release()


def test_the_dry_run_shows_every_queue_and_changes_nothing(classic_deployment, kit_env, vhost):
    result = run_cli(kit_env, "topology", "migrate", "--to", "quorum", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.split()}
    assert lines["urgent"].split()[:5] == ["urgent", "classic", "->", "quorum", "12"]
    assert "re-create as quorum, messages through urgent.migrating" in lines["urgent"]
    assert lines["urgent.high"].split()[:5] == ["urgent.high", "-", "->", "quorum", "0"]
    assert lines[WAIT_QUEUE].split()[4] == "4" and lines["default.dead"].split()[4] == "1"
    assert lines[queues.UNROUTABLE_QUEUE].split()[4] == "1"
    assert "23 message(s) to move, 23 of 23 queue(s) to change, to quorum queues (dry run: nothing changed)" in (
        result.stdout)
    assert vhost.depths([q.name for q in CLASSIC.all_queues]) == classic_deployment["depths"]
    assert set(queue_types(vhost).values()) == {"classic"}
    assert not [n for n in queue_types(vhost) if n.endswith((".high", queues.MIGRATING_SUFFIX))]


def test_to_quorum_and_back_every_message_in_its_place(classic_deployment, kit_env, vhost, monkeypatch):
    sent = classic_deployment
    refused = run_cli(kit_env, "topology", "migrate", "--to", "quorum")  # no terminal, no --yes
    assert refused.returncode == 2 and "pass --yes" in refused.stderr

    result = run_cli(kit_env, "topology", "migrate", "--to", "quorum", "--yes")
    assert result.returncode == 0, result.stderr
    assert "urgent: 12 message(s) moved into urgent.migrating" in result.stdout
    assert "urgent: 12 message(s) moved back from urgent.migrating; urgent.migrating deleted" in result.stdout
    assert "migrated 23 message(s) in 23 queue(s) to quorum queues" in result.stdout
    assert "ok: 4 exchanges and 23 quorum queues match the code" in result.stdout
    assert "next: set KIT_QUEUE_TYPE=quorum" in result.stdout
    monkeypatch.setenv("KIT_QUEUE_TYPE", "quorum")
    assert_clean(vhost, QUORUM)
    assert_in_place_after_quorum(sent)

    again = run_cli(kit_env, "topology", "migrate", "--to", "quorum", "--yes", queue_type="quorum")
    assert again.returncode == 0 and "nothing to migrate" in again.stdout

    back = run_cli(kit_env, "topology", "migrate", "--to", "classic", "--yes", queue_type="quorum")
    assert back.returncode == 0, back.stderr
    assert "urgent.high: 6 message(s) moved into urgent; deleted" in back.stdout
    assert "ok: 4 exchanges and 20 classic queues match the code" in back.stdout
    monkeypatch.setenv("KIT_QUEUE_TYPE", "classic")
    assert_clean(vhost, CLASSIC)
    urgent = vhost.drain("urgent")  # a priority queue again: critical first
    assert [m.headers["id"] for m in urgent[:3]] == sent["critical"]
    assert sorted(m.headers["id"] for m in urgent) == sorted(sum((sent[p] for p in queues.PRIORITIES), []))
    assert {m.delivery_info["routing_key"] for m in urgent} == {"urgent"}
    waiting = peek(WAIT_QUEUE)
    assert sorted(w.id for w in waiting) == sorted(sent["waiting"] + sent["waiting_high"])
    assert {w.routing_key for w in waiting} == {"default"}  # no lane on classic
    assert ids("bulk") == sorted(sent["bulk"]) and ids("default.dead") == sent["dead"]
    assert [p.routing_key for p in peek(queues.UNROUTABLE_QUEUE)] == ["high_priority"]


def test_a_queue_with_consumers_is_refused_and_nothing_changes(classic_deployment, kit_env, vhost):
    worker = vhost.connection()
    try:
        worker.channel().basic_consume("default", callback=lambda message: None)  # "default" holds nothing
        result = run_cli(kit_env, "topology", "migrate", "--to", "quorum", "--yes")
    finally:
        worker.close()
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot migrate while queues have consumers ('default' has 1); stop "
                                    "the workers")
    assert "default                classic  -> quorum" in result.stdout and "REFUSED: 1 consumer(s)" in result.stdout
    assert set(queue_types(vhost).values()) == {"classic"}
    assert vhost.depths([q.name for q in CLASSIC.all_queues]) == classic_deployment["depths"]


def test_a_second_migration_is_refused_while_one_runs(classic_deployment, kit_env, vhost):
    holder = vhost.connection()
    try:
        holder.channel().queue_declare(queues.MIGRATION_LOCK_QUEUE, exclusive=True, auto_delete=True)
        result = run_cli(kit_env, "topology", "migrate", "--to", "quorum", "--dry-run")
    finally:
        holder.close()
    assert result.returncode == 2 and "another `topology migrate` is running" in result.stderr


def test_a_migration_killed_mid_way_is_finished_by_a_rerun(classic_deployment, kit_env, vhost, monkeypatch):
    """A kill -9 in the middle of a move, then a crash after bulk was deleted and before it was declared again."""
    sent = classic_deployment
    with Publisher(load()) as publisher:
        many = publisher.publish_many([TaskRequest("webhooks.deliver", kwargs={"n": n})
                                       for n in range(REPORT_EVERY + 4 * WINDOW)])
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "topology", "migrate", "--to", "quorum", "--yes"],
        env={**kit_env, "KIT_QUEUE_TYPE": "classic", "PYTHONUNBUFFERED": "1"}, cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        for line in process.stdout:  # type: ignore[union-attr]
            if line.startswith("default: ") and line.endswith(" moved into default.migrating so far\n"):
                os.kill(process.pid, signal.SIGKILL)
                break
        else:
            pytest.fail(f"no progress line about default: {process.stderr.read()}")  # type: ignore[union-attr]
    finally:
        process.wait(120)
    left = queue_types(vhost)
    assert (left["default"], left["default.migrating"], left["urgent"], left["bulk"]) == (
        "classic", "quorum", "quorum", "classic")
    dry = run_cli(kit_env, "topology", "migrate", "--to", "quorum", "--dry-run")
    assert "left in default.migrating by an interrupted run go back" in dry.stdout

    declared = run._declare_bound

    def crash_at_bulk(conn: Connection, queue: queues.Queue, **options: Any) -> None:
        if queue.name == "bulk":
            raise KeyboardInterrupt("killed")
        declared(conn, queue, **options)

    monkeypatch.setattr(run, "_declare_bound", crash_at_bulk)
    conn = connect(load())
    try:
        with pytest.raises(KeyboardInterrupt):
            migrate(conn, load(), "quorum")
    finally:
        conn.release()
    left = queue_types(vhost)  # killed before the holding queues gave their messages back
    assert ("bulk" not in left, left["default"], left["default.migrating"]) == (True, "quorum", "quorum")
    assert vhost.depth("bulk.migrating") == len(sent["bulk"])

    result = run_cli(kit_env, "topology", "migrate", "--to", "quorum", "--yes")
    assert result.returncode == 0, result.stderr
    assert f"bulk: {len(sent['bulk'])} message(s) moved back from bulk.migrating" in result.stdout
    monkeypatch.setenv("KIT_QUEUE_TYPE", "quorum")
    assert_clean(vhost, QUORUM)
    assert_in_place_after_quorum(sent)
    moved = Counter(m.headers["id"] for m in vhost.drain("default"))
    assert set(moved) == set(many)  # none lost
    assert sum(moved.values()) - len(many) <= WINDOW  # at most one window twice (confirmed, killed before the ack)


@pytest.mark.parametrize("target", ["quorum", "classic"])
def test_publishers_that_keep_running_lose_nothing(classic_deployment, kit_env, vhost, monkeypatch, target):
    """A web app publishes tasks, high ones and 1 s countdowns all through the migration: each lands in its queue.

    On the way back to classic it still runs with KIT_QUEUE_TYPE=quorum, so its high tasks go to the lane
    while the lane is emptied into the work queue.
    """
    source = "classic" if target == "quorum" else "quorum"
    if source == "quorum":
        assert run_cli(kit_env, "topology", "migrate", "--to", "quorum", "--yes").returncode == 0
        monkeypatch.setenv("KIT_QUEUE_TYPE", "quorum")
    with Publisher(load()) as publisher:
        publisher.publish_many([TaskRequest("reports.export", kwargs={"n": n}) for n in range(4 * WINDOW)])
    published: dict[str, str] = {}  # id -> "normal", "high" or "countdown"
    done = threading.Event()

    def publish_until_done() -> None:
        with Publisher(load()) as publisher:  # the profile of KIT_QUEUE_TYPE: the source's
            while not done.is_set() and len(published) < 5000:
                kind = ("normal", "high", "countdown")[len(published) % 3]
                task_id = publisher.publish("webhooks.deliver", priority="high" if kind == "high" else "normal",
                                            countdown=1 if kind == "countdown" else None)
                published[task_id] = kind
                time.sleep(0.002)

    thread = threading.Thread(target=publish_until_done)
    thread.start()
    try:
        result = run_cli(kit_env, "topology", "migrate", "--to", target, "--yes", queue_type=source)
    finally:
        done.set()
        thread.join(30)
    assert result.returncode == 0, result.stderr
    assert len(published) > 100
    monkeypatch.setenv("KIT_QUEUE_TYPE", target)
    assert_clean(vhost, queues.topology(target))
    # A high task is in default.high when the migration found it in classic default, else in default; on the
    # way back also in unroutable.dead: a publisher still on quorum sent it to a lane after the lanes went.
    homes = {"normal": {"default"}, "countdown": {"default"},
             "high": {"default", "default.high" if target == "quorum" else queues.UNROUTABLE_QUEUE}}
    queues_read = sorted(set().union(*homes.values()) | {queues.UNROUTABLE_QUEUE})
    seen: dict[str, int] = {}

    def back_home() -> bool:
        seen.clear()
        seen.update(vhost.depths([*queues_read, "tasks.wait.1s"]))
        return seen["tasks.wait.1s"] == 0 and sum(seen[q] for q in queues_read) > len(published)

    try:
        wait_until(back_home, 60, "the countdowns to come back to default")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: depths {seen}, {len(published)} published during the migration") from None
    landed: Counter[tuple[str, str]] = Counter()
    for queue in queues_read:  # not browse: it reads at most 2,000 messages of a quorum queue
        landed.update((m.headers["id"], queue) for m in vhost.drain(queue) if m.headers["id"] in published)
    assert sorted({task_id for task_id, _ in landed}) == sorted(published)  # none lost
    assert [(task_id, queue) for task_id, queue in landed if queue not in homes[published[task_id]]] == []
    parked = [task_id for task_id, queue in landed if queue == queues.UNROUTABLE_QUEUE]
    assert "warning" not in result.stderr or parked
    assert sum(landed.values()) - len(landed) <= 10  # twice only if published in the instant a binding moved


def test_an_exchange_with_other_arguments_stops_the_migration_before_it_starts(classic_deployment, kit_env, vhost):
    conn = vhost.connection()
    try:
        channel = conn.channel()
        channel.exchange_delete(queues.TASK_EXCHANGE)
        channel.exchange_declare(queues.TASK_EXCHANGE, "direct", durable=True, auto_delete=False)
    finally:
        conn.close()
    result = run_cli(kit_env, "topology", "migrate", "--to", "quorum", "--dry-run")
    assert result.returncode == 2
    assert "error: exchange 'tasks': alternate-exchange is unset on the broker" in result.stderr
    assert set(queue_types(vhost).values()) == {"classic"}


# -- what a moved message keeps (no broker) -------------------------------------------------------


def delivered(headers: dict[str, Any], routing_key: str, **properties: Any) -> amqp.Message:
    message = amqp.Message(b"[[], {}, {}]", application_headers=headers, **properties)
    message.delivery_info = {"routing_key": routing_key, "exchange": "tasks"}
    return message


def test_a_held_message_keeps_its_routing_key_and_expiration_in_headers():
    message = delivered({"id": "a", "x-delivery-count": 2}, "default", expiration="8000", priority=2,
                        user_id="someone")
    held = held_message(message, "tasks.wait.8s.migrating")
    assert (held.exchange, held.routing_key) == ("", "tasks.wait.8s.migrating")
    assert held.headers == {"id": "a", h.MIGRATING_ROUTING_KEY: "default", h.MIGRATING_EXPIRATION: "8000"}
    assert "expiration" not in held.properties and "user_id" not in held.properties
    assert held.properties["priority"] == 2 and held.properties["delivery_mode"] == 2


@pytest.mark.parametrize(("queue", "key", "priority", "profile", "route"), [
    ("urgent", "urgent", 3, QUORUM, ("", "urgent.high")),
    ("urgent", "urgent", 1, QUORUM, ("", "urgent")),
    ("urgent", "urgent.high", 3, CLASSIC, ("", "urgent")),
    ("default.dead", "default", 0, QUORUM, (queues.DEAD_LETTER_EXCHANGE, "default")),
    ("default.dead", "odd", 0, QUORUM, ("kit.migrate.default.dead", "odd")),
    (queues.UNROUTABLE_QUEUE, "high_priority", 0, CLASSIC, (queues.UNROUTABLE_EXCHANGE, "high_priority")),
    ("tasks.wait.8s", "default", 2, QUORUM, ("kit.migrate.tasks.wait.8s", "default.high")),
    ("tasks.wait.8s", "default.high", 2, CLASSIC, ("kit.migrate.tasks.wait.8s", "default")),
])
def test_a_restored_message_goes_only_to_its_queue_with_the_right_routing_key(queue, key, priority, profile, route):
    spec = next(q for q in profile.all_queues if q.name == queue)
    held = held_message(delivered({"id": "a"}, key, priority=priority), queues.holding_queue_name(queue))
    back = restored_message(delivered(held.headers, held.routing_key, **held.properties), spec, profile)
    assert (back.exchange, back.routing_key) == route
    assert back.headers == {"id": "a"}


def test_a_waiting_message_gets_back_no_more_than_the_wait_it_had_left():
    now = 1_000_000.0
    assert restored_expiration("8000", {h.ENQUEUED_AT: now + 3}, True, now) == "3000"
    assert restored_expiration("8000", {h.ENQUEUED_AT: now + 60}, True, now) == "8000"  # a longer delay: one step
    assert restored_expiration("8000", {h.ENQUEUED_AT: now - 5}, True, now) == "1"  # overdue: expires at once
    assert restored_expiration("8000", {}, True, now) == "8000"
    assert restored_expiration("8000", {h.ENQUEUED_AT: now - 5}, False, now) == "8000"  # not a wait queue
