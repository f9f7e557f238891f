"""The web service's own Prometheus metrics, served at /metrics (job ``kit-web`` in deploy/prometheus).

- ``kit_web_requests_total{route, method, status}``: every answered request;
  ``route`` is the route's path template (``/api/tasks/{task_id}``), or
  ``unmatched`` for paths no route serves, and ``method`` one of METHODS or
  ``other`` (HTTP allows any token there), so the label set stays small.
- ``kit_web_request_duration_seconds{route, method}``: time to the response's start.
- ``kit_web_publish_duration_seconds{task, outcome}``: one publish, until the broker confirmed
  it (``ok``) or the client gave up (the error's class name).
- ``kit_web_status_duration_seconds{outcome}``: one status look-up.

Each app has a registry of its own (with the process collector), so two apps in
one process never collide and the workers' metrics never mix in.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.process_collector import ProcessCollector

#: Buckets of the publish and status latencies (a confirm takes about 1 ms; deadlines are seconds).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

Scope = dict[str, Any]
#: The methods counted by name; any other is counted as ``other``.
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


class WebMetrics:
    """The metrics of one app (CountRequests records its requests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter("kit_web_requests_total", "Requests the web service answered, by route, "
                                "method and status code.", ["route", "method", "status"], registry=self.registry)
        self.request_seconds = Histogram("kit_web_request_duration_seconds", "Seconds until the response "
                                         "started, by route and method.", ["route", "method"],
                                         buckets=LATENCY_BUCKETS, registry=self.registry)
        self.publish_seconds = Histogram("kit_web_publish_duration_seconds", "Seconds one publish took "
                                         "(until confirmed, or until it failed), by task and outcome.",
                                         ["task", "outcome"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.status_seconds = Histogram("kit_web_status_duration_seconds", "Seconds one task status "
                                        "look-up took, by outcome.", ["outcome"], buckets=LATENCY_BUCKETS,
                                        registry=self.registry)

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class CountRequests:
    """ASGI middleware recording every HTTP request in ``metrics`` (also one that raises: as a 500).

    A class, not a closure: sentry-sdk's Starlette integration patches middleware classes.
    """

    def __init__(self, app: Any, metrics: WebMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        code, elapsed = 500, None

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal code, elapsed
            if message["type"] == "http.response.start":
                code, elapsed = message["status"], time.monotonic() - started
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # The route's path template (set by FastAPI's router on the shared scope), not the path.
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "")
            method = method if method in METHODS else "other"
            self.metrics.requests.labels(route, method, str(code)).inc()
            self.metrics.request_seconds.labels(route, method).observe(
                elapsed if elapsed is not None else time.monotonic() - started)
