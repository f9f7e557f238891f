"""The kit's own Prometheus metrics: what neither celery-exporter nor RabbitMQ gives.

Correct under Celery's prefork pool: workers run prometheus-client in
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set by ``python -m service
worker``), so a value recorded in any pool process or the main process is
served, summed, by the main process's endpoint on KIT_METRICS_PORT.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, start_http_server

from service.headers import ENQUEUED_AT as ENQUEUED_AT_HEADER
from service.headers import REPLAYS as REPLAYS_HEADER

logger = logging.getLogger(__name__)

DEAD_LETTERS = Counter(
    "kit_dead_letters_total",
    "Messages the workers dead-lettered, by work queue, task and kit-reason.",
    ["queue", "task", "reason"],
)
RETRIES = Counter(
    "kit_retries_scheduled_total",
    "Retries the workers scheduled in a broker wait queue, by work queue and task.",
    ["queue", "task"],
)
ETA_WAITS = Counter(
    "kit_eta_waits_total",
    "Messages a worker sent back to a broker wait queue because their ETA was still ahead "
    "(instead of holding them in memory), by work queue and task.",
    ["queue", "task"],
)
ROUTING_FAILURES = Counter(
    "kit_routing_publish_failures_total",
    "Retries or dead letters the worker could not publish (the message was then "
    "rejected for RabbitMQ to dead-letter), by kind.",
    ["kind"],
)
REPLAYED_RECEIVED = Counter(
    "kit_replayed_tasks_received_total",
    "Replayed dead letters received again by a worker, by work queue and task.",
    ["queue", "task"],
)
QUEUE_WAIT = Histogram(
    "kit_task_queue_wait_seconds",
    "Seconds from a message becoming ready in its work queue to a worker starting it.",
    ["queue", "task"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)


def observe_start(queue: str, task: str, headers: dict[str, Any]) -> None:
    """Record the queue wait of a task that is starting now (if its message says when it was queued)."""
    enqueued = headers.get(ENQUEUED_AT_HEADER)
    if isinstance(enqueued, (int, float)):
        QUEUE_WAIT.labels(queue, task).observe(max(0.0, time.time() - float(enqueued)))
    if headers.get(REPLAYS_HEADER) and not headers.get("retries"):
        REPLAYED_RECEIVED.labels(queue, task).inc()


def serve(port: int) -> bool:
    """Serve /metrics on ``port`` (all interfaces); False when the port is off (0) or taken."""
    if not port:
        return False
    registry = None
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    try:
        if registry is None:
            start_http_server(port)
        else:
            start_http_server(port, registry=registry)
    except OSError as exc:
        logger.error("cannot serve metrics on port %s (%s); set KIT_METRICS_PORT to a free port", port, exc)
        return False
    logger.info("metrics on http://0.0.0.0:%s/metrics", port)
    return True
