"""End-to-end: real RabbitMQ, workers, celery-exporter, Prometheus and Alertmanager.

The production rule files and Alertmanager routes are the ones under test.
Only intervals and durations are shortened, through the documented overrides:
``service.monitoring.timescale.write_drill_config`` (rule ``for:`` durations
and PromQL windows times DRILL_FACTOR, 1 s scrape/evaluation) and
``service.monitoring.alertmanager_config.write`` (1 s group_wait/interval,
loopback receivers). Each drill prints its time to notification.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import amqp
import pytest

from service import queues
from service.client import Publisher, TaskRequest
from service.monitoring import alertmanager_config, timescale
from service.settings import load
from service.stack import VHOST_TARGET_LABEL
from service.topology import declare_on
from tests.helpers import REPO, Vhost, Worker, wait_until
from tests.observability import Exporter, Process, Prometheus, WebhookReceiver, free_port

#: A real stack on the broker: workers, Prometheus, Alertmanager (module fixture, not `vhost`).
pytestmark = pytest.mark.broker

# celery-exporter answers a scrape in about 2 s (it asks the workers over the
# broker), so drills scrape every 3 s and no window gets shorter than 2 scrapes.
DRILL_FACTOR = 0.04  # 5m -> 12s, 10m -> 24s, 15m -> 36s
DRILL_FLOOR = "6s"
DASHBOARDS = sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))
WORK_QUEUES = list(queues.WORK_QUEUE_NAMES)
DEAD_QUEUES = list(queues.DEAD_LETTER_QUEUE_NAMES)


class Stack:
    """The observed stack of one test module."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.vhost = Vhost()
        self.closers: list[Any] = []
        self.receiver = WebhookReceiver()
        self.closers.append(self.receiver)
        self.env = dict(os.environ)
        self.env.update({
            "KIT_BROKER_URL": self.vhost.url, "KIT_TASK_MODULES": "tests.worker_tasks",
            "KIT_TEST_OUTPUT_DIR": str(workdir), "KIT_STATE_DIR": str(workdir / "state"),
            "KIT_RETRY_BACKOFF_BASE": "0.2", "KIT_RETRY_BACKOFF_MAX": "1", "KIT_MAX_RETRIES": "2",
            "PYTHONPATH": str(REPO),
        })
        os.environ["KIT_BROKER_URL"] = self.vhost.url
        declare_on(load())
        self.workers: dict[str, Worker] = {}
        self.metrics_ports = {"urgent": free_port(), "default": free_port()}
        self.start_worker("urgent")
        self.start_worker("default")
        self.exporter = Exporter(self.vhost.url, WORK_QUEUES + DEAD_QUEUES, workdir)
        self.closers.append(self.exporter)
        self.exporter.wait_ready()
        self.alertmanager_port = free_port()
        secrets = workdir / "secrets"
        secrets.mkdir()
        for name in ("alertmanager_slack_api_url", "alertmanager_pagerduty_routing_key",
                     "alertmanager_webhook_token", "alertmanager_smtp_password"):
            (secrets / name).write_text(f"{self.receiver.url}/slack" if "slack" in name else "drill")
        am_config = alertmanager_config.write(
            workdir / "alertmanager.yml", secrets_dir=secrets, smtp_smarthost="127.0.0.1:9",
            smtp_require_tls=False, pagerduty_url=f"{self.receiver.url}/pagerduty",
            webhook_url=f"{self.receiver.url}/webhook", group_wait="1s", group_interval="1s",
        )
        self.alertmanager = Process("alertmanager", [
            "prometheus-alertmanager", f"--config.file={am_config}", f"--storage.path={workdir / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{self.alertmanager_port}", "--cluster.listen-address=",
        ], workdir)
        self.closers.append(self.alertmanager)
        prom_config = timescale.write_drill_config(
            REPO / "deploy" / "prometheus" / "prometheus.yml", workdir / "prometheus", factor=DRILL_FACTOR,
            floor=DRILL_FLOOR, scrape_interval="3s", evaluation_interval="1s",
            targets={
                "targets/kit-workers.json": [{"targets": [f"127.0.0.1:{p}" for p in self.metrics_ports.values()]}],
                "targets/celery-exporter.json": [{"targets": [f"127.0.0.1:{self.exporter.port}"]}],
                "targets/alertmanager.json": [{"targets": [f"127.0.0.1:{self.alertmanager_port}"]}],
                "targets/rabbitmq.json": _rabbitmq_targets(self.vhost.name),
            },
        )
        self.prometheus = Prometheus(prom_config, workdir)
        self.closers.append(self.prometheus)
        self.prometheus.wait_ready()

    def start_worker(self, queue: str) -> Worker:
        names = ["urgent"] if queue == "urgent" else ["default", "bulk"]
        env = dict(self.env, KIT_METRICS_PORT=str(self.metrics_ports[queue]))
        worker = Worker(env, queues=names, concurrency=2)
        self.workers[queue] = worker
        worker.wait_ready(self.vhost)
        return worker

    def notified(self, alertname: str, status: str = "firing", since: float = 0.0,
                 queue: str | None = None) -> float | None:
        """Monotonic time of the first webhook notification carrying ``alertname`` in ``status``."""
        for at, path, payload in self.receiver.received:
            if path != "/webhook" or at < since or not isinstance(payload, dict):
                continue
            for alert in payload.get("alerts", []):
                labels = alert.get("labels", {})
                if (labels.get("alertname") == alertname and alert.get("status") == status
                        and (queue is None or labels.get("queue") == queue)):
                    return at
        return None

    def close(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        for closer in reversed(self.closers):
            try:
                closer.close()
            except Exception:  # noqa: BLE001 - tear everything down regardless
                pass
        self.vhost.delete()


def _rabbitmq_targets(vhost: str) -> list[dict[str, Any]]:
    """The production RabbitMQ targets, scraping the drill's vhost (as the local stack's --vhost does).

    A shared broker's other vhosts then cannot hold an alert open: prometheus.yml
    keeps only the kit_vhost's queues. The filter is production's, not the drill's.
    """
    groups = json.loads((REPO / "deploy/prometheus/targets/rabbitmq.json").read_text())
    for group in groups:
        group["labels"][VHOST_TARGET_LABEL] = vhost
    return groups


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    saved = os.environ.get("KIT_BROKER_URL")
    observed = Stack(tmp_path_factory.mktemp("observed"))
    try:
        yield observed
    finally:
        observed.close()
        if saved is None:
            os.environ.pop("KIT_BROKER_URL", None)
        else:
            os.environ["KIT_BROKER_URL"] = saved


def _wait_notified(stack: Stack, alertname: str, since: float, timeout: float, status: str = "firing",
                   queue: str | None = None) -> float:
    at = wait_until(lambda: stack.notified(alertname, status, since, queue), timeout,
                    f"a {status} {alertname} notification at the webhook", interval=0.2)
    elapsed = at - since
    print(f"\nDRILL {alertname} {status}: {elapsed:.1f}s to notification")
    return elapsed


def test_every_target_is_up(stack: Stack) -> None:
    wait_until(lambda: all(stack.prometheus.targets_up().get(job) for job in
                           ("rabbitmq", "celery-exporter", "kit-workers")), 60, "every scrape target up")


def test_queues_of_other_vhosts_are_not_scraped(stack: Stack) -> None:
    """A broker shared with other vhosts: their queues stay out; node-wide series stay in."""
    other = Vhost()
    try:
        conn = other.connection()
        channel = conn.channel()
        channel.queue_declare("default", durable=True)
        channel.basic_publish(amqp.Message(b"x"), routing_key="default")
        conn.close()
        declared = time.time()
        own = f'timestamp(rabbitmq_queue_messages_ready{{vhost="{stack.vhost.name}",queue="default"}})'
        wait_until(lambda: any(float(r["value"][1]) > declared + 1 for r in stack.prometheus.query(own)),
                   30, "a scrape of RabbitMQ after the other vhost's queue was declared", interval=0.5)
        assert stack.prometheus.query(f'rabbitmq_queue_messages_ready{{vhost="{other.name}"}}') == []
        assert stack.prometheus.query('{job="rabbitmq", kit_vhost!="", __name__!~"up|scrape_.*"}') == [], (
            "the filter's label is dropped from the scraped series")
        assert stack.prometheus.query("rabbitmq_process_resident_memory_bytes"), "node-wide series are kept"
        assert stack.prometheus.query("rabbitmq_alarms_memory_used_watermark"), "alarm series are kept"
    finally:
        other.delete()


def test_drill_all_workers_of_a_queue_killed(stack: Stack) -> None:
    started = time.monotonic()
    stack.workers["urgent"].kill()
    _wait_notified(stack, "CeleryQueueNoConsumers", started, 90, queue="urgent")
    # The killed node's own endpoint is gone too (celery-exporter names workers by
    # host only, so with another worker on this host celery_worker_up stays 1).
    _wait_notified(stack, "CeleryWorkerMetricsDown", started, 90)
    recovered = time.monotonic()
    stack.start_worker("urgent")
    _wait_notified(stack, "CeleryQueueNoConsumers", recovered, 90, status="resolved", queue="urgent")


def test_drill_tasks_failing(stack: Stack) -> None:
    started = time.monotonic()
    with Publisher() as publisher:
        def failing_traffic() -> float | None:
            publisher.publish_many([TaskRequest("test.permanent", [f"f{time.time()}"]),
                                    TaskRequest("test.record", ["ok"])])
            return stack.notified("CeleryTaskFailureRateHigh", "firing", started)
        at = wait_until(failing_traffic, 120, "a failure-rate notification", interval=0.5)
    print(f"\nDRILL CeleryTaskFailureRateHigh firing: {at - started:.1f}s to notification")
    recovered = time.monotonic()
    _wait_notified(stack, "CeleryTaskFailureRateHigh", recovered, 120, status="resolved")


def test_drill_backlog(stack: Stack) -> None:
    threshold = 1000  # CeleryQueueBacklogHigh on the default queue
    stack.workers["default"].stop()
    started = time.monotonic()
    with Publisher() as publisher:
        publisher.publish_many(TaskRequest("test.record", [f"b{i}"], queue="default") for i in range(threshold + 200))
    _wait_notified(stack, "CeleryQueueBacklogHigh", started, 90, queue="default")
    recovered = time.monotonic()
    conn = stack.vhost.connection()
    conn.channel().queue_purge("default")
    conn.close()
    stack.start_worker("default")
    _wait_notified(stack, "CeleryQueueBacklogHigh", recovered, 90, status="resolved", queue="default")


def test_drill_dead_letter(stack: Stack) -> None:
    started = time.monotonic()
    with Publisher() as publisher:
        publisher.publish("test.permanent", ["drill"], queue="bulk")
    _wait_notified(stack, "DeadLetterQueueGrowing", started, 90)
    _wait_notified(stack, "DeadLetterQueueGrowing", time.monotonic(), 120, status="resolved")


def _dashboard_queries() -> list[tuple[str, str, str]]:
    """Every panel query, but those over quorum-queue-only series (rabbitmq_raft_*): this stack is one
    node with classic queues, where they cannot have data; tests/test_cluster_alerts.py runs every
    broker dashboard query on the 3-node cluster instead."""
    found = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                if "rabbitmq_raft_" not in target["expr"]:
                    found.append((path.name, panel["title"], target["expr"]))
    return found


def test_every_dashboard_query_parses_and_returns_data(stack: Stack) -> None:
    """Grafana cannot run here: every panel's query runs on the live Prometheus instead."""
    queries = _dashboard_queries()
    assert len(queries) >= 20
    with Publisher() as publisher:  # some of everything: successes, retries, dead letters
        publisher.publish_many([TaskRequest("test.record", [f"d{i}"], queue=q) for i in range(20) for q in WORK_QUEUES])
        publisher.publish_many([TaskRequest("test.flaky", [f"r{i}", 1]) for i in range(5)])
        publisher.publish_many([TaskRequest("test.permanent", [f"p{i}"]) for i in range(3)])
    pending = {q for q in queries}

    def all_answered() -> bool:
        for item in list(pending):
            expr = item[2].replace("$__rate_interval", "1m")
            if stack.prometheus.query(expr):
                pending.discard(item)
        return not pending

    try:
        wait_until(all_answered, 90, "every dashboard query to return data", interval=1)
    except AssertionError:
        raise AssertionError("queries without data:\n" + "\n".join(f"{d} / {t}: {e}" for d, t, e in pending)) from None
