#!/usr/bin/env python
"""Benchmark: how fast a worker drains a queue of no-op tasks, the kit's against plain Celery's.

Runs on the real broker of the tests (KIT_TEST_AMQP_HOST/PORT, management API at
KIT_TEST_MANAGEMENT_URL). Each measurement gets a fresh vhost with the kit's
topology, fills the ``bulk`` queue with N no-op tasks (published by the kit's
client: the same protocol-2 messages for every worker), starts one worker
(prefork, concurrency 2, the Celery log level WARNING) and times from the first
message taken to the queue being empty with nothing unacked. Workers:

  kit                 ``python -m service worker``: the kit's worker as shipped (message
                      checks, metrics in multiprocess mode, time limits, events)
  celery_same_safety  a plain Celery app with the kit's guarantees: acks_late,
                      prefetch multiplier 1, task events on (bench/plain_celery_app.py)
  celery_defaults     the same plain app with Celery's defaults: ack on receipt,
                      prefetch multiplier 4, no events

Each round runs every worker once, in an order rotated per round.

    python bench/worker_drain.py [--tasks 5000] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import environment, print_methods, print_problems, print_ratios, ratio, rotated, summarize

from harness.broker import REPO, Vhost
from harness.processes import spawn
from service.client import Publisher, TaskRequest
from service.settings import load
from service.topology import declare_on

KIT = "kit"
SAME = "celery_same_safety"
DEFAULTS = "celery_defaults"
DESCRIPTIONS = {
    KIT: "the kit's worker as shipped",
    SAME: "plain Celery: acks_late, prefetch 1, events",
    DEFAULTS: "plain Celery defaults: early ack, prefetch 4, no events",
}
TARGET = 0.95
BENCH_DIR = Path(__file__).resolve().parent


def _worker_argv(kind: str) -> list[str]:
    common = ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    if kind == KIT:  # as compose and the local stack run it: metrics in multiprocess mode included
        return [sys.executable, "-m", "service", "worker", "--queues", "bulk", "--concurrency", "2",
                "--name", f"{kind}@%h", "--", "-P", "prefork", *common]
    return [sys.executable, "-m", "celery", "-A", "plain_celery_app", "worker", "-Q", "bulk", "-c", "2",
            "-P", "prefork", *common, "-l", "WARNING", "-n", f"{kind}@%h"]


def _worker_env(kind: str, vhost: Vhost) -> dict[str, str]:
    env = dict(os.environ, KIT_BROKER_URL=vhost.url, BENCH_BROKER_URL=vhost.url, KIT_METRICS_PORT="0",
               KIT_TASK_MODULES="bench.worker_tasks", KIT_LOG_LEVEL="WARNING",
               PYTHONPATH=os.pathsep.join([str(REPO), str(BENCH_DIR)]),
               KIT_STATE_DIR=str(Path("/tmp") / f"bench-worker-{os.getpid()}"))
    if kind == SAME:
        env["BENCH_SAFE"] = "1"
    return env


def measure(kind: str, tasks: int, timeout: float) -> float:
    """Drain ``tasks`` no-op tasks with one worker of ``kind``; returns tasks per second."""
    vhost = Vhost()
    try:
        os.environ["KIT_BROKER_URL"] = vhost.url
        declare_on(load())
        with Publisher() as publisher:
            publisher.publish_many(TaskRequest("bench.noop", queue="bulk") for _ in range(tasks))
        log = tempfile.TemporaryFile()  # noqa: SIM115 - closed below
        worker = spawn(_worker_argv(kind), env=_worker_env(kind, vhost), cwd=BENCH_DIR,
                       stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            started = None
            while True:
                ready = vhost.depth("bulk")
                now = time.monotonic()
                if started is None and ready < tasks:
                    started = now
                if ready == 0:
                    # The last prefetched few are still running: not timed (rabbitmqctl takes a
                    # second), but waited for, so a worker that loses them fails the round.
                    rate = tasks / (now - (started or now))
                    _wait_unacked_zero(vhost, worker, kind, deadline)
                    return rate
                if now > deadline or worker.poll() is not None:
                    log.seek(0)
                    err = log.read().decode(errors="replace")
                    raise RuntimeError(f"{kind} did not drain {tasks} tasks within {timeout:g}s {err[-500:]}")
                time.sleep(0.02)
        finally:
            worker.send_signal(signal.SIGQUIT)
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(10)
            log.close()
    finally:
        vhost.delete()


def _wait_unacked_zero(vhost: Vhost, worker: subprocess.Popen[bytes], kind: str, deadline: float) -> None:
    while vhost.unacked("bulk"):
        if time.monotonic() > deadline or worker.poll() is not None:
            raise RuntimeError(f"{kind} left tasks unacked")
        time.sleep(0.2)


def main() -> None:
    """Run the rounds and print the table and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    load_before = os.getloadavg()
    os.environ["KIT_SEND_SENT_EVENTS"] = "false"  # publishing is not what is measured
    kinds = [KIT, SAME, DEFAULTS]
    rounds: list[dict[str, float | None]] = []
    problems: dict[str, list[str]] = {k: [] for k in kinds}
    for index in range(args.rounds):
        row: dict[str, float | None] = {}
        for kind in rotated(kinds, index):
            try:
                row[kind] = measure(kind, args.tasks, timeout=max(120.0, args.tasks / 50))
            except Exception as exc:  # noqa: BLE001 - reported, the round is left out
                row[kind] = None
                problems[kind].append(f"round {index + 1}: {exc}")
        rounds.append({k: row[k] for k in kinds})
    summary = {k: summarize([r[k] for r in rounds if r[k] is not None]) for k in kinds
               if any(r[k] is not None for r in rounds)}
    ratios = {
        f"{KIT}/{SAME}": ratio(summary, KIT, SAME),
        f"{KIT}/{DEFAULTS}": ratio(summary, KIT, DEFAULTS),
        f"{SAME}/{DEFAULTS}": ratio(summary, SAME, DEFAULTS),
    }
    report = {"config": {"tasks": args.tasks, "rounds": args.rounds, "concurrency": 2},
              "environment": environment(load_before), "rounds": rounds, "summary": summary, "ratios": ratios,
              "problems": problems}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"worker drain: {args.tasks} no-op tasks, prefork concurrency 2, {args.rounds} rounds; "
          f"{report['environment']}")
    print_methods(report, DESCRIPTIONS, "order rotated per round")
    print_problems(problems)
    met = ratios[f"{KIT}/{SAME}"]
    print_ratios(ratios, {f"{KIT}/{SAME}": f"target >= {TARGET}x: {'met' if met and met >= TARGET else 'NOT met'}"})


if __name__ == "__main__":
    main()
