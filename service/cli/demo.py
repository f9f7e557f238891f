"""``python -m service demo``: publish a mix of demo tasks (exports, clean-ups, e-mails, webhooks)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import click

from service import queues
from service.cli.base import friendly_errors


@click.command()
@click.option("--count", type=click.IntRange(min=1), default=50, show_default=True, help="Tasks to publish.")
@click.option("--rate", type=click.FloatRange(min=0.1), default=10.0, show_default=True, help="Tasks per second.")
@click.option("--webhook-url", default="http://127.0.0.1:9/hook", show_default=True,
              help="Webhook target of the demo (the default refuses connections, so those retry and dead-letter).")
@friendly_errors
def demo(count: int, rate: float, webhook_url: str) -> None:
    """Publish a mix of demo tasks: exports, clean-ups, e-mails and webhooks, mixed priorities."""
    from service.client import Publisher

    rng = random.Random()
    kinds: list[tuple[str, Callable[[int], dict[str, Any]]]] = [
        ("reports.export", lambda i: {"report": f"demo_{i % 5}", "rows": [{"n": i, "square": i * i}]}),
        ("reports.export", lambda i: {"report": "bad name!", "rows": []}),  # dead-lettered: permanent
        ("maintenance.cleanup_reports", lambda i: {}),
        ("emails.send", lambda i: {"to": f"user{i}@example.com", "subject": "Demo", "body": "Hello"}),
        ("webhooks.deliver", lambda i: {"url": webhook_url, "payload": {"n": i}, "event": "demo"}),
    ]
    weights = [70, 5, 5, 10, 10]
    with Publisher() as publisher:
        for i in range(count):
            name, make = rng.choices(kinds, weights)[0]
            priority = rng.choices(list(queues.PRIORITIES), [30, 50, 15, 5])[0]
            task_id = publisher.publish(name, kwargs=make(i), priority=priority)
            click.echo(f"{name:28} {priority:8} {task_id}")
            time.sleep(1 / rate)
