"""A plain Celery app for bench/worker_drain.py's baselines: ``celery -A plain_celery_app worker``.

It consumes the kit's ``bulk`` queue (declared by the benchmark with the kit's
arguments, so the broker does the same work for every worker) and runs the same
no-op task. BENCH_BROKER_URL names the broker; BENCH_SAFE=1 gives it the kit's
delivery guarantees (acks late, prefetch 1, task events), otherwise Celery's
defaults (ack on receipt, prefetch 4, no events).
"""

from __future__ import annotations

import os

from celery import Celery
from kombu import Exchange, Queue

app = Celery("plain", broker=os.environ["BENCH_BROKER_URL"])
_safe = os.environ.get("BENCH_SAFE") == "1"
app.conf.update(
    task_queues=[Queue("bulk", Exchange("tasks", type="direct", no_declare=True), routing_key="bulk",
                       no_declare=True)],
    accept_content=["json"],
    task_ignore_result=True,
    worker_hijack_root_logger=True,
    task_acks_late=_safe,
    task_reject_on_worker_lost=_safe,
    worker_prefetch_multiplier=1 if _safe else 4,
    worker_send_task_events=_safe,
)


@app.task(name="bench.noop")
def noop(*args: object, **kwargs: object) -> None:
    """Do nothing."""
