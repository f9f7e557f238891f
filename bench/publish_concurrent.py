#!/usr/bin/env python
"""Benchmark: confirmed publishing the way web apps call it - many threads, asyncio - side by side.

Runs on the real broker (KIT_TEST_AMQP_HOST/PORT, management API at
KIT_TEST_MANAGEMENT_URL, as the test-suite does) in a fresh vhost with the
kit's topology, deleted at the end. Every method sends the same small JSON
task to the ``bulk`` work queue, persistent, each publish returning only once
the broker confirmed it, with the shipped defaults (task-sent events on for the
client and for Celery alike):

  celery_16_threads       16 threads calling Celery's ``app.send_task`` (confirm_publish=True,
                          task_send_sent_event=True; Celery's own producer pool).
  client_16_threads       16 threads calling ``publish()`` on one shared ``service.client.Publisher``.
  async_256_concurrent    256 concurrent ``await AsyncPublisher.publish()`` on one event loop.
  raw_pyamqp_1_thread     one thread, py-amqp alone: ``basic_publish_confirm`` per message, of the very
                          message the client builds (same body, headers and properties, mandatory):
                          what the protocol costs, so the ratio is the client's own overhead.
  client_1_thread         one thread calling ``Publisher.publish`` (events on).

Targets (issue 12): client_16_threads >= 3x celery_16_threads, async_256_concurrent
>= 3x celery_16_threads, client_1_thread >= 0.9x raw_pyamqp_1_thread.

Each round runs every method once: the concurrent ones, then the single-thread
ones, each group in an order rotated per round; the queue is
purged after every measurement and the purge count checks that every message
arrived, then the run rests ``--settle`` seconds: RabbitMQ deletes purged
persistent messages in the background, which otherwise slows whichever method
comes next. Medians over rounds are compared. The set-up's objects are frozen
out of the garbage collector before round 1 (``gc.freeze()``; ``--no-freeze``
leaves them in).

    python bench/publish_concurrent.py [--messages 3000] [--single 2000] [--rounds 7] [--no-freeze] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import amqp
import celery
import kombu
from common import clean_up, environment, print_methods, print_problems, print_ratios, ratio, rotated, summarize

from harness.broker import ADMIN_PASSWORD, ADMIN_USER, AMQP_HOST, AMQP_PORT, Vhost

QUEUE = "bulk"
TASK_NAME = "reports.bench_noop"
PRIORITY_NAME = "normal"
ARGS = [12345, "customer-export", {"format": "csv", "rows": 500}]
THREADS = 16
CONCURRENCY = 256

CELERY16 = "celery_16_threads"
CLIENT16 = "client_16_threads"
ASYNC256 = "async_256_concurrent"
RAW1 = "raw_pyamqp_1_thread"
CLIENT1 = "client_1_thread"

DESCRIPTIONS = {
    CELERY16: f"{THREADS} threads, Celery send_task, confirm_publish",
    CLIENT16: f"{THREADS} threads, one shared kit Publisher",
    ASYNC256: f"{CONCURRENCY} concurrent await AsyncPublisher.publish",
    RAW1: "1 thread, py-amqp basic_publish_confirm",
    CLIENT1: "1 thread, kit Publisher.publish",
}
TARGETS = {
    f"{CLIENT16}/{CELERY16}": 3.0,
    f"{ASYNC256}/{CELERY16}": 3.0,
    f"{CLIENT1}/{RAW1}": 0.9,
}


@dataclass
class Method:
    """One way of publishing: ``run(n)`` publishes n messages; ``single`` ones get the single-thread count."""

    name: str
    run: Callable[[int], None]
    close: Callable[[], None]
    single: bool = False
    rates: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)


def in_threads(threads: int, publish_one: Callable[[], None]) -> Callable[[int], None]:
    """``run(n)``: ``threads`` threads, started together, publish n messages in all."""

    def run(n: int) -> None:
        shares = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]
        start = threading.Barrier(threads + 1)
        errors: list[BaseException] = []

        def work(count: int) -> None:
            start.wait()
            try:
                for _ in range(count):
                    publish_one()
            except BaseException as exc:  # noqa: BLE001 - reported by the caller
                errors.append(exc)

        workers = [threading.Thread(target=work, args=(share,)) for share in shares]
        for worker in workers:
            worker.start()
        start.wait()
        for worker in workers:
            worker.join()
        if errors:
            raise errors[0]

    return run


def make_celery(url: str, queues_mod, celery_settings_mod) -> Method:
    from celery import Celery

    app = Celery("bench", set_as_current=False)
    app.conf.update(celery_settings_mod.publisher_settings(url))
    app.conf.update(task_ignore_result=True, task_send_sent_event=True)
    priority = queues_mod.resolve_priority(PRIORITY_NAME)

    def one() -> None:
        app.send_task(TASK_NAME, args=ARGS, queue=QUEUE, priority=priority)

    return Method(CELERY16, in_threads(THREADS, one), app.close)


def make_client(client_mod) -> tuple[Method, Method]:
    shared = client_mod.Publisher()
    alone = client_mod.Publisher()

    def one_shared() -> None:
        shared.publish(TASK_NAME, ARGS, priority=PRIORITY_NAME, queue=QUEUE)

    def run_alone(n: int) -> None:
        publish = alone.publish
        for _ in range(n):
            publish(TASK_NAME, ARGS, priority=PRIORITY_NAME, queue=QUEUE)

    return (Method(CLIENT16, in_threads(THREADS, one_shared), shared.close),
            Method(CLIENT1, run_alone, alone.close, single=True))


def make_async(async_mod) -> Method:
    loop = asyncio.new_event_loop()
    publisher = async_mod.AsyncPublisher()

    async def run_async(n: int) -> None:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one() -> None:
            async with gate:
                await publisher.publish(TASK_NAME, ARGS, priority=PRIORITY_NAME, queue=QUEUE)

        await asyncio.gather(*(one() for _ in range(n)))

    def close() -> None:
        loop.run_until_complete(publisher.close())
        loop.close()

    return Method(ASYNC256, lambda n: loop.run_until_complete(run_async(n)), close)


def make_raw(vhost_name: str, outgoing) -> Method:
    """py-amqp alone, sending the very message the client builds (body, headers, properties), confirmed one by one."""
    conn = amqp.Connection(
        f"{AMQP_HOST}:{AMQP_PORT}", userid=ADMIN_USER, password=ADMIN_PASSWORD, virtual_host=vhost_name
    )
    conn.connect()
    channel = conn.channel()
    channel.confirm_select()

    def run(n: int) -> None:
        publish = channel.basic_publish_confirm
        for _ in range(n):
            message = amqp.Message(outgoing.body, application_headers=outgoing.headers, **outgoing.properties)
            publish(message, exchange=outgoing.exchange, routing_key=outgoing.routing_key, mandatory=True)

    return Method(RAW1, run, conn.close, single=True)


def print_table(report: dict) -> None:
    cfg, env = report["config"], report["env"]
    print(f"Confirmed publishing as web apps call it: {cfg['messages']} msgs per concurrent method, "
          f"{cfg['single']} per single-thread method, x {cfg['rounds']} rounds, queue {QUEUE!r}, "
          f"body {cfg['body_bytes']} B, task-sent events on")
    print(f"RabbitMQ {env['rabbitmq']} | Python {env['python']} | celery {env['celery']} | kombu {env['kombu']} "
          f"| amqp {env['amqp']} | aio-pika {env['aio_pika']} | vhost {cfg['vhost']}")
    print(f"rest after each measurement {cfg['settle']:g}s; set-up objects frozen out of the GC: "
          f"{'no' if cfg['no_freeze'] else 'yes'}")
    print(f"{env['cpus']} CPUs, 1-min load average {env['loadavg_1m_before']} before the rounds, "
          f"{env['loadavg_1m_after']} after (the broker runs on this host too)")
    print()
    print_methods(report, DESCRIPTIONS, "order rotated per round")
    print_problems({name: p["failures"] + p["anomalies"] for name, p in report["problems"].items()})
    notes = {key: f"target >= {target:g}x: {'MET' if (report['ratios'][key] or 0) >= target else 'NOT MET'}"
             for key, target in TARGETS.items()}
    print_ratios(report["ratios"], notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Compare confirmed publishing from 16 threads, 256 coroutines and one thread: Celery, "
                    "raw py-amqp and the kit's clients.")
    parser.add_argument("--messages", type=int, default=3000,
                        help="messages per concurrent method per round (default 3000)")
    parser.add_argument("--single", type=int, default=2000,
                        help="messages per single-thread method per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; methods interleaved, order rotated (default 7)")
    parser.add_argument("--warmup", type=int, default=200, help="messages per method sent before timing (default 200)")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds of rest after each measurement, while the broker deletes what was purged, "
                             "so it does not slow the next method (default 1)")
    parser.add_argument("--no-freeze", action="store_true",
                        help="leave the set-up's objects to the garbage collector (see gc.freeze in the source)")
    parser.add_argument("--only", default="",
                        help=f"comma-separated methods to run (default all: {', '.join(DESCRIPTIONS)})")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    opts = parser.parse_args(argv)
    only = {name.strip() for name in opts.only.split(",") if name.strip()}
    if only - set(DESCRIPTIONS):
        parser.error(f"--only: unknown method(s) {', '.join(sorted(only - set(DESCRIPTIONS)))}")
    if opts.messages < THREADS or opts.single < 1 or opts.rounds < 1 or opts.warmup < 0:
        parser.error(f"--messages must be >= {THREADS}, --single and --rounds >= 1, --warmup >= 0")

    vhost = Vhost()
    methods: list[Method] = []
    admin: amqp.Connection | None = None
    try:
        os.environ["KIT_BROKER_URL"] = vhost.url
        import aio_pika

        from service import celery_settings as celery_settings_mod
        from service import client as client_mod
        from service import queues as queues_mod
        from service.settings import load
        from service.topology import declare_on

        settings = load()
        declare_on(settings)
        _, outgoing = client_mod.build_message(
            client_mod.TaskRequest(TASK_NAME, ARGS, priority=PRIORITY_NAME, queue=QUEUE), settings.max_payload_bytes)
        admin = vhost.connection()
        admin_channel = admin.channel()

        def purge() -> int:
            return admin_channel.queue_purge(QUEUE) or 0

        methods.append(make_celery(vhost.url, queues_mod, celery_settings_mod))
        methods.extend(make_client(client_mod))
        try:
            from service import async_client as async_mod
        except ImportError as exc:
            print(f"the asyncio client is not importable ({exc}): {ASYNC256} is left out", file=sys.stderr)
        else:
            methods.append(make_async(async_mod))
        methods.append(make_raw(vhost.name, outgoing))

        if only:
            for method in [m for m in methods if m.name not in only]:
                method.close()
            methods = [m for m in methods if m.name in only]
        for method in methods:
            try:
                if opts.warmup:
                    method.run(max(opts.warmup, THREADS))
            except Exception as exc:  # noqa: BLE001 - reported like a failed round
                method.failures.append(f"warm-up: {type(exc).__name__}: {exc}")
        purge()
        if not opts.no_freeze:
            # The set-up's objects (three clients' libraries in one process) leave the collector's
            # walk, as a preloaded web app does with gc.freeze(): else a full collection of that heap
            # lands on whichever method allocates most in that moment.
            gc.collect()
            gc.freeze()
        load_before = os.getloadavg()

        rounds: list[dict[str, float | None]] = []
        for r in range(opts.rounds):
            this_round: dict[str, float | None] = {}
            concurrent = [m for m in methods if not m.single]
            alone = [m for m in methods if m.single]
            # The two groups apart, each rotated: a single-thread method always follows a rest and,
            # every other round, its counterpart, never a burst of 3,000 messages.
            for method in rotated(concurrent, r) + rotated(alone, r):
                count = opts.single if method.single else opts.messages
                start = time.perf_counter()
                try:
                    method.run(count)
                except Exception as exc:  # noqa: BLE001 - a failing method is reported, the others still run
                    method.failures.append(f"round {r + 1}: {type(exc).__name__} after "
                                           f"{time.perf_counter() - start:.1f}s ({purge()} of {count} arrived): {exc}")
                    this_round[method.name] = None
                    continue
                rate = count / (time.perf_counter() - start)
                arrived = purge()
                time.sleep(opts.settle)  # the broker deletes the purged messages in the background
                if arrived != count:
                    method.anomalies.append(f"round {r + 1}: {arrived} messages in {QUEUE!r} for {count} sent")
                method.rates.append(rate)
                this_round[method.name] = rate
                if not opts.json:
                    print(f"  round {r + 1}/{opts.rounds} {method.name:<22} {rate:>10,.0f} msg/s", file=sys.stderr)
            rounds.append(this_round)

        summary = {m.name: summarize(m.rates) for m in methods if m.rates}
        ratios = {
            f"{CLIENT16}/{CELERY16}": ratio(summary, CLIENT16, CELERY16),
            f"{ASYNC256}/{CELERY16}": ratio(summary, ASYNC256, CELERY16),
            f"{CLIENT1}/{RAW1}": ratio(summary, CLIENT1, RAW1),
            f"{CLIENT16}/{CLIENT1}": ratio(summary, CLIENT16, CLIENT1),
        }
        report = {
            "config": {"messages": opts.messages, "single": opts.single, "rounds": opts.rounds,
                       "warmup": opts.warmup, "queue": QUEUE, "body_bytes": len(outgoing.body),
                       "vhost": vhost.name, "threads": THREADS, "concurrency": CONCURRENCY,
                       "settle": opts.settle, "no_freeze": opts.no_freeze},
            "env": environment(load_before, celery=celery.__version__, kombu=kombu.__version__,
                               amqp=amqp.__version__, aio_pika=aio_pika.__version__),
            "rounds": rounds,
            "summary": summary,
            "ratios": ratios,
            "problems": {m.name: {"failures": m.failures, "anomalies": m.anomalies}
                         for m in methods if m.failures or m.anomalies},
            "targets": {key: {"min": target, "met": (ratios[key] or 0) >= target} for key, target in TARGETS.items()},
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
