#!/usr/bin/env python
"""Benchmark: replaying dead letters with the kit, next to raw py-amqp loops.

Runs on the real broker (KIT_TEST_AMQP_HOST/PORT, management API at
KIT_TEST_MANAGEMENT_URL, as the test-suite does) in a fresh vhost that it creates
with the kit's topology declared, and deletes at the end. Before every
measurement ``default.dead`` is seeded (untimed) with N persistent dead letters
that look like the worker's: Celery protocol-2 headers plus the kit's
``kit-reason``, ``kit-exception-type``, ``kit-source-queue=default``,
``kit-dead-lettered-at`` ..., a ~200 byte JSON body, priorities 0-3. Each method
then moves all of them back to the ``default`` work queue:

  kit_replay              ``service.deadletters.replay(conn, settings, "default.dead", Filters())``
                          (consume without ack, republish in confirmed windows of
                          REPLAY_WINDOW, then ack the window).
  raw_pyamqp_confirm_each py-amqp alone, the simplest safe loop: basic_consume with
                          manual ack; per message ``basic_publish_confirm`` to
                          exchange ``tasks``, key ``default``, then ``basic_ack``.
  raw_pyamqp_windowed     py-amqp alone, windowed confirms: publish a window
                          (--window, default REPLAY_WINDOW), wait for all its
                          confirms, then ack the window (one ``multiple`` ack).
                          The fair comparison for the kit's windowed replay.

Every measurement is checked: ``default.dead`` must be empty and ``default``
must hold N messages (then it is purged). Each round runs every method once,
in an order rotated per round.

    python bench/replay.py [--messages 10000] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import amqp
import kombu
from common import environment, print_methods, print_problems, print_ratios, ratio, rotated, summarize

from harness.broker import Vhost, management

WORK_QUEUE = "default"
DEAD_QUEUE = "default.dead"
DEAD_EXCHANGE = "tasks.dead"
TASK_EXCHANGE = "tasks"
TARGET_RATIO = 0.5
TASK_NAMES = ("webhooks.deliver", "webhooks.retry_hook", "billing.sync_invoice", "crm.push_contact")
EXCEPTIONS = ("requests.exceptions.ConnectionError", "smtplib.SMTPDataError", "ValueError", "TimeoutError")
REASONS = ("retries-exhausted", "permanent-error", "time-limit", "worker-lost")

KIT = "kit_replay"
KIT_BATCH = "kit_replay_batch"
RAW_EACH = "raw_pyamqp_confirm_each"
RAW_WINDOWED = "raw_pyamqp_windowed"

DESCRIPTIONS = {
    KIT: "service.deadletters.replay, default: confirm each (a kill duplicates <= 1)",
    KIT_BATCH: "service.deadletters.replay(batch=window), `dlq replay --batch N`",
    RAW_EACH: "py-amqp consume, publish_confirm, ack per message",
    RAW_WINDOWED: "py-amqp consume, publish window, confirms, ack window",
}


class BenchError(Exception):
    """A measurement did not do what it should (wrong counts, nacks, timeouts)."""


@dataclass
class Method:
    """One way of replaying: ``measure(n)`` moves n seeded dead letters and returns the seconds it took."""

    name: str
    measure: Callable[[int], float]
    rates: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


# -- seeding ---------------------------------------------------------------------------------


def dead_letter(i: int, now: datetime) -> tuple[bytes, dict]:
    """Body and properties of one dead letter, as the kit's worker would have left it."""
    task_id = str(uuid.uuid4())
    task = TASK_NAMES[i % len(TASK_NAMES)]
    args = [i, f"https://hooks.example.com/endpoint/{i % 97}", {"event": "invoice.paid", "attempt": 6}]
    kwargs = {"timeout": 30, "request_id": f"req-{i:08d}"}
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    body = json.dumps([args, kwargs, embed])  # Celery protocol 2, about 200 bytes
    died = (now - timedelta(seconds=i)).isoformat(timespec="milliseconds")
    headers = {
        "lang": "py",
        "task": task,
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "eta": None,
        "expires": None,
        "retries": 5,
        "timelimit": [None, None],
        "argsrepr": repr(args)[:60],
        "kwargsrepr": repr(kwargs),
        "origin": "gen4242@bench-host",
        "kit-reason": REASONS[i % len(REASONS)],
        "kit-exception-type": EXCEPTIONS[i % len(EXCEPTIONS)],
        "kit-exception-message": "connection refused by hooks.example.com:443",
        "kit-attempts": 6,
        "kit-source-queue": WORK_QUEUE,
        "kit-dead-lettered-at": died,
    }
    properties = {
        "application_headers": headers,
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "correlation_id": task_id,
        "delivery_mode": 2,
        "priority": i % 4,
    }
    return body.encode(), properties


class Seeder:
    """Fills ``default.dead`` through ``tasks.dead`` quickly: no per-message confirm, one wait per chunk."""

    CHUNK = 1000

    def __init__(self, vhost: Vhost) -> None:
        self.conn = vhost.connection()
        self.channel = self.conn.channel()
        self.channel.confirm_select()
        self.confirms = Confirms(self.channel)
        self.admin = self.conn.channel()

    def seed(self, n: int) -> tuple[int, int]:
        """Seed n dead letters; returns (body bytes, header count) of the first, for the report."""
        if self.depth(DEAD_QUEUE) or self.depth(WORK_QUEUE):
            raise BenchError(f"queues not empty before seeding: {self.depths()}")
        now = datetime.now(UTC)
        sample = (0, 0)
        for start in range(0, n, self.CHUNK):
            last = 0
            for i in range(start, min(start + self.CHUNK, n)):
                body, properties = dead_letter(i, now)
                if i == 0:
                    sample = (len(body), len(properties["application_headers"]))
                self.channel.basic_publish(amqp.Message(body, **properties), DEAD_EXCHANGE, WORK_QUEUE,
                                           mandatory=True)
                last = self.confirms.sent()
            self.confirms.wait(last, timeout=30)
        if self.depth(DEAD_QUEUE) != n:
            raise BenchError(f"seeded {n} but {DEAD_QUEUE!r} holds {self.depth(DEAD_QUEUE)}")
        return sample

    def depth(self, queue: str) -> int:
        return self.admin.queue_declare(queue, passive=True)[1]

    def depths(self) -> dict[str, int]:
        return {q: self.depth(q) for q in (DEAD_QUEUE, WORK_QUEUE)}

    def purge(self, queue: str) -> int:
        return self.admin.queue_purge(queue) or 0

    def close(self) -> None:
        self.conn.close()


class Confirms:
    """Publisher-confirm tracking for one channel in O(1) per confirm.

    ``floor`` is the highest tag up to which everything is confirmed; single
    (non-multiple) confirms above it wait in a set until the gap closes.
    """

    def __init__(self, channel: amqp.Channel) -> None:
        self.channel = channel
        self.floor = 0
        self.next_tag = 1
        self.singles: set[int] = set()
        self.nacked = 0
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)

    def sent(self) -> int:
        tag = self.next_tag
        self.next_tag += 1
        return tag

    def _on_ack(self, tag: int, multiple: bool) -> None:
        if multiple:
            self.floor = max(self.floor, tag)
        else:
            self.singles.add(tag)
        while self.floor + 1 in self.singles:
            self.floor += 1
            self.singles.discard(self.floor)
        if self.singles and min(self.singles) <= self.floor:
            self.singles = {t for t in self.singles if t > self.floor}

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self.nacked += 1
        self._on_ack(tag, multiple)

    def wait(self, tag: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        while self.floor < tag:
            left = end - time.monotonic()
            if left <= 0:
                raise BenchError(f"no confirm for tag {tag} within {timeout}s")
            self.channel.connection.drain_events(timeout=left)
        if self.nacked:
            raise BenchError(f"the broker nacked {self.nacked} message(s)")


# -- the methods ------------------------------------------------------------------------------


def make_kit(settings, deadletters, topology, match_all, batch: int | None = None) -> Method:
    def measure(n: int) -> float:
        conn = topology.connect(settings)  # like `dlq replay`: connected before it starts
        try:
            start = time.perf_counter()
            options = {} if batch is None else {"batch": batch}
            outcome = deadletters.replay(conn, settings, DEAD_QUEUE, match_all, **options)
            elapsed = time.perf_counter() - start
        finally:
            conn.release()
        if len(outcome.taken) != n or outcome.failed or outcome.refused or outcome.skipped:
            why = f": {outcome.failed[0][1]}" if outcome.failed else ""
            raise BenchError(f"replay outcome {outcome.counts()} for {n} dead letters{why}")
        return elapsed

    return Method(KIT if batch is None else KIT_BATCH, measure)


def _raw_channels(vhost: Vhost, prefetch: int) -> tuple[amqp.Connection, amqp.Channel, amqp.Channel]:
    conn = vhost.connection()
    consumer = conn.channel()
    consumer.auto_decode = False  # republish the body bytes as stored
    consumer.basic_qos(0, prefetch, False)
    publisher = conn.channel()
    publisher.confirm_select()
    return conn, consumer, publisher


def _next(conn: amqp.Connection, received: collections.deque) -> amqp.Message:
    while not received:
        conn.drain_events(timeout=10)
    return received.popleft()


def _timed_raw_move(vhost: Vhost, prefetch: int, n: int,
                    move: Callable[[int, Callable[[], amqp.Message], amqp.Channel, amqp.Channel], None]) -> float:
    """Seconds a raw loop takes to move every dead letter: ``move(count, next_message, consumer, publisher)``.

    Timed from the passive declare that counts the queue to the channel close
    that returns once the broker has processed every ack.
    """
    conn, consumer, publisher = _raw_channels(vhost, prefetch)
    try:
        received: collections.deque = collections.deque()
        start = time.perf_counter()
        count = consumer.queue_declare(DEAD_QUEUE, passive=True)[1]
        tag = consumer.basic_consume(DEAD_QUEUE, no_ack=False, callback=received.append)
        move(count, lambda: _next(conn, received), consumer, publisher)
        consumer.basic_cancel(tag)
        consumer.close()  # synchronous: the broker has processed every ack
        elapsed = time.perf_counter() - start
    finally:
        conn.close()
    if count != n:
        raise BenchError(f"{DEAD_QUEUE!r} held {count} dead letters, {n} were seeded")
    return elapsed


def make_raw_each(vhost: Vhost, prefetch: int) -> Method:
    def move(count: int, next_message: Callable[[], amqp.Message], consumer: amqp.Channel,
             publisher: amqp.Channel) -> None:
        for _ in range(count):
            message = next_message()
            copy = amqp.Message(message.body, **message.properties)
            # Waits for this message's confirm; an unroutable (mandatory) one raises.
            publisher.basic_publish_confirm(copy, TASK_EXCHANGE, WORK_QUEUE, mandatory=True, confirm_timeout=30)
            consumer.basic_ack(message.delivery_tag)

    return Method(RAW_EACH, lambda n: _timed_raw_move(vhost, prefetch, n, move))


def make_raw_windowed(vhost: Vhost, prefetch: int, window: int) -> Method:
    def move(count: int, next_message: Callable[[], amqp.Message], consumer: amqp.Channel,
             publisher: amqp.Channel) -> None:
        confirms = Confirms(publisher)
        done = 0
        while done < count:
            size = min(window, count - done)
            last_tag = last_delivery = 0
            for _ in range(size):
                message = next_message()
                copy = amqp.Message(message.body, **message.properties)
                publisher.basic_publish(copy, TASK_EXCHANGE, WORK_QUEUE, mandatory=True)
                last_tag = confirms.sent()
                last_delivery = message.delivery_tag
            confirms.wait(last_tag, timeout=30)
            # Deliveries come in order and all earlier ones are acked: one multiple ack.
            consumer.basic_ack(last_delivery, multiple=True)
            done += size

    return Method(RAW_WINDOWED, lambda n: _timed_raw_move(vhost, prefetch, n, move))


# -- running and reporting ------------------------------------------------------------------------


def check_moved(seeder: Seeder, n: int, kit: bool) -> None:
    """default.dead empty, default holds n (spot-check the kit's replay headers), then purge default."""
    depths = seeder.depths()
    if depths[DEAD_QUEUE] != 0 or depths[WORK_QUEUE] != n:
        seeder.purge(DEAD_QUEUE)
        seeder.purge(WORK_QUEUE)
        raise BenchError(f"after moving {n}: {depths} (want {DEAD_QUEUE} 0, {WORK_QUEUE} {n})")
    sample = seeder.admin.basic_get(WORK_QUEUE, no_ack=True)
    headers = sample.properties.get("application_headers") or {}
    purged = seeder.purge(WORK_QUEUE) + 1
    if kit and (headers.get("kit-replays") != 1 or headers.get("retries") != 0):
        raise BenchError(f"a replayed message lacks kit-replays=1/retries=0: {headers}")
    if purged != n:
        raise BenchError(f"purged {purged} from {WORK_QUEUE!r}, expected {n}")


def reopen(vhost: Vhost, old: Seeder | None, timeout: float = 60) -> Seeder:
    """A new seeder after a failure (the broker may have been restarted by a test running meanwhile); queues emptied."""
    if old is not None:
        with contextlib.suppress(Exception):
            old.close()
    deadline = time.monotonic() + timeout
    while True:
        try:
            seeder = Seeder(vhost)
            seeder.purge(DEAD_QUEUE)
            seeder.purge(WORK_QUEUE)
            return seeder
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def delete_vhost(vhost: Vhost, timeout: float = 60) -> None:
    """Delete the vhost, retrying while the management API is unreachable (a broker restart)."""
    deadline = time.monotonic() + timeout
    while True:
        vhost.delete()  # swallows connection errors
        try:
            management("GET", f"/api/vhosts/{urllib.parse.quote(vhost.name, safe='')}")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            print(f"could not delete vhost {vhost.name!r}; delete it by hand", file=sys.stderr)
            return
        time.sleep(1)


def print_table(report: dict) -> None:
    cfg, env = report["config"], report["env"]
    print(
        f"Dead-letter replay, {DEAD_QUEUE!r} -> {WORK_QUEUE!r}: {cfg['messages']:,} msgs x {cfg['rounds']} rounds "
        f"per method, persistent, priorities 0-3, body {cfg['body_bytes']} B, {cfg['headers']} headers"
    )
    print(
        f"RabbitMQ {env['rabbitmq']} | Python {env['python']} | kombu {env['kombu']} | amqp {env['amqp']} "
        f"| kit window {cfg['kit_window']} | raw window {cfg['raw_window']} | raw prefetch "
        f"{cfg['raw_prefetch'] or 'unlimited'} | vhost {cfg['vhost']}"
    )
    print(
        f"{env['cpus']} CPUs, 1-min load average {env['loadavg_1m_before']} before the rounds, "
        f"{env['loadavg_1m_after']} after (the broker runs on this host too)"
    )
    print()
    print_methods(report, DESCRIPTIONS, "order rotated per round; seeding not timed")
    print_problems(report["problems"])
    met = (report["ratios"][f"{KIT}/{RAW_EACH}"] or 0) >= TARGET_RATIO
    print_ratios(report["ratios"], {
        f"{KIT}/{RAW_EACH}": f"aim >= {TARGET_RATIO:g}x: {'MET' if met else 'NOT MET'}",
        f"{KIT}/{RAW_WINDOWED}": "(the default confirms each message; the raw loop a window)",
        f"{KIT_BATCH}/{RAW_WINDOWED}": "(like for like: both confirm a window at a time)",
    })


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Replay N dead letters with the kit (service.deadletters.replay) and with raw py-amqp "
        "loops (confirm per message; windowed confirms), in the same run; report msg/s and ratios."
    )
    parser.add_argument("--messages", type=int, default=10_000, help="dead letters per measurement (default 10000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; methods interleaved, order rotated (default 3)")
    parser.add_argument("--warmup", type=int, default=200,
                        help="dead letters each method replays once before timing (default 200; 0 = none)")
    parser.add_argument("--window", type=int, default=None,
                        help="confirm window of raw_pyamqp_windowed (default: the kit's BATCH, 200)")
    parser.add_argument("--raw-prefetch", type=int, default=0,
                        help="basic.qos prefetch of the raw consumers (default 0 = unlimited, as the kit's replay)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    opts = parser.parse_args(argv)
    if opts.messages < 1 or opts.rounds < 1 or opts.warmup < 0 or (opts.window is not None and opts.window < 1):
        parser.error("--messages, --rounds and --window must be >= 1, --warmup >= 0")
    if opts.raw_prefetch < 0 or opts.raw_prefetch > 65535:
        parser.error("--raw-prefetch must be 0..65535")

    vhost = Vhost()
    seeder: Seeder | None = None
    try:
        os.environ["KIT_BROKER_URL"] = vhost.url
        from service import deadletters, topology
        from service.deadletters import Filters
        from service.settings import load

        settings = load()
        topology.declare_on(settings)
        window = opts.window or deadletters.BATCH
        if opts.raw_prefetch and opts.raw_prefetch < window:
            parser.error(f"--raw-prefetch must be 0 or >= the window ({window}): a window waits for its messages")

        seeder = Seeder(vhost)
        methods = [
            make_kit(settings, deadletters, topology, Filters()),
            make_kit(settings, deadletters, topology, Filters(), batch=window),
            make_raw_each(vhost, opts.raw_prefetch),
            make_raw_windowed(vhost, opts.raw_prefetch, window),
        ]

        def run(method: Method, n: int) -> float:
            nonlocal seeder
            try:
                seeder.seed(n)
                elapsed = method.measure(n)
                check_moved(seeder, n, kit=method.name == KIT)
            except Exception:
                seeder = reopen(vhost, seeder)  # also empties both queues for the next measurement
                raise
            return elapsed

        if opts.warmup:
            for method in methods:
                try:
                    run(method, opts.warmup)
                except Exception as exc:  # noqa: BLE001 - reported like a failed round
                    method.failures.append(f"warm-up: {type(exc).__name__}: {exc}")

        body_bytes, header_count = seeder.seed(1)
        seeder.purge(DEAD_QUEUE)
        load_before = os.getloadavg()
        rounds: list[dict[str, float | None]] = []
        for r in range(opts.rounds):
            this_round: dict[str, float | None] = {}
            for method in rotated(methods, r):
                try:
                    elapsed = run(method, opts.messages)
                except Exception as exc:  # noqa: BLE001 - a failing method is reported, the others still run
                    method.failures.append(f"round {r + 1}: {type(exc).__name__}: {exc}")
                    this_round[method.name] = None
                    if not opts.json:
                        print(f"  round {r + 1}/{opts.rounds} {method.name:<25} FAILED: {exc}", file=sys.stderr)
                    continue
                rate = opts.messages / elapsed
                method.rates.append(rate)
                this_round[method.name] = rate
                if not opts.json:
                    print(f"  round {r + 1}/{opts.rounds} {method.name:<25} {rate:>10,.0f} msg/s "
                          f"({elapsed:.2f} s)", file=sys.stderr)
            rounds.append(this_round)

        summary = {m.name: summarize(m.rates) for m in methods if m.rates}
        ratios = {
            f"{KIT}/{RAW_EACH}": ratio(summary, KIT, RAW_EACH),
            f"{KIT}/{RAW_WINDOWED}": ratio(summary, KIT, RAW_WINDOWED),
            f"{RAW_WINDOWED}/{RAW_EACH}": ratio(summary, RAW_WINDOWED, RAW_EACH),
            f"{KIT_BATCH}/{RAW_EACH}": ratio(summary, KIT_BATCH, RAW_EACH),
            f"{KIT_BATCH}/{RAW_WINDOWED}": ratio(summary, KIT_BATCH, RAW_WINDOWED),
        }
        aim = ratios[f"{KIT}/{RAW_EACH}"]
        report = {
            "config": {
                "messages": opts.messages,
                "rounds": opts.rounds,
                "warmup": opts.warmup,
                "from_queue": DEAD_QUEUE,
                "to_queue": WORK_QUEUE,
                "body_bytes": body_bytes,
                "headers": header_count,
                "kit_window": deadletters.REPLAY_BATCH,
                "raw_window": window,
                "raw_prefetch": opts.raw_prefetch,
                "vhost": vhost.name,
            },
            "env": environment(load_before, kombu=kombu.__version__, amqp=amqp.__version__),
            "rounds": rounds,
            "summary": summary,
            "ratios": ratios,
            "problems": {m.name: m.failures for m in methods if m.failures},
            "aim": {"ratio": f"{KIT}/{RAW_EACH}", "min": TARGET_RATIO, "met": (aim or 0) >= TARGET_RATIO},
        }
        if opts.json:
            print(json.dumps(report, indent=2))
        else:
            print_table(report)
        return 0
    finally:
        if seeder is not None:
            with contextlib.suppress(Exception):  # best effort clean-up
                seeder.close()
        delete_vhost(vhost)


if __name__ == "__main__":
    sys.exit(main())
