"""Settings for a plain Celery app (not the kit's) that publishes tasks to the kit's broker.

The kit's workers run the tasks; another team's Celery app only sends them::

    from celery import Celery
    from service.celery_settings import publisher_settings

    app = Celery("billing")
    app.conf.update(publisher_settings("pyamqp://kit-publisher:...@rabbitmq:5672/kit"))
    app.send_task("emails.send", kwargs={...})                 # routed like the kit's client: urgent
    app.send_task("reports.export", kwargs={...}, queue="bulk")

What it sets, and why (README, "Publishing from another Celery app"):

- every task goes to the kit's task exchange (``tasks``) with the work queue's
  name as routing key (``route``). Without a router naming the exchange,
  Celery publishes to a direct queue through the default exchange
  (``amq.default``), which the kit's publisher user may not write to;
- ``task_queues`` lists the work queues with ``no_declare``, so Celery never
  declares them (or the exchange). A declare without the kit's exact arguments
  is refused by RabbitMQ with ``406 PRECONDITION_FAILED inequivalent arg ...``,
  and the kit's publisher user may not declare anything anyway;
- ``task_create_missing_queues=False``: ``queue="nightly"`` (no such work
  queue) fails in the app with Celery's QueueNotFound, before anything is sent.
  A routing key that is no work queue's name (``routing_key="high_priority"``)
  is not dropped by the broker: it is parked in ``unroutable.dead``, where
  ``python -m service dlq list --queue unroutable`` shows it;
- publisher confirms (``confirm_publish``): ``send_task`` returns once RabbitMQ
  has the message;
- JSON only (the kit's workers refuse pickle), and the kit's default priority.

It is only a dict of settings: no Celery app, no task code, nothing imported
from the kit's worker side.
"""

from __future__ import annotations

import os
from typing import Any

from kombu import Exchange, Queue

from service import queues


class Router:
    """Celery router: the task exchange, and the queue the caller named (else the kit's TASK_ROUTES).

    Also the kit's default priority (``normal``) when the caller gives none.
    A ``routing_key=`` the caller passes is kept as it is: one that is no work
    queue's name is parked in ``unroutable.dead`` by the broker. On the quorum
    profile a task of high or critical priority goes to its work queue's high lane.
    """

    def __init__(self, queue_type: str = queues.DEFAULT_QUEUE_TYPE) -> None:
        self.profile = queues.topology(queue_type)

    def __call__(self, name: str, args: Any, kwargs: Any, options: Any, task: Any = None,
                 **kw: Any) -> dict[str, Any]:
        """The queue, exchange, routing key and default priority of one task."""
        options = options or {}
        asked = options.get("queue")
        queue = asked.name if isinstance(asked, Queue) else asked
        queue = str(queue or queues.queue_for_task(name))
        priority = options.get("priority")
        default = queues.PRIORITIES[queues.DEFAULT_PRIORITY]
        if not isinstance(priority, int) or isinstance(priority, bool):
            priority = default
        # The priority is a default too (send_task ignores task_default_priority): the caller's wins.
        return {"queue": queue, "exchange": queues.TASK_EXCHANGE,
                "routing_key": self.profile.routing_key(queue, priority), "priority": default}


#: The router of the classic profile.
route = Router()


def task_exchange() -> Exchange:
    """The kit's task exchange as kombu sees it, never declared by the app (``no_declare``)."""
    spec = queues.exchange(queues.TASK_EXCHANGE)
    return Exchange(spec.name, type=spec.type, durable=True, arguments=dict(spec.arguments), no_declare=True)


def work_queues() -> list[Queue]:
    """The kit's work queues, bound to the task exchange by their name, never declared (``no_declare``)."""
    exchange = task_exchange()
    return [
        Queue(q.name, exchange, routing_key=q.binding_key, queue_arguments=dict(q.arguments), durable=True,
              no_declare=True)
        for q in queues.WORK_QUEUES
    ]


def publisher_settings(broker_url: str | None = None, queue_type: str | None = None) -> dict[str, Any]:
    """The ``app.conf.update(...)`` settings of a plain Celery app that publishes to the kit.

    ``broker_url`` is included when given (it may also come from the app's own
    configuration). Tasks are routed by the kit's ``TASK_ROUTES`` unless the
    caller names a ``queue`` (``Router``). ``queue_type`` is the kit's
    KIT_QUEUE_TYPE (default: that variable, else classic): on quorum, high and
    critical tasks go to the high lanes.
    """
    queue_type = queue_type or os.environ.get("KIT_QUEUE_TYPE", "").strip().lower() or queues.DEFAULT_QUEUE_TYPE
    settings: dict[str, Any] = {
        "task_queues": work_queues(),
        "task_default_queue": queues.DEFAULT_QUEUE,
        "task_default_exchange": queues.TASK_EXCHANGE,
        "task_default_exchange_type": queues.EXCHANGES[queues.TASK_EXCHANGE],
        "task_default_routing_key": queues.DEFAULT_QUEUE,
        "task_create_missing_queues": False,
        "task_routes": (Router(queue_type),),
        "task_default_priority": queues.PRIORITIES[queues.DEFAULT_PRIORITY],
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "broker_transport_options": {"confirm_publish": True},
        "broker_connection_retry_on_startup": True,
    }
    if broker_url is not None:
        settings["broker_url"] = broker_url
    return settings
