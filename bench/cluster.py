#!/usr/bin/env python
"""Benchmark: what quorum queues on a 3-node cluster cost against classic queues on one node.

Side by side in one run, on this machine: the tests' single broker (classic
profile) and a 3-node cluster of Debian's rabbitmq-server that this script
starts (quorum profile, ports 5731-5733, stopped at the end). Each
measurement gets a fresh vhost with the profile's topology. Methods, each for
``classic`` (one node) and ``quorum`` (three nodes):

  publish         ``Publisher.publish`` in a loop from one thread: one confirm per message
  publish_many    ``Publisher.publish_many``: confirms awaited 256 at a time
  end_to_end      N no-op tasks queued in ``bulk``, then drained by one kit worker (prefork,
                  concurrency 2): from the first message taken to the queue empty with nothing unacked

Each round runs every method once, in an order rotated per round; the
ratios are of medians (quorum over classic: below 1 is what the replication
costs).

    python bench/cluster.py [--messages 2000] [--tasks 3000] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import amqp
from common import environment, print_methods, print_problems, print_ratios, ratio, rotated, summarize

from harness.broker import ADMIN_PASSWORD, ADMIN_USER, REPO, Vhost
from harness.processes import spawn
from service.client import Publisher, TaskRequest
from service.settings import load
from service.stack.cluster import ClusterLayout, LocalCluster
from service.topology import declare_on

BENCH_DIR = Path(__file__).resolve().parent
LAYOUT = ClusterLayout(size=3, prefix="kit-bench-c", first_amqp_port=5731, first_dist_port=25731,
                       first_management_port=15731, first_prometheus_port=15831)
CLUSTER_DIR = Path("/tmp/kit-bench-cluster")
PROFILES = ("classic", "quorum")
KINDS = ("publish", "publish_many", "end_to_end")
DESCRIPTIONS = {
    f"{kind}_{profile}": f"{text}, {where}"
    for kind, text in (("publish", "Publisher.publish, confirm each"),
                       ("publish_many", "Publisher.publish_many, window 256"),
                       ("end_to_end", "queue then drain no-op tasks, 1 worker x2"))
    for profile, where in (("classic", "classic queues, 1 node"), ("quorum", "quorum queues, 3 nodes"))
}


@dataclass
class Place:
    """A fresh vhost on the single node or the cluster: its KIT_BROKER_URL and how to count a queue."""

    url: str
    queue_type: str
    depth: Callable[[str], int]
    unacked: Callable[[str], int]
    delete: Callable[[], None]


def _classic_place() -> Place:
    vhost = Vhost()
    return Place(vhost.url, "classic", vhost.depth, vhost.unacked, vhost.delete)


def _cluster_place(cluster: LocalCluster) -> Place:
    name = f"kit-bench-{int(time.time())}-{uuid.uuid4().hex[:8]}"
    node = cluster.nodes[0]
    api = f"http://127.0.0.1:{node.management_port}/api"

    def call(method: str, path: str, body: dict | None = None) -> None:
        request = urllib.request.Request(api + path, method=method, data=json.dumps(body).encode() if body else None)
        token = base64.b64encode(f"{ADMIN_USER}:{ADMIN_PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=60):
            pass

    quoted = urllib.request.quote(name, safe="")
    call("PUT", f"/vhosts/{quoted}")
    call("PUT", f"/permissions/{quoted}/{ADMIN_USER}", {"configure": ".*", "write": ".*", "read": ".*"})
    url = ";".join(cluster.amqp_urls(ADMIN_USER, ADMIN_PASSWORD, name))

    def depth(queue: str) -> int:
        conn = amqp.Connection(f"127.0.0.1:{node.amqp_port}", userid=ADMIN_USER, password=ADMIN_PASSWORD,
                               virtual_host=name)
        conn.connect()
        try:
            return conn.channel().queue_declare(queue, passive=True)[1]
        finally:
            conn.close()

    def unacked(queue: str) -> int:
        out = cluster.ctl(node, "list_queues", "-p", name, "name", "messages_unacknowledged")
        rows = dict(line.split("\t") for line in out.splitlines() if "\t" in line)
        return int(rows.get(queue, "0"))

    return Place(url, "quorum", depth, unacked, lambda: call("DELETE", f"/vhosts/{quoted}"))


def _use(place: Place) -> None:
    os.environ["KIT_BROKER_URL"] = place.url
    os.environ["KIT_QUEUE_TYPE"] = place.queue_type
    declare_on(load())


def _publish(place: Place, messages: int, many: bool) -> float:
    _use(place)
    requests = [TaskRequest("bench.noop", [12345, "customer-export"], queue="bulk") for _ in range(messages)]
    with Publisher() as publisher:
        publisher.publish("bench.noop", queue="bulk")  # connection open before timing
        start = time.perf_counter()
        if many:
            publisher.publish_many(requests)
        else:
            for request in requests:
                publisher.publish(request.name, request.args, queue="bulk")
        elapsed = time.perf_counter() - start
    if place.depth("bulk") != messages + 1:
        raise RuntimeError(f"bulk holds {place.depth('bulk')} messages, {messages + 1} were confirmed")
    return messages / elapsed


def _drain(place: Place, tasks: int, timeout: float) -> float:
    _use(place)
    with Publisher() as publisher:
        publisher.publish_many(TaskRequest("bench.noop", queue="bulk") for _ in range(tasks))
    env = dict(os.environ, KIT_BROKER_URL=place.url, KIT_QUEUE_TYPE=place.queue_type, KIT_METRICS_PORT="0",
               KIT_TASK_MODULES="bench.worker_tasks", KIT_LOG_LEVEL="WARNING",
               PYTHONPATH=os.pathsep.join([str(REPO), str(BENCH_DIR)]),
               KIT_STATE_DIR=str(Path("/tmp") / f"bench-cluster-worker-{os.getpid()}"))
    argv = [sys.executable, "-m", "service", "worker", "--queues", "bulk", "--concurrency", "2", "--name",
            f"bench-{place.queue_type}@%h", "--", "-P", "prefork", "--without-gossip", "--without-mingle",
            "--without-heartbeat"]
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed below
    worker = spawn(argv, env=env, cwd=BENCH_DIR, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        started = None
        while True:
            ready = place.depth("bulk")
            now = time.monotonic()
            if started is None and ready < tasks:
                started = now
            if ready == 0:
                rate = tasks / (now - (started or now))
                while place.unacked("bulk"):
                    if time.monotonic() > deadline or worker.poll() is not None:
                        raise RuntimeError("the worker left tasks unacked")
                    time.sleep(0.2)
                return rate
            if now > deadline or worker.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"no drain of {tasks} tasks in {timeout:g}s: {log.read().decode()[-500:]}")
            time.sleep(0.02)
    finally:
        worker.send_signal(signal.SIGQUIT)
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)
        log.close()


def measure(method: str, cluster: LocalCluster, messages: int, tasks: int) -> float:
    """One measurement of ``method`` (``<kind>_<profile>``) in a fresh vhost; msg/s or tasks/s."""
    kind, profile = method.rsplit("_", 1)
    place = _classic_place() if profile == "classic" else _cluster_place(cluster)
    try:
        if kind == "end_to_end":
            return _drain(place, tasks, timeout=max(120.0, tasks / 20))
        return _publish(place, messages, many=kind == "publish_many")
    finally:
        place.delete()


def main() -> None:
    """Start the cluster, run the rounds, print the table and the ratios, stop the cluster."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ["KIT_SEND_SENT_EVENTS"] = "false"  # the same for both profiles; not what is compared
    load_before = os.getloadavg()
    methods = [f"{kind}_{profile}" for kind in KINDS for profile in PROFILES]
    cluster = LocalCluster(CLUSTER_DIR, LAYOUT)
    shutil.rmtree(CLUSTER_DIR, ignore_errors=True)
    print("starting a 3-node cluster on ports 5731-5733 ...", file=sys.stderr)
    cluster.start()
    rounds: list[dict[str, float | None]] = []
    problems: dict[str, list[str]] = {m: [] for m in methods}
    try:
        for index in range(args.rounds):
            row: dict[str, float | None] = {}
            for method in rotated(methods, index):
                try:
                    row[method] = measure(method, cluster, args.messages, args.tasks)
                except Exception as exc:  # noqa: BLE001 - reported, the round is left out
                    row[method] = None
                    problems[method].append(f"round {index + 1}: {exc}")
            rounds.append({m: row[m] for m in methods})
    finally:
        cluster.stop()
        shutil.rmtree(CLUSTER_DIR, ignore_errors=True)
    summary = {m: summarize([r[m] for r in rounds if r[m] is not None]) for m in methods
               if any(r[m] is not None for r in rounds)}
    ratios = {f"{kind}: quorum/classic": ratio(summary, f"{kind}_quorum", f"{kind}_classic") for kind in KINDS}
    report = {"config": {"messages": args.messages, "tasks": args.tasks, "rounds": args.rounds},
              "environment": environment(load_before), "rounds": rounds, "summary": summary, "ratios": ratios,
              "problems": problems}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"cluster: {args.messages} confirmed publishes, {args.tasks} tasks end to end, {args.rounds} rounds; "
          f"{report['environment']}")
    print_methods(report, DESCRIPTIONS, "order rotated per round")
    print_problems(problems)
    print_ratios(ratios, {k: "the price of replication (below 1: quorum is slower)" for k in ratios})


if __name__ == "__main__":
    main()
