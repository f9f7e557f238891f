"""Nothing published to the task exchange vanishes: what no work queue takes is parked in unroutable.dead.

The task exchange (``tasks``) has an alternate exchange (``tasks.unroutable``,
fanout) whose queue ``unroutable.dead`` the dlq tools show with reason
``unroutable`` and the routing key the message had. Plain Celery apps publish
to the kit with ``service.celery_settings``. Only one test runs a worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from typing import Any
from urllib.parse import quote

import amqp
import pytest
from celery import Celery
from celery.exceptions import QueueNotFound

from service import broker, queues
from service import headers as h
from service.celery_settings import publisher_settings
from service.client import Publisher
from service.settings import load
from service.topology import connect, verify
from tests.helpers import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    MANAGEMENT_URL,
    REPO,
    Vhost,
    management,
    management_delete,
    wait_until,
)
from tests.test_deadletters import cli_json, ok, run_cli
from tests.worker_tasks import recorded

UNROUTABLE = queues.UNROUTABLE_QUEUE


def publish_raw(vhost: Vhost, routing_key: str, *, exchange: str = queues.TASK_EXCHANGE, task_id: str | None = None,
                headers: dict[str, Any] | None = None, **properties: Any) -> str:
    """Publish one Celery-like task as any AMQP client could (mandatory, confirmed); returns its id.

    Fails the test when the broker returns it as unroutable: the alternate exchange must take it.
    """
    task_id = task_id or str(uuid.uuid4())
    returned: list[Any] = []
    conn = vhost.connection()
    try:
        channel = conn.channel()
        channel.events["basic_return"].add(lambda *args: returned.append(args))
        channel.confirm_select()
        channel.basic_publish_confirm(
            amqp.Message(json.dumps([["x"], {}, {}]).encode(), content_type="application/json",
                         content_encoding="utf-8", delivery_mode=2,
                         application_headers={"task": "test.record", "id": task_id, **(headers or {})},
                         **properties),
            exchange, routing_key, mandatory=True, confirm_timeout=10,
        )
    finally:
        conn.close()
    assert returned == [], "the broker returned the message: nothing took it"
    return task_id


def parked(vhost: Vhost) -> list[dict[str, Any]]:
    """What unroutable.dead holds, in order, with the routing key each was delivered with (unchanged)."""
    conn = vhost.connection()
    try:
        channel = conn.channel()
        channel.auto_decode = False
        _, count, _ = channel.queue_declare(UNROUTABLE, passive=True)
        received: list[amqp.Message] = []
        if count:
            channel.basic_qos(0, 0, False)
            channel.basic_consume(UNROUTABLE, no_ack=False, callback=received.append)
            while len(received) < count:
                conn.drain_events(timeout=5)
        return [{"routing_key": m.delivery_info["routing_key"], "body": bytes(m.body),
                 "headers": dict(m.properties.get("application_headers") or {}),
                 "properties": {k: v for k, v in m.properties.items() if k != "application_headers"}}
                for m in received[:count]]
    finally:
        conn.close()


def topology_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service", "topology", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def explanation(key: str) -> str:
    return f"no work queue is bound to routing key {key!r} on exchange 'tasks'"


# -- the topology -----------------------------------------------------------------------------------


def test_the_task_exchange_parks_what_it_cannot_route_in_unroutable_dead():
    assert dict(queues.exchange(queues.TASK_EXCHANGE).arguments) == {"alternate-exchange": queues.UNROUTABLE_EXCHANGE}
    assert queues.EXCHANGES[queues.UNROUTABLE_EXCHANGE] == "fanout"
    assert dict(queues.exchange(queues.UNROUTABLE_EXCHANGE).arguments) == {}
    assert (queues.UNROUTABLE.name, queues.UNROUTABLE.exchange) == ("unroutable.dead", "tasks.unroutable")
    assert UNROUTABLE in queues.DEAD_LETTER_QUEUE_NAMES and queues.UNROUTABLE in queues.ALL_QUEUES
    with pytest.raises(ValueError, match="never published to or consumed directly"):
        queues.work_queue(UNROUTABLE)
    defs = broker.definitions("kit", {role: f"a-long-password-{role}" for role in broker.ROLES})
    [tasks] = [x for x in defs["exchanges"] if x["name"] == "tasks"]
    assert tasks["arguments"] == {"alternate-exchange": "tasks.unroutable"}
    assert [(b["source"], b["routing_key"]) for b in defs["bindings"] if b["destination"] == UNROUTABLE] == [
        ("tasks.unroutable", "")]
    assert UNROUTABLE in {q["name"] for q in defs["queues"]}


def test_the_alert_rules_watch_the_queue_of_service_queues():
    """CeleryTasksUnroutable watches UNROUTABLE_QUEUE; DeadLetterQueueGrowing (per work queue) leaves it alone."""
    text = (REPO / "deploy" / "prometheus" / "rules" / "celery.yml").read_text()
    blocks = {b.split()[0]: b for b in text.split("- alert:")[1:]}
    assert f'rabbitmq_queue_messages{{queue="{UNROUTABLE}"}} > 0' in blocks["CeleryTasksUnroutable"]
    assert blocks["DeadLetterQueueGrowing"].count(f'queue!="{UNROUTABLE}"') == 2
    assert (REPO / "docs" / "runbooks" / "celery-tasks-unroutable.md").is_file()


def test_an_unbound_routing_key_is_parked_with_its_routing_key_and_shown_by_the_dlq_tools(vhost, kit_env, topology):
    task_id = publish_raw(vhost, "high_priority", priority=2)
    assert vhost.depths(["urgent", "default", "bulk", UNROUTABLE]) == {"urgent": 0, "default": 0, "bulk": 0,
                                                                        UNROUTABLE: 1}
    before = parked(vhost)
    assert [m["routing_key"] for m in before] == ["high_priority"]

    for selector in (["--queue", "unroutable"], ["--queue", UNROUTABLE], ["--reason", "unroutable"], []):
        [row] = cli_json(kit_env, "list", *selector)
        assert (row["queue"], row["id"], row["task"], row["reason"], row["routing_key"]) == (
            UNROUTABLE, task_id, "test.record", "unroutable", "high_priority"), selector
        assert row["message"].startswith(explanation("high_priority")), row["message"]
        assert row["source_queue"] is None  # no work queue by that name: a replay needs --to
    text = ok(kit_env, "list", "-q", "unroutable").stdout  # not a terminal: tab-separated
    assert "routing_key" in text.splitlines()[0] and "\thigh_priority\t" in text and "1 dead letter(s)" in text

    info = cli_json(kit_env, "show", task_id)
    assert (info["queue"], info["reason"], info["routing_key"], info["exchange"]) == (
        UNROUTABLE, "unroutable", "high_priority", "tasks")
    assert info["args"] == ["x"] and info["properties"]["priority"] == 2
    shown = ok(kit_env, "show", task_id).stdout
    assert "high_priority" in shown and explanation("high_priority") in shown

    [stats] = cli_json(kit_env, "stats", "-q", "unroutable")
    assert (stats["queue"], stats["count"], stats["by_reason"], stats["by_routing_key"]) == (
        UNROUTABLE, 1, {"unroutable": 1}, {"high_priority": 1})
    assert "by routing key: high_priority 1" in ok(kit_env, "stats", "-q", "unroutable").stdout
    assert parked(vhost) == before  # looking changed nothing


def test_a_task_whose_retry_wait_ends_without_its_work_queue_is_parked_not_dropped(vhost, kit_env, topology):
    # A wait queue dead-letters into the task exchange with the key the retry was published with.
    publish_raw(vhost, "gone", exchange=queues.RETRY_EXCHANGE, headers={queues.WAIT_HEADER: "1s"}, task_id="waited")
    wait_until(lambda: vhost.depth(UNROUTABLE) == 1, 15, "the expired retry in unroutable.dead")
    [row] = cli_json(kit_env, "list", "-q", "unroutable")
    assert (row["id"], row["reason"], row["routing_key"]) == ("waited", "unroutable", "gone")
    assert row["died_at"] is not None  # from its x-death (expired in tasks.wait.1s)


def test_the_kits_client_parks_a_task_whose_work_queue_was_deleted(vhost, kit_env, topology):
    conn = vhost.connection()
    conn.channel().queue_delete("default")
    conn.close()
    with Publisher() as publisher:
        task_id = publisher.publish("test.record", ["orphan"])  # confirmed: the alternate exchange took it
    [row] = cli_json(kit_env, "list", "-q", "unroutable")
    assert (row["id"], row["routing_key"], row["source_queue"]) == (task_id, "default", "default")
    assert row["died_at"] is not None  # the client's kit-enqueued-at


# -- plain Celery apps ------------------------------------------------------------------------------


def plain_app(url: str) -> Celery:
    """Another team's Celery app, configured with the kit's helper (no tasks of its own)."""
    app = Celery("plain", set_as_current=False)
    app.conf.update(publisher_settings(url))
    return app


def test_a_plain_celery_app_with_the_kits_settings_reaches_the_work_queues_and_misroutes_are_parked(
        vhost, kit_env, topology):
    app = plain_app(vhost.url)
    try:
        to_default = app.send_task("test.record", ["plain default"], queue="default").id
        misrouted = app.send_task("test.record", ["plain misrouted"], routing_key="high_priority").id
        urgent = app.send_task("emails.send", kwargs={"to": "a@example.com", "subject": "s", "body": "b"}).id
        with pytest.raises(QueueNotFound, match="'nightly' missing from task_queues"):
            app.send_task("test.record", ["never sent"], queue="nightly")
    finally:
        app.close()
    [default] = vhost.drain("default")
    assert (default.headers["id"], default.delivery_info["exchange"], default.delivery_info["routing_key"]) == (
        to_default, "tasks", "default")
    assert default.properties["priority"] == queues.PRIORITIES["normal"]
    assert default.properties["content_type"] == "application/json"
    assert [m.headers["id"] for m in vhost.drain("urgent")] == [urgent]  # the kit's routes: emails.* -> urgent
    assert vhost.depths(["bulk", UNROUTABLE]) == {"bulk": 0, UNROUTABLE: 1}
    [row] = cli_json(kit_env, "list", "--queue", "unroutable")
    assert (row["id"], row["task"], row["reason"], row["routing_key"]) == (
        misrouted, "test.record", "unroutable", "high_priority")


def test_a_plain_celery_app_that_declares_gets_rabbitmqs_406_which_the_readme_explains(vhost, topology):
    app = Celery("plain", broker=vhost.url, set_as_current=False)
    app.conf.broker_transport_options = {"confirm_publish": True}
    try:
        with pytest.raises(amqp.exceptions.PreconditionFailed) as info:
            app.send_task("test.record", ["x"], queue="default")
    finally:
        app.close()
    error = "inequivalent arg 'x-dead-letter-exchange' for queue 'default'"
    assert error in str(info.value)
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Publishing from another Celery app", 1)[1].split("\n## ", 1)[0]
    assert error in section and "publisher_settings" in section and "no_declare" in section


def test_plain_app_tasks_run_on_the_kits_workers_and_a_misrouted_one_runs_after_replay(
        vhost, kit_env, start_worker, tmp_path):
    kit_env["KIT_DECLARE_TOPOLOGY"] = "false"  # as least-privilege workers run: the topology is there already
    start_worker(queues=("default",), concurrency=1)
    app = plain_app(vhost.url)
    try:
        app.send_task("test.record", ["ran"], queue="default")
        misrouted = app.send_task("test.record", ["replayed"], routing_key="high_priority").id
    finally:
        app.close()
    wait_until(lambda: recorded(tmp_path, "done") == ["ran"], 30, "the plain app's task to run")
    assert "replayed 1" in ok(kit_env, "replay", "-q", "unroutable", "--to", "default", "--id", misrouted).stdout
    wait_until(lambda: recorded(tmp_path, "done") == ["ran", "replayed"], 30, "the replayed task to run")
    assert vhost.depths(["default", "default.dead", UNROUTABLE]) == {"default": 0, "default.dead": 0, UNROUTABLE: 0}


# -- replay, purge, export, import ------------------------------------------------------------------


def test_replay_returns_a_task_to_the_work_queue_its_key_names_and_refuses_the_others_without_to(
        vhost, kit_env, topology):
    conn = vhost.connection()
    conn.channel().queue_delete("bulk")  # for a while no queue is bound to "bulk"
    conn.close()
    lost_bulk = publish_raw(vhost, "bulk", priority=1)
    misrouted = publish_raw(vhost, "high_priority", priority=3)
    # bulk is still missing: the replay says so and moves nothing (it would only park them again).
    failing = run_cli(kit_env, "replay", "-q", "unroutable")
    assert failing.returncode == 1 and "work queue 'bulk' does not exist" in failing.stdout
    assert [m["routing_key"] for m in parked(vhost)] == ["bulk", "high_priority"]
    assert topology_cli(kit_env, "declare").returncode == 0  # bulk is back

    dry = run_cli(kit_env, "replay", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.strip().splitlines()[-1] == (
        "would replay 1, skipped 0, refused 1, failed 0 (dry run: nothing changed)")
    assert f"{lost_bulk}" in dry.stdout and "-> bulk" in dry.stdout
    assert "routing key 'high_priority': no work queue for its routing key; use --to QUEUE" in dry.stdout

    done = run_cli(kit_env, "replay")  # every dead-letter queue, unroutable.dead included
    assert done.returncode == 0 and "Traceback" not in done.stderr
    assert done.stdout.strip().splitlines()[-1] == "replayed 1, skipped 0, refused 1, failed 0"
    assert "have no work queue to go back to (routing key 'high_priority'" in done.stderr
    assert "--to QUEUE" in done.stderr
    [back] = vhost.drain("bulk")
    assert back.headers["id"] == lost_bulk and back.headers[h.REPLAYS] == 1 and back.headers["retries"] == 0
    assert back.properties["priority"] == 1
    assert [m["headers"]["id"] for m in parked(vhost)] == [misrouted]  # refused: still parked

    moved = run_cli(kit_env, "replay", "--queue", "unroutable", "--to", "default")
    assert moved.returncode == 0 and moved.stdout.strip() == "replayed 1, skipped 0, refused 0, failed 0"
    [message] = vhost.drain("default")
    assert message.headers["id"] == misrouted and message.properties["priority"] == 3
    assert message.delivery_info["routing_key"] == "default"
    assert vhost.depth(UNROUTABLE) == 0


def test_export_purge_and_import_keep_an_unroutable_task_and_its_routing_key(vhost, kit_env, topology, tmp_path):
    publish_raw(vhost, "high_priority", headers={"app-extra": {"n": 1, "raw": b"\x00\xff"}}, priority=2,
                message_id="m-1", app_id="billing")
    publish_raw(vhost, "reports.nightly", priority=0)
    before = parked(vhost)
    export = tmp_path / "unroutable.jsonl"
    ok(kit_env, "export", "-q", "unroutable", "-o", str(export))
    records = [json.loads(line) for line in export.read_text().splitlines()]
    assert [(r["queue"], r["routing_key"]) for r in records] == [(UNROUTABLE, "high_priority"),
                                                                 (UNROUTABLE, "reports.nightly")]
    archive = tmp_path / "purged.jsonl"
    assert ok(kit_env, "purge", "-q", "unroutable", "--yes", "--archive", str(archive)).stdout.startswith("purged 2")
    assert vhost.depth(UNROUTABLE) == 0
    assert ok(kit_env, "import", str(archive)).stdout.startswith("imported 2")
    after = parked(vhost)
    assert after == before  # body, headers, properties and routing key, in order
    rows = cli_json(kit_env, "list", "-q", "unroutable")
    assert [(r["routing_key"], r["reason"]) for r in rows] == [("high_priority", "unroutable"),
                                                               ("reports.nightly", "unroutable")]
    assert rows[0]["message"].startswith(explanation("high_priority"))  # still "on exchange 'tasks'"


# -- an older broker --------------------------------------------------------------------------------


def _old_task_exchange(vhost: Vhost) -> None:
    """The topology as it was before the alternate exchange: tasks without it, default holding a task."""
    conn = vhost.connection()
    try:
        channel = conn.channel()
        channel.exchange_declare("tasks", "direct", durable=True, auto_delete=False)
        default = queues.work_queue("default")
        channel.queue_declare("default", durable=True, auto_delete=False, arguments=dict(default.arguments))
        channel.queue_bind("default", "tasks", "default")
        channel.confirm_select()
        channel.basic_publish_confirm(amqp.Message(b"[[], {}, {}]", delivery_mode=2), "tasks", "default")
    finally:
        conn.close()


def test_verify_names_an_old_task_exchange_and_its_fix_keeps_the_queued_tasks(vhost, kit_env):
    _old_task_exchange(vhost)
    verified = topology_cli(kit_env, "verify")
    assert verified.returncode == 1 and "Traceback" not in verified.stderr
    [line] = [x for x in verified.stdout.splitlines() if "exchange 'tasks':" in x]
    assert line.startswith("drift: exchange 'tasks': alternate-exchange is unset on the broker, the code wants "
                           "tasks.unroutable. ")
    fix = f"`rabbitmqadmin -V {vhost.name} delete exchange name=tasks && python -m service topology declare`"
    assert fix in line and f"/api/exchanges/{vhost.name}/tasks" in line and "tasks.wait.*" in line
    declared = topology_cli(kit_env, "declare")
    assert declared.returncode == 2 and "Traceback" not in declared.stderr
    assert declared.stderr.startswith("error: exchange 'tasks' already exists on the broker with "
                                      "alternate-exchange=unset, but service/queues.py wants "
                                      "alternate-exchange=tasks.unroutable. ")
    assert fix in declared.stderr

    # The fix, as written: delete the exchange, declare again. The queued task stays; routing works again.
    management("DELETE", f"/api/exchanges/{quote(vhost.name, safe='')}/tasks")
    assert topology_cli(kit_env, "declare").returncode == 0
    conn = connect(load())
    try:
        assert verify(conn) == []
    finally:
        conn.release()
    assert vhost.depth("default") == 1
    publish_raw(vhost, "default")
    publish_raw(vhost, "high_priority")
    assert vhost.depths(["default", UNROUTABLE]) == {"default": 2, UNROUTABLE: 1}


def test_provision_names_an_old_task_exchange_that_rabbitmq_kept(vhost):
    _old_task_exchange(vhost)
    prefix = f"{vhost.name}-"
    defs = broker.definitions(vhost.name, {role: f"a-long-password-{role}" for role in broker.ROLES}, prefix)
    try:
        with pytest.raises(broker.ProvisioningError) as info:
            broker.provision(defs, MANAGEMENT_URL, ADMIN_USER, ADMIN_PASSWORD)
    finally:
        for role in broker.ROLES:
            management_delete(f"/api/users/{quote(broker.user_name(role, prefix), safe='')}")
    text = str(info.value)
    assert ("exchange 'tasks' has arguments {}, the kit wants {'alternate-exchange': 'tasks.unroutable'}"
            in text), text
    assert f"rabbitmqadmin -V {vhost.name} delete exchange name=tasks" in text
