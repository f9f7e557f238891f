"""The dead-letter console's overview of 100,000 dead letters: how long a page view takes.

    python bench/console_overview.py                   # 100,000 letters over urgent/default/bulk.dead
    python bench/console_overview.py --letters 30000 --views 10

It seeds a fresh vhost (``harness.broker.Vhost``) with dead letters as the
kit's worker leaves them (``replay.dead_letter``: task, reason, exception,
death time, a 200-byte body), spread evenly over the three work queues'
dead-letter queues, starts a real ``python -m service console`` on it, logs in
over HTTP, waits for the console's first read of the queues, then times:

- ``overview``: ``GET /`` (counts, oldest, newest, by task, exception and reason,
  work queues), the page the target is about (under 2 s);
- ``filtered_list``: ``GET /letters`` filtered by task and reason, page 2;
- the baseline, ``dlq_stats_walk``: the library's ``stats`` of the three queues,
  what ``python -m service dlq stats`` does on every call (a walk of each queue),
  measured before the console starts (a walk beside the console's own read would
  miss the letters that read holds).

How it gets there: the console walks each queue in a background thread (on
start, when a queue's count changes, and every few refresh periods) and keeps
one small row per letter; a page view counts those rows in memory and never
reads the broker. The first read's duration and the console's memory are
printed too. Medians of ``--views`` views; the ratio is baseline / overview.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
from common import REPO, environment
from replay import dead_letter

from harness.broker import Vhost
from harness.processes import spawn
from harness.waiting import wait_until

TARGET_S = 2.0
WORK_QUEUES = ("urgent", "default", "bulk")


def seed(settings, count: int) -> None:
    from service import queues
    from service.publishing import ConfirmedChannel, Outgoing

    now = datetime.now(UTC)
    publisher = ConfirmedChannel(settings)
    try:
        batch = []
        for i in range(count):
            body, properties = dead_letter(i, now)
            headers = properties.pop("application_headers")
            work_queue = WORK_QUEUES[i % len(WORK_QUEUES)]
            headers["kit-source-queue"] = work_queue
            batch.append(Outgoing(queues.DEAD_LETTER_EXCHANGE, work_queue, body, headers, properties))
            if len(batch) == 2000:
                publisher.publish_many(batch, window=500)
                batch = []
        if batch:
            publisher.publish_many(batch, window=500)
    finally:
        publisher.close()


def timed_get(client: httpx.Client, path: str, views: int, expect: str) -> list[float]:
    seconds = []
    for _ in range(views):
        started = time.perf_counter()
        response = client.get(path)
        seconds.append(time.perf_counter() - started)
        if response.status_code != 200 or expect not in response.text:
            raise SystemExit(f"GET {path} answered {response.status_code} without {expect!r}")
    return seconds


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--letters", type=int, default=100_000, help="dead letters to seed (default 100000)")
    parser.add_argument("--views", type=int, default=15, help="timed page views per page (default 15)")
    parser.add_argument("--baseline-rounds", type=int, default=3, help="timed `dlq stats` walks (default 3)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    vhost = Vhost()
    work = Path(tempfile.mkdtemp(prefix="console-bench-"))
    console = None
    try:
        os.environ.update(KIT_BROKER_URL=vhost.url, KIT_STATE_DIR=str(work / "state"))
        from service import deadletters as dl
        from service.console.users import add_user
        from service.settings import load
        from service.topology import connect, declare_on

        settings = load()
        declare_on(settings)
        started = time.perf_counter()
        seed(settings, args.letters)
        print(f"seeded {args.letters:,} dead letters in {time.perf_counter() - started:.1f} s")

        # The baseline first: a walk while the console reads would miss the letters the console holds.
        baseline = []
        for _ in range(args.baseline_rounds):
            conn = connect(settings)
            try:
                started = time.perf_counter()
                counted = sum(dl.stats(conn, f"{q}.dead")["count"] for q in WORK_QUEUES)
                baseline.append(time.perf_counter() - started)
            finally:
                conn.release()
            if counted != args.letters:
                raise SystemExit(f"dlq stats counted {counted}, expected {args.letters}")
        password = secrets.token_urlsafe(18)
        add_user(work / "users", "bench", "viewer", password)
        port = _free_port()
        env = {**os.environ, "KIT_CONSOLE_USERS_FILE": str(work / "users"), "KIT_CONSOLE_REFRESH": "5",
               "PYTHONPATH": str(REPO)}
        log = open(work / "console.log", "wb")  # noqa: SIM115 - closed with the process
        console = spawn([sys.executable, "-m", "service", "console", "--port", str(port)], env=env, cwd=REPO,
                        stdout=log, stderr=subprocess.STDOUT)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        started = time.perf_counter()
        wait_until(lambda: _healthy(client), 60, "the console to start")
        form = client.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)[1]
        client.post("/login", data={"username": "bench", "password": password, "csrf_token": token})
        per_queue = {q: len(range(i, args.letters, len(WORK_QUEUES))) for i, q in enumerate(WORK_QUEUES)}

        def read_all() -> bool:
            page = client.get("/").text
            return all(re.search(rf'data-queue="{q}\.dead">\s*<td>.*?</td>\s*<td class="count">{n}\b', page)
                       for q, n in per_queue.items())

        wait_until(read_all, 600, "the console's first read of the queues", interval=0.5)
        first_read = time.perf_counter() - started

        overview = timed_get(client, "/", args.views, "default.dead")
        listed = timed_get(client, "/letters?queue=default.dead&task=webhooks.deliver&page=2", args.views,
                           'id="total"')
        memory = rss_mib(console.pid)
    finally:
        if console is not None and console.poll() is None:
            console.send_signal(signal.SIGTERM)
            try:
                console.wait(20)
            except subprocess.TimeoutExpired:
                console.kill()
        vhost.delete()

    med_overview, med_list, med_base = (statistics.median(x) for x in (overview, listed, baseline))
    print("environment:", environment(load_before))
    print(f"console's first read of {args.letters:,} letters (start to overview complete): {first_read:.1f} s; "
          f"console RSS {memory:.0f} MiB")
    print(f"{'what':28} {'median s':>9} {'min s':>8} {'max s':>8}")
    for name, values in (("overview (GET /)", overview), ("filtered list (GET /letters)", listed),
                         ("baseline: dlq stats walk", baseline)):
        print(f"{name:28} {statistics.median(values):9.3f} {min(values):8.3f} {max(values):8.3f}")
    print(f"ratio baseline / overview: {med_base / med_overview:.1f}x; baseline / filtered list: "
          f"{med_base / med_list:.1f}x")
    verdict = "met" if med_overview < TARGET_S else "NOT met"
    print(f"target: overview of {args.letters:,} letters under {TARGET_S:.0f} s: {verdict} ({med_overview:.3f} s)")
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(client: httpx.Client) -> bool:
    try:
        return client.get("/healthz").status_code == 200
    except httpx.TransportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
