#!/usr/bin/env python
"""Benchmark: confirmed publishing of persistent task messages, side by side.

Runs on the real broker (KIT_TEST_AMQP_HOST/PORT, management API at
KIT_TEST_MANAGEMENT_URL, as the test-suite does) in a fresh vhost that it creates
with the kit's topology declared, and deletes at the end. Methods compared, all
sending the same small JSON argument list to the ``bulk`` work queue, priority 1,
persistent (delivery_mode 2), each publish waiting for the broker's confirm:

  celery_confirmed        Celery's ``app.send_task(..., queue="bulk", priority=1)`` with
                          ``broker_transport_options={"confirm_publish": True}``, and
                          ``task_send_sent_event`` as the client's KIT_SEND_SENT_EVENTS
                          (default on), so both send the same unconfirmed task-sent
                          event per task or neither does.
  raw_pyamqp_confirm_each py-amqp alone: ``channel.basic_publish_confirm(...)`` per message.
  client_publish          ``service.client.Publisher().publish(...)`` per message.
  client_publish_many     ``Publisher.publish_many([TaskRequest, ...])`` (windowed confirms).

Each round runs every method once, in an order rotated per round; the ``bulk``
queue is purged after every measurement (the purge count also checks that every
message was routed). Connections are opened and a few messages sent before
round 1 so connecting is not timed.

    python bench/publish_confirmed.py [--messages 2000] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import amqp
import celery
import kombu
from common import clean_up, environment, print_methods, print_problems, print_ratios, ratio, rotated, summarize
from kombu import Exchange, Queue

from harness.broker import ADMIN_PASSWORD, ADMIN_USER, AMQP_HOST, AMQP_PORT, Vhost

QUEUE = "bulk"
TASK_NAME = "reports.bench_noop"
PRIORITY_NAME = "normal"
ARGS = [12345, "customer-export", {"format": "csv", "rows": 500}]
TARGET_RATIO = 5.0

CELERY = "celery_confirmed"
RAW = "raw_pyamqp_confirm_each"
CLIENT = "client_publish"
CLIENT_MANY = "client_publish_many"

DESCRIPTIONS = {
    CELERY: "Celery app.send_task, confirm_publish=True",
    RAW: "py-amqp basic_publish_confirm per message",
    CLIENT: "kit Publisher.publish per message",
    CLIENT_MANY: "kit Publisher.publish_many (windowed)",
}


@dataclass
class Method:
    """One way of publishing: set up once, then ``run(n)`` publishes n messages."""

    name: str
    run: Callable[[int], None]
    close: Callable[[], None]
    rates: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)


def make_celery(url: str, queues_mod, sent_events: bool) -> Method:
    from celery import Celery

    bulk = queues_mod.work_queue(QUEUE)
    app = Celery("bench", set_as_current=False)
    app.conf.update(
        broker_url=url,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"confirm_publish": True},
        # The same queue definition as the kit, so Celery's own (cached) declare
        # of the destination queue is accepted by the broker.
        task_queues=[
            Queue(
                bulk.name,
                Exchange(bulk.exchange, type="direct", durable=True,
                         arguments=dict(queues_mod.exchange(bulk.exchange).arguments)),
                routing_key=bulk.binding_key,
                queue_arguments=dict(bulk.arguments),
                durable=True,
            )
        ],
        task_default_queue=bulk.name,
        task_create_missing_queues=False,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_send_sent_event=sent_events,  # as the client does: the same messages per task
    )
    priority = queues_mod.resolve_priority(PRIORITY_NAME)

    def run(n: int) -> None:
        send_task = app.send_task
        for _ in range(n):
            send_task(TASK_NAME, args=ARGS, queue=QUEUE, priority=priority)

    return Method(CELERY, run, app.close)


def make_raw(vhost_name: str, body: bytes, priority: int) -> Method:
    conn = amqp.Connection(
        f"{AMQP_HOST}:{AMQP_PORT}", userid=ADMIN_USER, password=ADMIN_PASSWORD, virtual_host=vhost_name
    )
    conn.connect()
    channel = conn.channel()
    channel.confirm_select()

    def run(n: int) -> None:
        publish = channel.basic_publish_confirm
        for _ in range(n):
            message = amqp.Message(body, delivery_mode=2, content_type="application/json", priority=priority)
            publish(message, exchange="tasks", routing_key=QUEUE)

    return Method(RAW, run, conn.close)


def make_client(client_mod) -> tuple[Method, Method]:
    publisher = client_mod.Publisher()
    many_publisher = client_mod.Publisher()

    def run_each(n: int) -> None:
        publish = publisher.publish
        for _ in range(n):
            publish(TASK_NAME, ARGS, priority=PRIORITY_NAME, queue=QUEUE)

    def run_many(n: int) -> None:
        # Building the requests is part of the caller's cost, so it is timed too.
        requests = [client_mod.TaskRequest(TASK_NAME, ARGS, priority=PRIORITY_NAME, queue=QUEUE) for _ in range(n)]
        many_publisher.publish_many(requests)

    return Method(CLIENT, run_each, publisher.close), Method(CLIENT_MANY, run_many, many_publisher.close)


def print_table(report: dict) -> None:
    cfg = report["config"]
    print(
        f"Confirmed publishing of persistent messages: {cfg['messages']} msgs x {cfg['rounds']} rounds per method, "
        f"queue {QUEUE!r}, priority 1, body {cfg['body_bytes']} B"
    )
    print(
        f"RabbitMQ {report['env']['rabbitmq']} | Python {report['env']['python']} | celery {report['env']['celery']} "
        f"| kombu {report['env']['kombu']} | amqp {report['env']['amqp']} | vhost {cfg['vhost']}"
    )
    print(
        f"task-sent events (KIT_SEND_SENT_EVENTS, the client and Celery alike): "
        f"{'on' if cfg['client_sent_events'] else 'off'}"
    )
    print(
        f"{report['env']['cpus']} CPUs, 1-min load average {report['env']['loadavg_1m_before']} before the rounds, "
        f"{report['env']['loadavg_1m_after']} after (the broker runs on this host too)"
    )
    print()
    print_methods(report, DESCRIPTIONS, "order rotated per round")
    print_problems({name: p["failures"] + p["anomalies"] for name, p in report["problems"].items()})
    met = (report["ratios"][f"{CLIENT_MANY}/{CELERY}"] or 0) >= TARGET_RATIO
    print_ratios(report["ratios"], {
        f"{CLIENT_MANY}/{CELERY}": f"target >= {TARGET_RATIO:g}x: {'MET' if met else 'NOT MET'}",
        f"{CLIENT}/{CELERY}": "(one publish at a time: bounded by the broker's per-message confirm, see raw)",
    })


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Compare confirmed publishing throughput: Celery send_task vs raw py-amqp vs the kit's client."
    )
    parser.add_argument("--messages", type=int, default=2000, help="messages per method per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; methods interleaved, order rotated (default 5)")
    parser.add_argument("--warmup", type=int, default=100, help="messages per method sent before timing (default 100)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    opts = parser.parse_args(argv)
    if opts.messages < 1 or opts.rounds < 1 or opts.warmup < 0:
        parser.error("--messages and --rounds must be >= 1, --warmup >= 0")

    vhost = Vhost()
    methods: list[Method] = []
    admin: amqp.Connection | None = None
    try:
        os.environ["KIT_BROKER_URL"] = vhost.url
        from service import client as client_mod
        from service import queues as queues_mod
        from service.settings import load
        from service.topology import declare_on

        settings = load()
        declare_on(settings)

        _, outgoing = client_mod.build_message(
            client_mod.TaskRequest(TASK_NAME, ARGS, priority=PRIORITY_NAME, queue=QUEUE), settings.max_payload_bytes
        )
        body = outgoing.body  # the same body bytes (args, kwargs, embed) for the raw baseline
        priority = queues_mod.resolve_priority(PRIORITY_NAME)

        admin = vhost.connection()
        admin_channel = admin.channel()

        def purge() -> int:
            return admin_channel.queue_purge(QUEUE) or 0

        methods.append(make_celery(vhost.url, queues_mod, settings.send_sent_events))
        methods.append(make_raw(vhost.name, body, priority))
        methods.extend(make_client(client_mod))

        if opts.warmup:
            for method in methods:
                try:
                    method.run(opts.warmup)
                except Exception as exc:  # noqa: BLE001 - reported like a failed round
                    method.failures.append(f"warm-up: {type(exc).__name__}: {exc}")
            purge()
        load_before = os.getloadavg()

        rounds: list[dict[str, float | None]] = []
        for r in range(opts.rounds):
            order = rotated(methods, r)
            this_round: dict[str, float | None] = {}
            for method in order:
                start = time.perf_counter()
                try:
                    method.run(opts.messages)
                except Exception as exc:  # noqa: BLE001 - a failing method is reported, the others still run
                    elapsed = time.perf_counter() - start
                    queued = purge()
                    method.failures.append(
                        f"round {r + 1}: {type(exc).__name__} after {elapsed:.1f}s "
                        f"({queued} of {opts.messages} messages had reached {QUEUE!r}): {exc}"
                    )
                    this_round[method.name] = None
                    if not opts.json:
                        print(f"  round {r + 1}/{opts.rounds} {method.name:<25} FAILED: {exc}", file=sys.stderr)
                    continue
                elapsed = time.perf_counter() - start
                routed = purge()
                if routed != opts.messages:
                    method.anomalies.append(f"round {r + 1}: {routed} messages in {QUEUE!r} for {opts.messages} sent")
                rate = opts.messages / elapsed
                method.rates.append(rate)
                this_round[method.name] = rate
                if not opts.json:
                    print(f"  round {r + 1}/{opts.rounds} {method.name:<25} {rate:>10,.0f} msg/s", file=sys.stderr)
            rounds.append(this_round)

        summary = {m.name: summarize(m.rates) for m in methods if m.rates}
        problems = {
            m.name: {"failures": m.failures, "anomalies": m.anomalies} for m in methods if m.failures or m.anomalies
        }
        ratios = {
            f"{CLIENT}/{CELERY}": ratio(summary, CLIENT, CELERY),
            f"{CLIENT}/{RAW}": ratio(summary, CLIENT, RAW),
            f"{RAW}/{CELERY}": ratio(summary, RAW, CELERY),
            f"{CLIENT_MANY}/{CELERY}": ratio(summary, CLIENT_MANY, CELERY),
            f"{CLIENT_MANY}/{RAW}": ratio(summary, CLIENT_MANY, RAW),
            f"{CLIENT_MANY}/{CLIENT}": ratio(summary, CLIENT_MANY, CLIENT),
        }
        report = {
            "config": {
                "messages": opts.messages,
                "rounds": opts.rounds,
                "warmup": opts.warmup,
                "queue": QUEUE,
                "task": TASK_NAME,
                "args": ARGS,
                "body_bytes": len(body),
                "vhost": vhost.name,
                "client_sent_events": settings.send_sent_events,
                "celery_task_send_sent_event": settings.send_sent_events,
            },
            "env": environment(load_before, celery=celery.__version__, kombu=kombu.__version__, amqp=amqp.__version__),
            "rounds": rounds,
            "summary": summary,
            "ratios": ratios,
            "problems": problems,
            "target": {
                "ratio": f"{CLIENT_MANY}/{CELERY}",
                "min": TARGET_RATIO,
                "met": (ratios[f"{CLIENT_MANY}/{CELERY}"] or 0) >= TARGET_RATIO,
            },
        }
        if opts.json:
            print(json.dumps(report, indent=2))
        else:
            print_table(report)
        return 0
    finally:
        clean_up([m.close for m in methods] + ([admin.close] if admin is not None else []), vhost)


if __name__ == "__main__":
    sys.exit(main())
