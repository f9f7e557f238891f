"""A worker of a work queue also consumes its high lane (quorum profile).

Quorum queues on RabbitMQ 3.x ignore message priority, so on the quorum
profile a task of ``queues.HIGH_LANE_PRIORITY`` or more is routed to the work
queue's high lane (``<queue>.high``, service.queues). ``celery worker -Q
default`` then consumes ``default`` and ``default.high``: the lane's messages
reach the worker beside the backlog instead of behind it. On the classic
profile there are no lanes and nothing changes.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.app.amqp import AMQP, Queues
from kombu.utils.functional import maybe_list

from service import queues


class LaneQueues(Queues):
    """Celery's queue map, where selecting a work queue (``-Q``) selects its high lane too, when it has one."""

    def select(self, include: Any) -> None:
        """Consume the queues of ``include`` and, for each work queue among them, its high lane."""
        names = list(maybe_list(include) or [])
        expanded: list[str] = []
        for name in names:
            expanded.append(name)
            lane = queues.high_lane_name(name)
            if name in queues.WORK_QUEUE_NAMES and lane in self and lane not in names:
                expanded.append(lane)
        super().select(expanded)


class LaneAMQP(AMQP):
    """Celery's AMQP part with LaneQueues (``Celery(amqp=...)``)."""

    queues_cls = LaneQueues


class NativeDelayedDeliveryWarning(logging.Filter):
    """Drop Celery's "Direct exchanges are not supported with native delayed delivery" warning.

    Celery warns on every countdown/ETA publish to a direct exchange once it
    sees quorum queues. The kit does not use Celery's native delayed delivery:
    a worker moves a task due later to the broker's wait queues
    (service.worker.consumer), so the warning is wrong here.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """False (drop) for that warning only."""
        return "not supported with native delayed delivery" not in record.getMessage()
