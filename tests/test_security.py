"""Security on the real broker: least-privilege users, TLS, JSON only, no committed secrets.

Each broker test provisions the kit's definitions (service.broker) into a fresh
vhost with users named after it, so parallel runs never share a user; the users
are deleted at teardown. Refusals are checked with raw py-amqp connections as
each user. The TLS tests start their own RabbitMQ node (once per module) with a
CA and certificates made here.
"""

from __future__ import annotations

import base64
import inspect
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import amqp
import pytest

from service import broker, queues
from service import headers as h
from service.errors import BrokerUnavailable, PublishError
from service.settings import ConfigError, load
from service.topology import connect, verify
from tests.helpers import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    AMQP_HOST,
    AMQP_PORT,
    MANAGEMENT_URL,
    REPO,
    Vhost,
    Worker,
    management,
    management_delete,
    spawn,
    wait_for_run,
    wait_until,
)
from tests.worker_tasks import recorded

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")  # the real scripts; /usr/sbin's wrappers su to rabbitmq


# -- provisioning -------------------------------------------------------------------


@dataclass
class Users:
    """The kit's users provisioned into a test vhost by POST /api/definitions."""

    vhost: Vhost
    prefix: str
    passwords: dict[str, str]
    definitions: dict[str, Any]

    def name(self, role: str) -> str:
        return broker.user_name(role, self.prefix)

    def url(self, role: str, *, with_password: bool = True) -> str:
        password = ":" + quote(self.passwords[role], safe="") if with_password else ""
        return f"pyamqp://{quote(self.name(role), safe='')}{password}@{AMQP_HOST}:{AMQP_PORT}/{self.vhost.name}"

    def connect(self, role: str) -> amqp.Connection:
        conn = amqp.Connection(f"{AMQP_HOST}:{AMQP_PORT}", userid=self.name(role),
                               password=self.passwords[role], virtual_host=self.vhost.name)
        conn.connect()
        return conn

    def http(self, role: str, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        """Call the management API as ``role``: (status, body)."""
        request = urllib.request.Request(MANAGEMENT_URL + path, method=method,
                                         data=json.dumps(body).encode() if body is not None else None)
        token = base64.b64encode(f"{self.name(role)}:{self.passwords[role]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


def _delete_users(names: list[str]) -> None:
    """Delete users (teardown); rides out a management API that is briefly unavailable."""
    def delete(name: str) -> bool:
        try:
            management_delete(f"/api/users/{quote(name, safe='')}")
        except urllib.error.URLError:
            return False
        return True

    for name in names:
        wait_until(lambda name=name: delete(name), 30, f"the management API to delete user {name}", interval=0.5)


@pytest.fixture
def users(vhost: Vhost) -> Iterator[Users]:
    """Definitions posted into the test's vhost: its users, permissions and topology."""
    prefix = f"{vhost.name}-"
    passwords = {role: secrets.token_urlsafe(24) for role in broker.ROLES}
    defs = broker.definitions(vhost.name, passwords, prefix)
    try:
        broker.provision(defs, MANAGEMENT_URL, ADMIN_USER, ADMIN_PASSWORD)  # POST /api/definitions, then a check
        yield Users(vhost, prefix, passwords, defs)
    finally:
        _delete_users([broker.user_name(role, prefix) for role in broker.ROLES])


def refused(conn: amqp.Connection, action: Callable[[amqp.Channel], Any]) -> str:
    """Run ``action`` on a fresh channel; it must fail with ACCESS_REFUSED. Returns the broker's text."""
    channel = conn.channel()
    with pytest.raises(amqp.exceptions.AccessRefused) as info:
        action(channel)
    assert "ACCESS_REFUSED" in str(info.value)
    return str(info.value)


def allowed(conn: amqp.Connection, action: Callable[[amqp.Channel], Any]) -> Any:
    channel = conn.channel()
    try:
        return action(channel)
    finally:
        channel.close()


def publish_confirmed(exchange: str, routing_key: str, body: bytes = b"[[], {}, {}]",
                      headers: dict | None = None, content_type: str = "application/json"):
    """An action that publishes one message and waits for the broker's confirm (so a refusal surfaces)."""
    def action(channel: amqp.Channel) -> None:
        channel.confirm_select()
        channel.basic_publish_confirm(
            amqp.Message(body, content_type=content_type, application_headers=headers or {}, delivery_mode=2),
            exchange, routing_key, confirm_timeout=10,
        )
    return action


def client_as(users: Users, role: str):
    """service.client.Publisher connected as one of the test's users."""
    from service.client import Publisher

    return Publisher(replace(load(), broker_url=users.url(role)))


def _work_queue_arguments(name: str) -> dict[str, Any]:
    return dict(queues.work_queue(name).arguments)


# -- the definitions ----------------------------------------------------------------


def test_password_hashes_are_computed_the_rabbitmq_way(users):
    # RabbitMQ accepts our hashes: every user logs in with its password ...
    for role in broker.ROLES:
        users.connect(role).close()
    # ... and a hash RabbitMQ made itself checks out with our function.
    name = f"{users.prefix}probe"
    management("PUT", f"/api/users/{name}", {"password": "ünïcode pässword 42", "tags": ""})
    try:
        [user] = [u for u in management("GET", "/api/users") if u["name"] == name]
        assert user["hashing_algorithm"] == broker.HASHING_ALGORITHM
        assert broker.check_password("ünïcode pässword 42", user["password_hash"])
        assert not broker.check_password("another password", user["password_hash"])
    finally:
        _delete_users([name])
    with pytest.raises(amqp.exceptions.AccessRefused):
        amqp.Connection(f"{AMQP_HOST}:{AMQP_PORT}", userid=users.name("worker"), password="wrong password!",
                        virtual_host=users.vhost.name).connect()


def test_definitions_hold_users_permissions_and_the_whole_topology(users):
    defs = users.definitions
    text = json.dumps(defs)
    assert not any(password in text for password in users.passwords.values())  # hashes only
    tags = {u["name"]: u["tags"] for u in defs["users"]}
    assert tags == {users.name("admin"): ["administrator"], users.name("publisher"): [],
                    users.name("worker"): [], users.name("monitor"): ["monitoring"], users.name("console"): []}
    assert "guest" not in {u["name"] for u in broker.definitions("kit", users.passwords)["users"]}
    # The broker now matches the code exactly (arguments included), though nobody declared anything.
    conn = connect(replace(load(), broker_url=users.vhost.url))
    try:
        assert verify(conn) == []
    finally:
        conn.release()
    vname = quote(users.vhost.name, safe="")
    events = management("GET", f"/api/exchanges/{vname}/{queues.EVENT_EXCHANGE}")
    assert (events["type"], events["durable"], events["auto_delete"]) == ("topic", True, False)
    bindings = management("GET", f"/api/bindings/{vname}")
    wait_8s = [b for b in bindings if b["destination"] == "tasks.wait.8s" and b["source"]]  # "": default exchange
    assert [(b["source"], b["arguments"]) for b in wait_8s] == [("tasks.retry", {"x-match": "all", "kit-wait": "8s"})]
    tasks = management("GET", f"/api/exchanges/{vname}/{queues.TASK_EXCHANGE}")
    assert tasks["arguments"] == {"alternate-exchange": queues.UNROUTABLE_EXCHANGE}
    parked = [b["source"] for b in bindings if b["destination"] == queues.UNROUTABLE_QUEUE and b["source"]]
    assert parked == [queues.UNROUTABLE_EXCHANGE]
    assert management("GET", f"/api/exchanges/{vname}/{queues.UNROUTABLE_EXCHANGE}")["type"] == "fanout"
    # Posting them again changes nothing (idempotent) and the users still log in.
    management("POST", "/api/definitions", broker.definitions(users.vhost.name, users.passwords, users.prefix))
    users.connect("worker").close()
    live = {p["user"]: (p["configure"], p["write"], p["read"])
            for p in management("GET", f"/api/vhosts/{vname}/permissions")}
    for role in broker.ROLES:
        perms = broker.PERMISSIONS[role]
        assert live[users.name(role)] == (perms["configure"], perms["write"], perms["read"])


# -- publisher ----------------------------------------------------------------------


def test_publisher_publishes_with_the_client_but_cannot_consume_purge_or_delete(users, monkeypatch, tmp_path):
    from service.client import Publisher

    # The recommended setup: no password in the URL, it comes from a secret file.
    secret = tmp_path / "rabbitmq_publisher_password"
    secret.write_text(users.passwords["publisher"] + "\n")
    monkeypatch.setenv("KIT_BROKER_URL", users.url("publisher", with_password=False))
    monkeypatch.setenv("KIT_BROKER_PASSWORD_FILE", str(secret))
    monkeypatch.setenv("KIT_PUBLISH_TIMEOUT", "5")
    tap = users.vhost.connection()  # the admin listens to Celery's events
    tap.channel().queue_declare("events-tap", auto_delete=False)
    tap.channel().queue_bind("events-tap", queues.EVENT_EXCHANGE, "#")
    tap.close()
    with Publisher() as publisher:
        publisher.publish("test.record", ["now"])
        publisher.publish("test.record", ["later"], countdown=1)  # through tasks.retry and a wait queue
    wait_until(lambda: users.vhost.depth("default") == 2, 10, "both tasks in the default queue")
    sent = users.vhost.drain("events-tap")
    assert {m.delivery_info["routing_key"] for m in sent} == {"task.sent"}  # passive declare suffices
    events = [json.loads(m.body) for m in sent]  # a list body is a batch of events, as Celery's own
    assert sum(len(e) if isinstance(e, list) else 1 for e in events) == 2

    conn = users.connect("publisher")
    try:
        for action in (
            lambda ch: ch.basic_consume("default", callback=lambda m: None),
            lambda ch: ch.basic_get("default"),
            lambda ch: ch.queue_purge("default"),
            lambda ch: ch.queue_delete("default"),
            lambda ch: ch.queue_delete("default.dead"),
            lambda ch: ch.queue_declare("default", durable=True, auto_delete=False,
                                        arguments=_work_queue_arguments("default")),
            lambda ch: ch.queue_declare("mine", auto_delete=True),
            lambda ch: ch.exchange_declare(queues.EVENT_EXCHANGE, "topic", durable=True, auto_delete=False),
            lambda ch: ch.exchange_delete(queues.TASK_EXCHANGE),
            publish_confirmed(queues.DEAD_LETTER_EXCHANGE, "default"),  # no forged dead letters
            publish_confirmed("", "default.dead"),  # nor through the default exchange
            publish_confirmed(queues.EVENT_EXCHANGE, "worker.heartbeat"),  # only task-sent events
            publish_confirmed(queues.UNROUTABLE_EXCHANGE, "high_priority"),  # nor straight into unroutable.dead
            lambda ch: ch.basic_get(queues.UNROUTABLE_QUEUE),
        ):
            refused(conn, action)
        # What the client relies on works: passive declares and publishing to the task exchange.
        assert allowed(conn, lambda ch: ch.queue_declare("default", passive=True)).message_count == 2
        allowed(conn, lambda ch: ch.exchange_declare(queues.EVENT_EXCHANGE, "topic", passive=True))
        allowed(conn, publish_confirmed(queues.TASK_EXCHANGE, "bulk"))
        # A key no work queue is bound to: write on the task exchange is enough for it to be parked.
        allowed(conn, publish_confirmed(queues.TASK_EXCHANGE, "high_priority"))
    finally:
        conn.close()
    assert users.vhost.depths(["default", "default.dead", "bulk", queues.UNROUTABLE_QUEUE]) == {
        "default": 2, "default.dead": 0, "bulk": 1, queues.UNROUTABLE_QUEUE: 1}


def test_beat_as_the_publisher_user_holds_its_lease_and_state_and_nothing_more(users, monkeypatch):
    from service.startup import check_beat

    monkeypatch.setenv("KIT_BROKER_URL", users.url("publisher"))
    check_beat()  # every right beat needs: its lease, its state's queue and exchange, bind, get, publish
    conn = users.connect("publisher")
    try:
        allowed(conn, lambda ch: ch.queue_declare(queues.BEAT_LEASE_QUEUE, exclusive=True, auto_delete=True))
        for action in (
            lambda ch: ch.queue_bind(queues.BEAT_STATE_QUEUE, queues.TASK_EXCHANGE, "default"),  # no copy of tasks
            lambda ch: ch.queue_bind("default", queues.BEAT_STATE_EXCHANGE, "default"),
            lambda ch: ch.queue_declare(f"{queues.BEAT_LEASE_QUEUE}.other", exclusive=True),
            lambda ch: ch.basic_get("default"),
        ):
            refused(conn, action)
    finally:
        conn.close()


# -- worker -------------------------------------------------------------------------


def test_worker_user_consumes_and_routes_but_cannot_delete_or_reconfigure_queues(users):
    conn = users.connect("worker")
    try:
        allowed(conn, lambda ch: ch.basic_consume("urgent", callback=lambda m: None))
        assert allowed(conn, lambda ch: ch.basic_get("default")) is None
        allowed(conn, publish_confirmed(queues.RETRY_EXCHANGE, "default", headers={queues.WAIT_HEADER: "64s"}))
        allowed(conn, publish_confirmed(queues.DEAD_LETTER_EXCHANGE, "default"))
        args = _work_queue_arguments("default")
        for action in (
            lambda ch: ch.queue_delete("default"),
            lambda ch: ch.queue_delete("tasks.wait.64s"),
            lambda ch: ch.queue_declare("default", durable=True, auto_delete=False,
                                        arguments={**args, "x-max-priority": 10}),
            # Even an identical declare needs configure: so KIT_DECLARE_TOPOLOGY=false.
            lambda ch: ch.queue_declare("default", durable=True, auto_delete=False, arguments=args),
            lambda ch: ch.queue_declare("sneaky", durable=True, auto_delete=False),
            lambda ch: ch.exchange_delete(queues.DEAD_LETTER_EXCHANGE),
            lambda ch: ch.exchange_declare(queues.TASK_EXCHANGE, "direct", durable=True, auto_delete=False),
            lambda ch: ch.queue_unbind("default", queues.TASK_EXCHANGE, "default"),
            lambda ch: ch.basic_get("default.dead"),  # dead letters are for the admin's tools
            lambda ch: ch.queue_purge("default.dead"),
            lambda ch: ch.basic_get(queues.UNROUTABLE_QUEUE),  # so are unroutable tasks
            lambda ch: ch.queue_purge(queues.UNROUTABLE_QUEUE),
            lambda ch: ch.queue_delete(queues.UNROUTABLE_QUEUE),
            publish_confirmed(queues.TASK_EXCHANGE, "default"),  # workers never enqueue new work
            publish_confirmed(queues.UNROUTABLE_EXCHANGE, "default"),
        ):
            refused(conn, action)
    finally:
        conn.close()
    assert users.vhost.depths(["default.dead", "tasks.wait.64s", "default"]) == {
        "default.dead": 1, "tasks.wait.64s": 1, "default": 0}


def test_publisher_rights_an_unroutable_task_needs_checked_with_throwaway_users(vhost):
    """Evidence for PERMISSIONS: what a publish that goes on to the alternate exchange needs.

    RabbitMQ 3.10.8 routes a message the task exchange cannot route on to its
    alternate exchange without checking the publisher's rights there: write on
    the task exchange alone parks it (mandatory or not; no basic.return). Only
    creating an exchange with an alternate exchange is checked: configure and
    read on it, write on the alternate exchange (the admin does that).
    """
    from service.topology import declare_on

    declare_on(replace(load(), broker_url=vhost.url))
    vname = quote(vhost.name, safe="")
    made = []

    def throwaway(name: str, configure: str, write: str, read: str) -> amqp.Connection:
        user = f"{vhost.name}-{name}"
        management("PUT", f"/api/users/{quote(user, safe='')}", {"password": f"pw-{user}", "tags": ""})
        made.append(user)
        management("PUT", f"/api/permissions/{vname}/{quote(user, safe='')}",
                   {"configure": configure, "write": write, "read": read})
        c = amqp.Connection(f"{AMQP_HOST}:{AMQP_PORT}", userid=user, password=f"pw-{user}", virtual_host=vhost.name)
        c.connect()
        return c

    try:
        only_tasks = throwaway("only-tasks", "^$", "^tasks$", "^$")
        try:
            for mandatory in (True, False):
                channel = only_tasks.channel()
                returned: list[Any] = []
                channel.events["basic_return"].add(lambda *args, sink=returned: sink.append(args))
                channel.confirm_select()
                channel.basic_publish_confirm(amqp.Message(b"[[], {}, {}]", delivery_mode=2), "tasks",
                                              "high_priority", mandatory=mandatory, confirm_timeout=10)
                assert returned == []
                channel.close()
            refused(only_tasks, publish_confirmed(queues.UNROUTABLE_EXCHANGE, "high_priority"))
        finally:
            only_tasks.close()
        assert vhost.depth(queues.UNROUTABLE_QUEUE) == 2

        alternate = {"alternate-exchange": queues.UNROUTABLE_EXCHANGE}
        for name, write, read, ok in (("no-read", "^tasks\\.unroutable$", "^$", False),
                                      ("no-write", "^$", "^new$", False),
                                      ("both", "^tasks\\.unroutable$", "^new$", True)):
            creator = throwaway(name, "^new$", write, read)
            try:
                def create(ch: amqp.Channel) -> None:
                    ch.exchange_declare("new", "direct", durable=True, auto_delete=False, arguments=alternate)
                if ok:
                    allowed(creator, create)
                else:
                    refused(creator, create)
            finally:
                creator.close()
    finally:
        _delete_users(made)


def test_publisher_user_publishes_from_a_plain_celery_app_with_the_kits_settings(users, kit_env):
    """A plain Celery app as kit-publisher: no right beyond the kit's client's; the admin's dlq tools see a misroute."""
    from celery import Celery

    from service.celery_settings import publisher_settings

    app = Celery("plain", set_as_current=False)
    app.conf.update(publisher_settings(users.url("publisher")))
    try:
        app.send_task("test.record", ["plain"], queue="default")
        misrouted = app.send_task("test.record", ["misrouted"], routing_key="high_priority").id
    finally:
        app.close()
    assert users.vhost.depths(["default", queues.UNROUTABLE_QUEUE]) == {"default": 1, queues.UNROUTABLE_QUEUE: 1}
    env = dict(kit_env, KIT_BROKER_URL=users.url("admin"))
    listed = subprocess.run([sys.executable, "-m", "service", "dlq", "list", "--queue", "unroutable", "--json"],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert (row["id"], row["reason"], row["routing_key"]) == (misrouted, "unroutable", "high_priority")
    assert users.vhost.depth(queues.UNROUTABLE_QUEUE) == 1  # listing changed nothing


class CliWorker(Worker):
    """``python -m service worker`` as production runs it (mingle and gossip on)."""

    def __init__(self, env: dict[str, str], queues: tuple[str, ...] = ("urgent", "default", "bulk")) -> None:
        self.env = env
        self.queues = list(queues)
        self.name = f"sec{secrets.token_hex(3)}@%h"
        self.log_path = Path(env["KIT_TEST_OUTPUT_DIR"]) / f"worker-{secrets.token_hex(3)}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = spawn(
            [sys.executable, "-m", "service", "worker", "--queues", ",".join(queues), "--name", self.name,
             "--concurrency", "2"],
            env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
        )


def test_least_privilege_worker_runs_retries_and_dead_letters(users, kit_env, tmp_path):
    env = dict(kit_env, KIT_BROKER_URL=users.url("worker"), KIT_DECLARE_TOPOLOGY="false")
    worker = CliWorker(env)
    try:
        worker.wait_ready(users.vhost)
        node = worker.name.replace("%h", socket.gethostname())
        with client_as(users, "publisher") as publisher:
            publisher.publish("test.record", ["plain"])
            publisher.publish("test.flaky", ["flaky", 2])
            publisher.publish("test.fail_always", ["hopeless"])
            publisher.publish("test.permanent", ["nobody"])
        conn = users.connect("publisher")  # the publisher may put pickle on the wire; workers refuse it
        try:
            allowed(conn, publish_confirmed(queues.TASK_EXCHANGE, "default", b"\x80\x04K\x01.",
                                            {"task": "test.record", "id": "pickled"},
                                            "application/x-python-serialize"))
        finally:
            conn.close()
        wait_until(lambda: users.vhost.depth("default.dead") >= 3, 60, "three dead letters")
        dead = {m.headers.get("id") if m.headers.get("id") == "pickled" else m.headers["task"]: m.headers
                for m in users.vhost.drain("default.dead")}
        # Published by the worker itself (kit-* headers), not RabbitMQ's x-death fallback.
        assert dead["test.fail_always"][h.REASON] == h.REASON_RETRIES_EXHAUSTED
        assert dead["test.fail_always"][h.ATTEMPTS] == 3
        assert dead["test.permanent"][h.REASON] == h.REASON_PERMANENT
        assert dead["pickled"][h.REASON] == h.REASON_CONTENT_DISALLOWED
        # (x-death records only the wait queues' TTL expiry, never a rejection: the worker's fallback.)
        assert {d["reason"] for headers in dead.values() for d in headers.get("x-death", [])} <= {"expired"}
        wait_until(lambda: sorted(recorded(tmp_path, "done")) == ["flaky", "plain"], 30, "the retried task")
        assert recorded(tmp_path, "attempt").count("flaky:2") == 1
        # Remote control works with the worker's rights too (the compose healthcheck uses it).
        wait_for_run(
            lambda: subprocess.run([sys.executable, "-m", "celery", "-A", "service.app", "inspect", "ping",
                                    "--timeout", "5", "-d", node], env=env, cwd=REPO, capture_output=True,
                                   text=True, timeout=20),
            lambda ping: ping.returncode == 0 and "pong" in ping.stdout, 60, "the worker to answer a ping")
        assert worker.process.poll() is None
        log = worker.log()
        assert "ACCESS_REFUSED" not in log and "mingle: all alone" in log, log
    finally:
        worker.stop()


# -- monitor ------------------------------------------------------------------------


def test_monitor_user_cannot_publish_or_touch_the_queues(users, monkeypatch):
    conn = users.connect("monitor")
    try:
        for exchange in (queues.TASK_EXCHANGE, queues.RETRY_EXCHANGE, queues.DEAD_LETTER_EXCHANGE,
                         queues.EVENT_EXCHANGE, ""):
            refused(conn, publish_confirmed(exchange, "default", headers={queues.WAIT_HEADER: "1s"}))
        for action in (
            lambda ch: ch.basic_get("default"),
            lambda ch: ch.basic_consume("default.dead", callback=lambda m: None),
            lambda ch: ch.queue_purge("default"),
            lambda ch: ch.queue_delete("default"),
            lambda ch: ch.queue_bind("default", queues.EVENT_EXCHANGE, "#"),
        ):
            refused(conn, action)
        # Queue lengths by passive declare, as celery-exporter reads them.
        assert allowed(conn, lambda ch: ch.queue_declare("bulk.dead", passive=True)).message_count == 0
        assert allowed(conn, lambda ch: ch.queue_declare(queues.UNROUTABLE_QUEUE, passive=True)).message_count == 0
        refused(conn, lambda ch: ch.basic_get(queues.UNROUTABLE_QUEUE))
    finally:
        conn.close()
    monkeypatch.setenv("KIT_PUBLISH_TIMEOUT", "5")
    with pytest.raises(PublishError, match="refused access"), client_as(users, "monitor") as publisher:
        publisher.publish("test.record", ["from the monitor"])
    # The management API: read-only.
    vname = quote(users.vhost.name, safe="")
    status, body = users.http("monitor", "GET", f"/api/queues/{vname}")
    assert status == 200 and {q["name"] for q in json.loads(body)} >= {"urgent", "default", "bulk"}
    assert users.http("monitor", "DELETE", f"/api/queues/{vname}/default")[0] == 401
    assert users.http("monitor", "POST", f"/api/exchanges/{vname}/tasks/publish",
                      {"properties": {}, "routing_key": "default", "payload": "{}",
                       "payload_encoding": "string"})[0] >= 400
    assert users.http("monitor", "GET", "/api/users")[0] == 401
    assert users.http("publisher", "GET", f"/api/queues/{vname}")[0] == 401  # no management access at all
    assert users.vhost.depths(["default", "default.dead"]) == {"default": 0, "default.dead": 0}


# -- console --------------------------------------------------------------------------


def _seed_dead_letters(users: Users, labels: list[str]) -> list[str]:
    """Dead letters in default.dead (as a worker writes them) and one unroutable task with the routing key of a
    work queue, published as the admin; returns their ids (the unroutable one last)."""
    from tests.test_deadletters import Spec

    specs = [Spec(label, "test.record", exception="builtins.TimeoutError", message=f"timed out {label}")
             for label in labels]
    parked = Spec("parked", "test.record")
    conn = users.vhost.connection()
    try:
        channel = conn.channel()
        channel.confirm_select()
        for spec, exchange in [*((s, queues.DEAD_LETTER_EXCHANGE) for s in specs),
                               (parked, queues.UNROUTABLE_EXCHANGE)]:
            channel.basic_publish_confirm(
                amqp.Message(spec.body(), application_headers=spec.headers(), **spec.properties()),
                exchange, "default", confirm_timeout=10)
    finally:
        conn.close()
    assert users.vhost.depths(["default.dead", queues.UNROUTABLE_QUEUE]) == {
        "default.dead": len(labels), queues.UNROUTABLE_QUEUE: 1}
    return [s.id for s in (*specs, parked)]


def test_console_user_browses_replays_purges_exports_and_holds_the_lock(users, monkeypatch, tmp_path):
    """What the dead-letter console does, through the library, as kit-console."""
    from service import deadletters as dl
    from service.deadletters import Filters

    monkeypatch.setenv("KIT_PUBLISH_TIMEOUT", "5")
    first, second, third, parked = _seed_dead_letters(users, ["c1", "c2", "c3"])
    settings = replace(load(), broker_url=users.url("console"))
    conn, onlooker = connect(settings), connect(settings)
    admin = connect(replace(load(), broker_url=users.vhost.url))
    holder = "alice via the console (replay)"
    try:
        # The overview: depth and consumers of every queue, by passive declare (no right needed).
        channel = conn.channel()
        for name in (*queues.WORK_QUEUE_NAMES, *queues.DEAD_LETTER_QUEUE_NAMES):
            channel.queue_declare(name, passive=True)
        channel.close()
        # List, show, search, stats, export: an unacked walk; nothing changes.
        assert [d.id for d in dl.browse(conn, "default.dead")] == [first, second, third]
        assert [d.id for d in dl.browse(conn, "default.dead", Filters(search="TIMED OUT c2"))] == [second]
        assert dl.find(conn, queues.DEAD_LETTER_QUEUE_NAMES, parked).routing_key == "default"
        assert dl.stats(conn, "default.dead")["count"] == 3
        exported = io.StringIO()
        assert dl.export(conn, "default.dead", Filters(), exported) == 3
        # The lock and its holder record: a CLI (the admin) is refused, naming the console's user.
        lock = dl.hold(conn, "default.dead", holder)
        try:
            assert dl.holder_of(onlooker, "default.dead")["holder"] == holder
            with pytest.raises(dl.QueueBusy, match=re.escape(f"{holder} since ")):
                dl.hold(admin, "default.dead", dl.process_holder("dlq replay"))
        finally:
            dl.release(lock, "default.dead")
        # ... and the console is refused while the CLI holds it, naming the CLI.
        lock = dl.hold(admin, "default.dead", "root@ops pid 1 (dlq purge)")
        try:
            with pytest.raises(dl.QueueBusy, match=re.escape("root@ops pid 1 (dlq purge) since ")):
                dl.replay(conn, settings, "default.dead", Filters(), holder=holder)
        finally:
            dl.release(lock, "default.dead")
        # Replay, confirmed, into the work queue; an unroutable task back to the work queue it named.
        outcome = dl.replay(conn, settings, "default.dead", Filters(ids=(first,)), holder=holder)
        assert [d.id for d in outcome.taken] == [first] and not outcome.failed
        assert [d.id for d in dl.replay(conn, settings, queues.UNROUTABLE_QUEUE, Filters(), holder=holder).taken] == [
            parked]
        # Purge (what the console archives first is its own file).
        assert [d.id for d in dl.purge(conn, "default.dead", Filters(ids=(second,)), holder=holder).taken] == [second]
        # Import: the console may not write the dead-letter exchange; nothing was published, the lock is back.
        archive = tmp_path / "export.jsonl"
        archive.write_text(exported.getvalue())
        with pytest.raises(PublishError, match="refused access"):
            dl.import_records(conn, settings, dl.read_archive(archive), holder=holder)
        assert not dl.is_busy(onlooker, "default.dead")
    finally:
        conn.release()
        onlooker.release()
        admin.release()
    assert users.vhost.depths(["default", "default.dead", queues.UNROUTABLE_QUEUE]) == {
        "default": 2, "default.dead": 1, queues.UNROUTABLE_QUEUE: 0}
    assert [m.delivery_info["routing_key"] for m in users.vhost.drain("default")] == ["default", "default"]


def test_console_user_cannot_consume_work_retry_import_or_configure(users):
    from service.deadletters.lock import HOLDER_EXCHANGE, holder_queue_name

    conn = users.connect("console")
    record_queue = holder_queue_name("default.dead")
    try:
        for action in (
            lambda ch: ch.basic_consume("default", callback=lambda m: None),  # no work queue
            lambda ch: ch.basic_get("urgent"),
            lambda ch: ch.queue_purge("bulk"),
            lambda ch: ch.basic_get("tasks.wait.1s"),
            publish_confirmed(queues.RETRY_EXCHANGE, "default", headers={queues.WAIT_HEADER: "1s"}),
            publish_confirmed(queues.DEAD_LETTER_EXCHANGE, "default"),  # no import, no forged dead letters
            publish_confirmed(queues.UNROUTABLE_EXCHANGE, "default"),
            publish_confirmed("", "default.dead"),  # nor through the default exchange
            publish_confirmed(queues.EVENT_EXCHANGE, "task.sent"),  # no events either
            lambda ch: ch.queue_declare("mine", auto_delete=True),  # nothing but its locks and records
            lambda ch: ch.queue_declare("default.dead.lock.other", exclusive=True),
            lambda ch: ch.queue_declare("default.dead", durable=True, auto_delete=False,
                                        arguments=dict(queues.DEAD_LETTER_QUEUES[1].arguments)),
            lambda ch: ch.queue_delete("default.dead"),
            lambda ch: ch.queue_delete("default"),
            lambda ch: ch.exchange_declare("mine", "direct", durable=True, auto_delete=False),
            lambda ch: ch.exchange_delete(queues.TASK_EXCHANGE),
            lambda ch: ch.queue_bind(record_queue, queues.TASK_EXCHANGE, "default"),  # no copy of the tasks
            lambda ch: ch.queue_bind("default.dead", HOLDER_EXCHANGE, "default.dead"),  # no letters that way
            lambda ch: ch.queue_bind("default", HOLDER_EXCHANGE, "default"),
        ):
            refused(conn, action)
        # The lock and its record, by hand: what the library does.
        allowed(conn, lambda ch: ch.queue_declare("unroutable.dead.lock", exclusive=True, auto_delete=True))
        allowed(conn, lambda ch: ch.exchange_declare(HOLDER_EXCHANGE, "direct", durable=True, auto_delete=False))
        allowed(conn, publish_confirmed(queues.TASK_EXCHANGE, "bulk"))  # a replay
    finally:
        conn.close()
    vname = quote(users.vhost.name, safe="")
    assert users.http("console", "GET", f"/api/queues/{vname}")[0] == 401  # no management access
    assert users.vhost.depths(["default", "bulk", "default.dead", "tasks.wait.1s"]) == {
        "default": 0, "bulk": 1, "default.dead": 0, "tasks.wait.1s": 0}


def test_every_right_of_the_console_is_needed_checked_with_a_throwaway_user(vhost, monkeypatch):
    """Evidence for PERMISSIONS["console"]: without any one alternative of its regexes (those of
    default.dead stand for the other dead-letter queues'), the lock, its record or a replay fails."""
    from service import deadletters as dl
    from service.deadletters import Filters
    from service.topology import declare_on
    from tests.test_deadletters import Spec

    monkeypatch.setenv("KIT_PUBLISH_TIMEOUT", "3")
    admin_settings = replace(load(), broker_url=vhost.url)
    declare_on(admin_settings)
    user, password = f"{vhost.name}-console", secrets.token_urlsafe(18)
    management("PUT", f"/api/users/{quote(user, safe='')}", {"password": password, "tags": ""})
    settings = replace(load(), broker_url=f"pyamqp://{user}:{quote(password, safe='')}@{AMQP_HOST}:{AMQP_PORT}/"
                                          f"{vhost.name}")
    full = broker.PERMISSIONS["console"]
    spec = Spec("probe", "test.record")

    def works() -> bool:
        """The console's round: lock with a record others read, walk, replay. False at the first failure."""
        seeder = vhost.connection()
        try:
            publish_confirmed(queues.DEAD_LETTER_EXCHANGE, "default", spec.body(), spec.headers())(seeder.channel())
        finally:
            seeder.close()
        console, other = connect(settings), connect(admin_settings)
        try:
            lock = dl.hold(console, "default.dead", "probe")
            named = (dl.holder_of(other, "default.dead") or {}).get("holder") == "probe"
            dl.release(lock, "default.dead")
            return named and len(dl.replay(console, settings, "default.dead", Filters(), holder="probe").taken) == 1
        except (dl.DeadLetterError, amqp.exceptions.AMQPError):
            return False
        finally:
            console.release()
            other.release()
            vhost.drain("default")
            vhost.drain("default.dead")

    def grant(permissions: dict[str, str]) -> None:
        management("PUT", f"/api/permissions/{quote(vhost.name, safe='')}/{quote(user, safe='')}", permissions)

    rounds = 0
    try:
        grant(full)
        assert works()
        for kind, regex in full.items():
            alternatives = regex.removeprefix("^(").removesuffix(")$").split("|")
            for dropped in alternatives:
                if dropped.startswith(("urgent", "bulk", "unroutable")):
                    continue  # as default.dead's
                grant({**full, kind: _any_of_regexes([a for a in alternatives if a != dropped])})
                assert not works(), f"{kind} {dropped} is not needed"
                rounds += 1
        assert rounds == 9  # configure: lock, record queue, exchange; write: tasks, exchange, record queue;
        # read: dead-letter queue, record queue, exchange
    finally:
        _delete_users([user])


def _any_of_regexes(alternatives: list[str]) -> str:
    return "^(" + "|".join(alternatives) + ")$"


def test_celery_exporter_works_as_the_monitor_user(users, kit_env, tmp_path):
    from tests.observability import EXPORTER_PYTHON, Exporter

    if not EXPORTER_PYTHON.exists():
        pytest.skip("celery-exporter is not installed (.venv-exporter); run scripts/install.sh")
    env = dict(kit_env, KIT_BROKER_URL=users.url("worker"), KIT_DECLARE_TOPOLOGY="false")
    worker = Worker(env, queues=("default",), concurrency=1)
    exporter = None
    try:
        worker.wait_ready(users.vhost)
        exporter = Exporter(users.url("monitor"), ["default", "default.dead"], tmp_path,
                            worker_timeout=30).wait_ready(60)
        with client_as(users, "publisher") as publisher:
            publisher.publish("test.record", ["counted"])

        def metrics() -> str:
            return urllib.request.urlopen(f"http://127.0.0.1:{exporter.port}/metrics", timeout=15).read().decode()

        # sent: the client's task-sent event (passive declare); the others come from the worker.
        # (The queue label depends on which event the exporter saw first, so any label counts.)
        counted = [re.compile(rf'celery_task_{kind}_total\{{[^}}]*name="test.record",queue_name="[^"]*"\}} 1\.0')
                   for kind in ("sent", "received", "succeeded")]

        last = [""]

        def scraped() -> str:
            last[0] = metrics()
            return last[0] if all(c.search(last[0]) for c in counted) else ""

        try:
            text = wait_until(scraped, 30, "the exporter to count the task")
        except AssertionError:
            raise AssertionError("\n".join(x for x in last[0].splitlines() if "test.record" in x)) from None
        assert re.search(r"celery_worker_up\{[^}]*\} 1\.0", text), text
        assert 'celery_active_consumer_count{queue_name="default"} 1.0' in text
        assert 'celery_queue_length{queue_name="default.dead"} 0.0' in text
        assert "ACCESS_REFUSED" not in exporter.log()
    finally:
        if exporter is not None:
            exporter.close()
        worker.stop()


# -- JSON only ----------------------------------------------------------------------


def test_pickle_is_refused_everywhere():
    from service.app import app
    from service.client import Publisher, TaskRequest, build_message, publish

    assert app.conf.accept_content == ["json"]
    assert app.conf.result_accept_content == ["json"]
    assert (app.conf.task_serializer, app.conf.result_serializer, app.conf.event_serializer) == ("json",) * 3
    # The client has no way to choose a serializer: it always writes JSON.
    _, message = build_message(TaskRequest("test.record", ["x"]), 1024)
    assert message.properties["content_type"] == "application/json"
    json.loads(message.body)
    for func in (publish, Publisher.publish, TaskRequest, build_message):
        params = set(inspect.signature(func).parameters)
        assert not params & {"serializer", "content_type", "encoder"}, func
    # Nor has the command line.
    done = subprocess.run([sys.executable, "-m", "service", "publish", "test.record", "--serializer", "pickle"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and re.search(r"No such option:? '?--serializer", done.stderr), done.stderr
    usage = subprocess.run([sys.executable, "-m", "service", "publish", "--help"], cwd=REPO, capture_output=True,
                           text=True, timeout=60).stdout
    assert not re.search(r"(?i)serializ|pickle|content.type", usage)
    # celery-exporter is told to accept JSON only wherever the kit runs it.
    from tests.observability import Exporter

    assert '"--accept-content", "json"' in inspect.getsource(Exporter)
    compose = REPO / "docker-compose.yml"
    if compose.exists():
        text = compose.read_text()
        if "celery-exporter" in text or "celery_exporter" in text:
            assert '"--accept-content", "json"' in text


# -- the command line ---------------------------------------------------------------


def _secrets_dir(path: Path, passwords: dict[str, str]) -> Path:
    path.mkdir(mode=0o700)
    for role, password in passwords.items():
        (path / broker.SECRET_FILE.format(role=role)).write_text(password + "\n")
    return path


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service", "broker", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=env)


def test_cli_writes_definitions_readable_by_their_owner_only(tmp_path):
    passwords = {role: secrets.token_hex(16) for role in broker.ROLES}
    secrets_dir = _secrets_dir(tmp_path / "secrets", passwords)
    out = tmp_path / "definitions.json"
    done = _cli("definitions", "--secrets-dir", str(secrets_dir), "--vhost", "kit", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    defs = json.loads(out.read_text())
    assert {u["name"] for u in defs["users"]} == {"kit-admin", "kit-publisher", "kit-worker", "kit-monitor",
                                                  "kit-console"}
    for user in defs["users"]:
        assert broker.check_password(passwords[user["name"].removeprefix("kit-")], user["password_hash"])
    assert not any(p in out.read_text() for p in passwords.values())
    assert {q["name"] for q in defs["queues"]} == {q.name for q in queues.ALL_QUEUES}

    # Clear errors, naming the file.
    (secrets_dir / "rabbitmq_monitor_password").write_text("\n")
    done = _cli("definitions", "--secrets-dir", str(secrets_dir), "--out", str(tmp_path / "x.json"))
    assert done.returncode == 2 and "rabbitmq_monitor_password is empty" in done.stderr
    (secrets_dir / "rabbitmq_monitor_password").unlink()
    done = _cli("definitions", "--secrets-dir", str(secrets_dir), "--out", str(tmp_path / "x.json"))
    assert done.returncode == 2 and "rabbitmq_monitor_password is missing" in done.stderr
    (secrets_dir / "rabbitmq_monitor_password").write_text("guest")
    done = _cli("definitions", "--secrets-dir", str(secrets_dir), "--out", str(tmp_path / "x.json"))
    assert done.returncode == 2 and "well-known default" in done.stderr
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(ConfigError, match="does not exist"):
        broker.read_passwords(tmp_path / "nowhere")


def test_cli_provisions_over_the_management_api_idempotently(vhost, tmp_path):
    prefix = f"{vhost.name}-"
    passwords = {role: secrets.token_hex(16) for role in broker.ROLES}
    secrets_dir = _secrets_dir(tmp_path / "secrets", passwords)
    admin_file = tmp_path / "admin_password"
    admin_file.write_text(ADMIN_PASSWORD)
    env = dict(os.environ, KIT_ADMIN_URL=MANAGEMENT_URL)
    args = ("provision", "--secrets-dir", str(secrets_dir), "--vhost", vhost.name, "--user-prefix", prefix,
            "--admin-user", ADMIN_USER, "--admin-password-file", str(admin_file))
    try:
        for _ in range(2):
            done = _cli(*args, env=env)
            assert done.returncode == 0, done.stderr
        assert f"users {prefix}admin, {prefix}publisher" in done.stdout
        users = Users(vhost, prefix, passwords, {})
        users.connect("publisher").close()
        # Now the kit's own admin can provision (as it would after the first time).
        done = _cli(*args[:7], "--admin-user", f"{prefix}admin", env=env)
        assert done.returncode == 0, done.stderr
        admin_file.write_text("not the password")
        done = _cli(*args, env=env)
        assert done.returncode == 2 and "401" in done.stderr and "not the password" not in done.stderr
        done = _cli(*args[:7], "--management-url", "http://127.0.0.1:1", env=env)
        assert done.returncode == 2 and "cannot reach RabbitMQ's management API" in done.stderr
        # RabbitMQ's import silently keeps a queue that exists with other arguments: provision says so.
        admin_file.write_text(ADMIN_PASSWORD)
        conn = vhost.connection()
        conn.channel().queue_delete("bulk")
        conn.channel().queue_declare("bulk", durable=True, auto_delete=False, arguments={"x-max-priority": 10})
        conn.close()
        done = _cli(*args, env=env)
        assert done.returncode == 2 and "queue 'bulk' has arguments {'x-max-priority': 10}" in done.stderr
    finally:
        _delete_users([broker.user_name(role, prefix) for role in broker.ROLES])


def test_least_privilege_settings_are_documented():
    from service.settings import SETTINGS

    [setting] = [s for s in SETTINGS if s.name == "KIT_DECLARE_TOPOLOGY"]
    assert setting.default == "true"
    doc = (REPO / "deploy" / "rabbitmq" / "README.md").read_text()
    for role in broker.ROLES:
        assert f"`{broker.SECRET_FILE.format(role=role)}`" in doc
        for regex in broker.PERMISSIONS[role].values():
            assert f"`{regex}`" in doc, (role, regex)
    assert "KIT_DECLARE_TOPOLOGY=false" in doc


# -- TLS ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=directory)
    return directory / f"{name}.pem", directory / f"{name}.key"


def _make_cert(directory: Path, name: str, ca: tuple[Path, Path], san: str, usage: str) -> tuple[Path, Path]:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", cwd=directory)
    (directory / f"{name}.ext").write_text(
        (f"subjectAltName={san}\n" if san else "")
        + f"basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=directory)
    return directory / f"{name}.pem", directory / f"{name}.key"


@dataclass
class TlsBroker:
    port: int
    ca: Path
    other_ca: Path
    client_cert: Path
    client_key: Path
    passwords: dict[str, str]

    def url(self, role: str, host: str = "localhost") -> str:
        return f"amqps://kit-{role}:{quote(self.passwords[role], safe='')}@{host}:{self.port}/kit"


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory) -> Iterator[TlsBroker]:
    """A second RabbitMQ node of our own with only a TLS listener (mutual TLS), and the kit's definitions."""
    if not shutil.which("openssl") or not (RABBITMQ_BIN / "rabbitmq-server").exists():
        pytest.skip("needs the openssl command and RabbitMQ under /usr/lib/rabbitmq/bin")
    work = tmp_path_factory.mktemp("tls")
    ca = _make_ca(work, "kit-test-ca")
    other_ca = _make_ca(work, "other-ca")
    # The server certificate names localhost only: connecting as 127.0.0.1 must fail.
    server = _make_cert(work, "localhost", ca, "DNS:localhost", "serverAuth")
    client = _make_cert(work, "kit-client", ca, "", "clientAuth")
    passwords = {role: secrets.token_urlsafe(24) for role in broker.ROLES}
    broker.write_definitions(broker.definitions("kit", passwords), work / "definitions.json")
    port = _free_port()
    (work / "rabbitmq.conf").write_text(
        "listeners.tcp = none\n"
        f"listeners.ssl.default = 127.0.0.1:{port}\n"
        f"ssl_options.cacertfile = {ca[0]}\n"
        f"ssl_options.certfile = {server[0]}\n"
        f"ssl_options.keyfile = {server[1]}\n"
        "ssl_options.verify = verify_peer\n"
        "ssl_options.fail_if_no_peer_cert = true\n"
        f"load_definitions = {work / 'definitions.json'}\n"
    )
    (work / "enabled_plugins").write_text("[].\n")  # no management, no prometheus: no ports to clash
    (work / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq/rabbitmq-env.conf of the shared node
    home = work / "home"  # our own Erlang cookie, for this node and its rabbitmqctl only
    home.mkdir()
    (home / ".erlang.cookie").write_text(secrets.token_hex(20))
    (home / ".erlang.cookie").chmod(0o400)
    node = f"kit-tls-{secrets.token_hex(4)}@localhost"
    env = dict(
        os.environ, HOME=str(home), RABBITMQ_NODENAME=node, RABBITMQ_NODE_PORT=str(_free_port()),
        RABBITMQ_DIST_PORT=str(_free_port()), RABBITMQ_CONFIG_FILE=str(work / "rabbitmq.conf"),
        RABBITMQ_ADVANCED_CONFIG_FILE=str(work / "advanced.config"),
        RABBITMQ_CONF_ENV_FILE=str(work / "rabbitmq-env.conf"),
        RABBITMQ_MNESIA_BASE=str(work / "mnesia"), RABBITMQ_LOG_BASE=str(work / "log"),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(work / "enabled_plugins"), RABBITMQ_PID_FILE=str(work / "node.pid"),
    )
    ctl = [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", node]
    log = (work / "server.log").open("wb")
    server_process = spawn([str(RABBITMQ_BIN / "rabbitmq-server")], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # `wait` waits for the pid file, then for the node to boot.
        done = subprocess.run([*ctl, "wait", str(work / "node.pid"), "--timeout", "120"], env=env,
                              capture_output=True, text=True, timeout=150)
        if done.returncode != 0 or server_process.poll() is not None:
            raise AssertionError(f"the TLS node did not start:\n{done.stdout}{done.stderr}\n"
                                 f"{(work / 'server.log').read_text(errors='replace')[-3000:]}")
        wait_until(lambda: _accepts(port), 30, "the TLS listener", interval=0.1)
        yield TlsBroker(port, ca[0], other_ca[0], client[0], client[1], passwords)
    finally:
        subprocess.run([*ctl, "stop"], env=env, capture_output=True, timeout=60)
        try:
            server_process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server_process.pid, signal.SIGKILL)
            server_process.wait(10)
        log.close()


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def tls_env(tls_broker, monkeypatch) -> TlsBroker:
    monkeypatch.setenv("KIT_BROKER_CLIENT_CERT_FILE", str(tls_broker.client_cert))
    monkeypatch.setenv("KIT_BROKER_CLIENT_KEY_FILE", str(tls_broker.client_key))
    monkeypatch.setenv("KIT_PUBLISH_TIMEOUT", "5")
    monkeypatch.setenv("KIT_CONNECT_TIMEOUT", "3")
    monkeypatch.delenv("KIT_BROKER_PASSWORD_FILE", raising=False)
    return tls_broker


def _publish_over_tls(monkeypatch, url: str, ca: Path | None) -> str:
    from service.client import Publisher

    monkeypatch.setenv("KIT_BROKER_URL", url)
    if ca is None:
        monkeypatch.delenv("KIT_BROKER_CA_FILE", raising=False)
    else:
        monkeypatch.setenv("KIT_BROKER_CA_FILE", str(ca))
    with Publisher() as publisher:
        return publisher.publish("test.record", ["over tls"])


def test_tls_with_the_test_ca_publishes(tls_env, monkeypatch):
    assert _publish_over_tls(monkeypatch, tls_env.url("publisher"), tls_env.ca)
    # The node really holds it: read back as the kit's admin over TLS.
    options = {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": "localhost", "ca_certs": str(tls_env.ca),
               "certfile": str(tls_env.client_cert), "keyfile": str(tls_env.client_key)}
    conn = amqp.Connection(f"localhost:{tls_env.port}", userid="kit-admin", password=tls_env.passwords["admin"],
                           virtual_host="kit", ssl=options)  # a dict: py-amqp ignores an SSLContext here
    conn.connect()
    try:
        assert conn.channel().queue_declare("default", passive=True).message_count >= 1
    finally:
        conn.close()


def test_threads_sharing_a_publisher_over_tls_all_get_their_confirms(tls_env, monkeypatch):
    """On TLS the reader and the writers never touch the SSL connection at once (OpenSSL forbids it)."""
    import threading

    from service.client import Publisher

    monkeypatch.setenv("KIT_BROKER_URL", tls_env.url("publisher"))
    monkeypatch.setenv("KIT_BROKER_CA_FILE", str(tls_env.ca))
    ids: list[str] = []
    errors: list[BaseException] = []
    with Publisher() as publisher:
        def work(index: int) -> None:
            try:
                ids.extend(publisher.publish("test.record", ["tls", index, n]) for n in range(40))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert not errors and len(set(ids)) == 8 * 40
    options = {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": "localhost", "ca_certs": str(tls_env.ca),
               "certfile": str(tls_env.client_cert), "keyfile": str(tls_env.client_key)}
    conn = amqp.Connection(f"localhost:{tls_env.port}", userid="kit-admin", password=tls_env.passwords["admin"],
                           virtual_host="kit", ssl=options)
    conn.connect()
    try:
        channel = conn.channel()
        queued = set()
        while (message := channel.basic_get("default", no_ack=True)) is not None:
            queued.add(message.headers["id"])
    finally:
        conn.close()
    assert set(ids) <= queued


def test_tls_without_the_ca_fails_certificate_verification(tls_env, monkeypatch):
    for ca in (None, tls_env.other_ca):  # the system's CAs, or a CA that did not sign the broker's certificate
        with pytest.raises(BrokerUnavailable, match="certificate verif") as info:
            _publish_over_tls(monkeypatch, tls_env.url("publisher"), ca)
        assert "KIT_BROKER_CA_FILE" in str(info.value)
        assert tls_env.passwords["publisher"] not in str(info.value)


def test_tls_with_a_certificate_for_another_host_name_fails(tls_env, monkeypatch):
    # The certificate names localhost; the same node reached as 127.0.0.1 must be refused.
    with pytest.raises(BrokerUnavailable, match="certificate verif.*(mismatch|match)"):
        _publish_over_tls(monkeypatch, tls_env.url("publisher", host="127.0.0.1"), tls_env.ca)


def test_tls_broker_requires_a_client_certificate(tls_env, monkeypatch):
    monkeypatch.delenv("KIT_BROKER_CLIENT_CERT_FILE")
    monkeypatch.delenv("KIT_BROKER_CLIENT_KEY_FILE")
    monkeypatch.setenv("KIT_PUBLISH_TIMEOUT", "1")  # the broker's alert comes after the handshake: retried
    with pytest.raises(BrokerUnavailable):
        _publish_over_tls(monkeypatch, tls_env.url("publisher"), tls_env.ca)


# -- committed secrets ----------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    rule: str
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule}: {self.text.strip()[:160]}"


_PASSWORDISH = r"[\w.-]*(?:password|passwd|pwd|pass|secret|token|api[_-]?key|access[_-]?key|private[_-]?key)[\w.-]*"
#: Values that are obviously placeholders or references, not secrets.
_PLACEHOLDER = re.compile(
    r"^(?:[$%<{*\[(^/~]|…|\.\.\.|null$|none$|true$|false$|x+$|example|your[-_]|redacted"
    r"|[A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*)+$)",  # a reference, a regex, a list, a dotted name
    re.IGNORECASE)
#: In URLs, user:password@host is the usual way to write "your credentials here".
_URL_PLACEHOLDER = re.compile(r"(?i)^(?:password|pass|secret|pw)$")
#: Well-known default passwords; a value that is (or says) one of them is a default-password finding.
_DEFAULT_SECRETS = r"(?:guest|admin|password|changeme|change-me|change_me|secret|rabbitmq|celery|123456|letmein)"
_DEFAULT_VALUE = re.compile(rf"(?i)^{_DEFAULT_SECRETS}$|change[-_]?me")

#: (rule, regex, only in config-like files). A line reports its first finding.
#: A regex with a "value" group is checked against placeholders and defaults.
RULES: tuple[tuple[str, re.Pattern[str], bool], ...] = (
    ("private-key", re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"), False),
    ("aws-access-key-id", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), False),
    ("aws-secret-access-key",
     re.compile(r"(?i)aws_?secret_?access_?key['\"]?\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{40}\b"), False),
    ("slack-webhook",
     re.compile(r"hooks\.slack\.com/(?:services|workflows|triggers)/T[A-Z0-9]+/[A-Z0-9]+/[A-Za-z0-9]{8,}"), False),
    ("slack-token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"), False),
    ("dsn-with-key", re.compile(r"\bhttps?://[0-9a-f]{32}(?::[0-9a-f]{32})?@[A-Za-z0-9.-]+(?::\d+)?/\d+"), False),
    ("url-with-password", re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s:/@'\"`]+:(?P<value>[^\s/@'\"`]+)@"), False),
    ("password-literal",
     re.compile(rf"(?i)\b{_PASSWORDISH}['\"]?\s*[:=]\s*[rb]?['\"](?P<value>[^'\"\s]{{6,}})['\"]"), False),
    ("password-in-config",  # key = value, unquoted, in .conf/.yml/.env/.sh/...
     re.compile(rf"(?im)^\s*(?:export\s+)?{_PASSWORDISH}\s*[:=]\s*(?P<value>[^\s'\"#]{{4,}})\s*(?:#.*)?$"), True),
    ("default-credentials", re.compile(rf"(?i)\b(?:guest|admin|root)[:/]{_DEFAULT_SECRETS}\b"), False),
    ("default-password",  # PASSWORD = "admin", get("KIT_PASSWORD", "guest"), default_pass = guest
     re.compile(rf"(?i){_PASSWORDISH}['\"]?\s*[:=,]\s*['\"]?(?P<value>{_DEFAULT_SECRETS})"
                r"(?=['\"]|\s*(?:$|[,;)#]))"), False),
    ("default-password", re.compile(r"(?i)\bchange[-_]?me\b"), False),
)
_CONFIG_SUFFIXES = {".conf", ".cfg", ".ini", ".env", ".yml", ".yaml", ".toml", ".properties", ".sh"}
#: Keys that name a file or a variable holding the secret, not the secret itself.
_REFERENCE_KEY = re.compile(r"(?i)(?:_file|_files|_path|_dir|_env|_name|_header)['\"]?\s*[:=]")
#: Paths that must never be committed at all (keys, certificates' keys, secrets directories, .env).
_SECRET_PATH = re.compile(r"(?:^|/)(?:secrets?/|\.env$|id_(?:rsa|dsa|ecdsa|ed25519)$|[^/]+\.(?:pem|key|p12|pfx|jks)$)")

#: What is allowed, and why. Keep it small: every entry is a decision.
#: (path prefix, rule pattern, text the line must contain, why).
ALLOWED: tuple[tuple[str, str, str, str], ...] = (
    # tests/ and bench/ talk to the throwaway local broker of scripts/broker.sh: a
    # Debian RabbitMQ whose default guest/guest administrator can only log in over
    # loopback. harness/broker.py uses it as the tests' admin (KIT_TEST_ADMIN_USER and
    # KIT_TEST_ADMIN_PASSWORD override it), and a few tests put it in URLs to ports
    # where nothing listens. Default passwords are findings only in what ships
    # (service/, deploy/, scripts/, docs/, docker-compose.yml, Dockerfile, README).
    ("tests/", "default-*", "", "the test-only loopback broker's guest"),
    ("bench/", "default-*", "", "benchmarks run against the same test broker"),
    ("harness/", "default-*", "", "the sandbox of tests/ and bench/ on that broker"),
    # A made-up password with @, / and : in it, to test how broker URLs are quoted.
    ("tests/test_compose.py", "url-with-password", "p%40ss%2Fw%3Ard", "made-up, tests URL quoting"),
)


def _allowed(path: str, rule: str, line: str = "") -> bool:
    return any(path.startswith(prefix) and re.fullmatch(pattern.replace("*", ".*"), rule) and text in line
               for prefix, pattern, text, _why in ALLOWED)


def _line_rule(path: str, config_like: bool, line: str) -> str | None:
    for rule, regex, config_only in RULES:
        if config_only and not config_like:
            continue
        for match in regex.finditer(line):
            name, value = rule, match.groupdict().get("value")
            if value is not None:
                if rule == "url-with-password" and _URL_PLACEHOLDER.match(value):
                    continue
                if _DEFAULT_VALUE.search(value):
                    name = "default-password"
                elif _PLACEHOLDER.match(value) or _REFERENCE_KEY.search(match.group(0)):
                    continue
            if not _allowed(path, name, line):
                return name
    return None


def scan_text(path: str, text: str) -> list[Finding]:
    """The findings of one file's content (at most one per line)."""
    config_like = Path(path).suffix in _CONFIG_SUFFIXES or Path(path).name.startswith(("docker-compose", ".env"))
    findings = []
    for number, line in enumerate(text.splitlines(), 1):
        rule = _line_rule(path, config_like, line)
        if rule:
            findings.append(Finding(path, number, rule, line))
    return findings


def scan_path(path: str) -> list[Finding]:
    if _SECRET_PATH.search(path) and not _allowed(path, "secret-file"):
        return [Finding(path, 0, "secret-file", "a key or secrets file is tracked (or not ignored)")]
    return []


def repository_files() -> list[str]:
    """Tracked files plus untracked ones that are not ignored (the next commit's candidates)."""
    done = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                          capture_output=True, timeout=60)
    if done.returncode != 0:
        pytest.skip(f"not a git checkout: {done.stderr.decode(errors='replace').strip()}")
    return sorted({p for p in done.stdout.decode().split("\0") if p})


def scan_repository() -> list[Finding]:
    findings = []
    for path in repository_files():
        findings += scan_path(path)
        file = REPO / path
        if not file.is_file():
            continue  # deleted in the work tree
        data = file.read_bytes()[:2_000_000]
        if b"\0" in data[:8192]:
            continue  # binary
        findings += scan_text(path, data.decode("utf-8", errors="replace"))
    return findings


def test_the_scanner_finds_what_it_should():
    # Built at run time, so this file itself holds none of them.
    key = "-----BEGIN " + "RSA PRIVATE KEY-----"
    aws = "AKIA" + "IOSFODNN7EXAMPLQ"
    slack = "https://hooks.slack.com/services/" + "T0AAAAAAA/B0BBBBBBB/" + "abcdefghijklmnopqrstuvwx"
    dsn = "https://" + "0123456789abcdef" * 2 + "@o1.ingest.sentry.io/42"
    real = "s3cr3t-" + "Xy9kQ2"
    cases = {
        ("service/x.py", key): "private-key",
        ("docs/a.md", f"id = {aws}"): "aws-access-key-id",
        ("deploy/a.yml", f"slack_api_url: {slack}"): "slack-webhook",
        ("service/x.py", f'SENTRY_DSN = "{dsn}"'): "dsn-with-key",
        ("tests/x.py", f'url = "pyamqp://kit-worker:{real}@broker:5672/kit"'): "url-with-password",
        ("service/x.py", f'DB_PASSWORD = "{real}"'): "password-literal",
        ("tests/x.py", f'{{"smtp_password": "{real}"}}'): "password-literal",
        ("deploy/a.conf", f"default_pass = {real}"): "password-in-config",
        ("service/settings.py", '"pyamqp://guest:' + 'guest@127.0.0.1:5672//",'): "default-password",
        ("README.md", "UI (guest/" + "guest, loopback only)"): "default-credentials",
        ("scripts/broker.sh", "curl -u admin:" + "admin http://x"): "default-credentials",
        ("deploy/rabbitmq/rabbitmq.conf", "default_pass = change" + "-me-at-provisioning"): "default-password",
        ("docker-compose.yml", "RABBITMQ_DEFAULT_PASS: gu" + "est"): "default-password",
        ("service/x.py", 'PASSWORD = os.environ.get("KIT_PASSWORD", "ad' + 'min")'): "default-password",
    }
    for (path, text), rule in cases.items():
        assert [f.rule for f in scan_text(path, text)] == [rule], (path, text)
    quiet = [
        ("deploy/alertmanager/README.md", "printf '%s\\n' 'https://hooks.slack.com/services/T…/B…/…'"),
        ("service/settings.py", '"pyamqp://user:password@host:5672/vhost."'),
        ("service/x.py", 'f"pyamqp://{ADMIN_USER}:{ADMIN_PASSWORD}@{host}"'),
        ("deploy/a.yml", "smtp_auth_password_file: /run/secrets/alertmanager_smtp_password"),
        ("service/x.py", 'SECRET_FILE = "rabbitmq_{role}_password"'),
        ("service/x.py", "password = Path(path).read_text().strip()"),
        ("harness/broker.py", 'ADMIN_PASSWORD = os.environ.get("KIT_TEST_ADMIN_PASSWORD", "gu' + 'est")'),
        ("tests/x.py", 'BROKER_DOWN_URL = "pyamqp://guest:' + 'guest@127.0.0.1:1//"'),
        ("service/x.py", "return f\"{scheme}://{user}:***@{host}\""),
        ("docker-compose.yml", "    secrets: [rabbitmq_worker_password]"),
        ("service/x.py", '"smtp_password": "password of smtp_auth_username (smtp_auth_password_file)",'),
        ("tests/x.py", 'SECRET_TASK = "test.secret_arguments"'),
        ("service/x.py", '_PASSWORDISH = r"[\\w.-]*(?:password|secret)"'),
    ]
    for path, text in quiet:
        assert scan_text(path, text) == [], (path, text)
    assert [f.rule for f in scan_path("secrets/rabbitmq_admin_password")] == ["secret-file"]
    assert [f.rule for f in scan_path("deploy/tls/server.key")] == ["secret-file"]


def test_repository_has_no_committed_secrets_or_default_passwords():
    findings = scan_repository()
    assert not findings, "secrets or default passwords in the repository:\n" + "\n".join(map(str, findings))
