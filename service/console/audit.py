"""The console's audit trail and metrics.

Every action (login, logout, replay, purge, export, showing a task's
arguments, a refused request) is one JSON line on the ``service.console.audit``
logger (who, role, what, the filter, how many, the outcome, when) and counts in
``kit_console_actions_total{action, outcome}``. ``/metrics`` serves these and
the snapshot's age per queue (``kit_console_snapshot_age_seconds{queue}``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.process_collector import ProcessCollector

logger = logging.getLogger("service.console.audit")


class Audit:
    """Writes audit lines and keeps the console's metrics (one registry per console)."""

    def __init__(self, snapshot_ages: Callable[[], dict[str, float | None]]) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.actions = Counter("kit_console_actions_total", "Actions taken in the dead-letter console, by action "
                               "and outcome.", ["action", "outcome"], registry=self.registry)
        self.letters = Counter("kit_console_letters_total", "Dead letters moved (replay) or deleted (purge) "
                               "through the console.", ["action"], registry=self.registry)
        age = Gauge("kit_console_snapshot_age_seconds", "Seconds since the console last read each dead-letter "
                    "queue (NaN: never).", ["queue"], registry=self.registry)
        self._age = age
        self._snapshot_ages = snapshot_ages

    def __call__(self, user: str, action: str, filters: dict[str, Any] | None = None,
                 counts: dict[str, int] | None = None, outcome: str = "ok", detail: str | None = None,
                 role: str | None = None) -> None:
        """Record one action."""
        record = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "user": user, "role": role,
                  "action": action, "outcome": outcome, "filters": filters or {}, "counts": counts or {}}
        if detail:
            record["detail"] = detail
        logger.info("console audit %s", json.dumps(record, sort_keys=True, default=str))
        self.actions.labels(action, outcome).inc()
        if counts:
            moved = counts.get("moved", 0) if action == "replay" else counts.get("purged", 0)
            if moved:
                self.letters.labels(action).inc(moved)

    def collect_ages(self) -> None:
        """Update the snapshot-age gauge (called before /metrics is served)."""
        now = time.time()
        for queue, taken_at in self._snapshot_ages().items():
            self._age.labels(queue).set(float("nan") if taken_at is None else now - taken_at)
