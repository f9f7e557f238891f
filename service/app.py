"""The Celery application of workers and beat, configured from the environment.

Everything that keeps messages from being lost or looped is set here; the
design notes explain each choice. Workers are started with
``python -m service worker`` (or ``celery -A service.app worker``) and consume
the work queues of ``service.queues`` only: dead-letter and wait queues are not
in ``task_queues``, so no worker ever consumes them.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import beat_init, worker_init, worker_process_init
from kombu import Exchange
from kombu import Queue as KombuQueue

from service import queues
from service.broker import declare_topology_enabled
from service.errors import BrokerUnavailable, TopologyConflict
from service.settings import load

logger = logging.getLogger(__name__)

#: The kit's own task modules; KIT_TASK_MODULES adds more.
TASK_MODULES = (
    "service.tasks.emails",
    "service.tasks.reports",
    "service.tasks.webhooks",
    "service.tasks.maintenance",
)


def route_task(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> dict[str, str]:
    """Celery router that applies ``queues.TASK_ROUTES`` (shared with the client).

    Names the task exchange too: otherwise Celery publishes through the default
    exchange (amq.default), which the broker's publisher user may not write to.
    """
    queue = queues.queue_for_task(name)
    return {"queue": queue, "exchange": queues.TASK_EXCHANGE, "routing_key": queue}


def make_app() -> Celery:
    """Build the Celery app from the current environment."""
    settings = load()
    # KIT_DECLARE_TOPOLOGY=false: the queues come from the broker's definitions and
    # the worker's user may not declare them (service.broker), so never try.
    no_declare = not declare_topology_enabled()
    task_exchange = Exchange(queues.TASK_EXCHANGE, type="direct", durable=True, no_declare=no_declare)
    app = Celery("service", task_cls="service.worker.task:ReliableTask")
    app.conf.update(
        broker_url=settings.broker_url,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=settings.connect_timeout,
        broker_use_ssl=settings.broker_ssl,
        # Workers publish retries and dead letters through their own confirmed
        # channel (service.worker.routing); here confirms would only slow down the
        # task events. Beat turns them on for its publishes (see _beat_setup).
        broker_transport_options={},
        task_queues=[
            KombuQueue(
                q.name,
                task_exchange,
                routing_key=q.binding_key,
                queue_arguments=dict(q.arguments),
                durable=True,
                no_declare=no_declare,
            )
            for q in queues.WORK_QUEUES
        ],
        task_default_queue=queues.DEFAULT_QUEUE,
        task_default_exchange=queues.TASK_EXCHANGE,
        task_default_exchange_type="direct",
        task_default_routing_key=queues.DEFAULT_QUEUE,
        task_routes=(route_task,),
        task_create_missing_queues=False,
        task_queue_max_priority=queues.MAX_PRIORITY,
        task_default_priority=queues.PRIORITIES[queues.DEFAULT_PRIORITY],
        # Delivery guarantees: ack after the run, one message per process at a
        # time (so priorities hold), failures handled by ReliableRequest.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_consumer="service.worker.consumer:ReliableConsumer",
        task_time_limit=settings.hard_time_limit,
        task_soft_time_limit=settings.soft_time_limit,
        # JSON only, everywhere: pickle is refused.
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_ignore_result=True,
        # Task events feed celery-exporter and Flower.
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=True,
        worker_log_color=False,
        imports=TASK_MODULES + settings.task_modules,
        enable_utc=True,
        beat_schedule_filename=str(settings.state_dir / "celerybeat-schedule"),
        beat_schedule={
            "maintenance.cleanup_reports": {
                "task": "maintenance.cleanup_reports",
                "schedule": settings.cleanup_interval,
                "options": {"priority": queues.PRIORITIES["low"]},
            },
        },
    )
    return app


app = make_app()


@worker_init.connect  # in the main process, before the pool forks (see service.monitoring.sentry)
@worker_process_init.connect
def _init_sentry_worker(**_: Any) -> None:
    from service.monitoring import sentry

    sentry.init("worker")


@beat_init.connect
def _init_sentry_beat(**_: Any) -> None:
    from service.monitoring import sentry

    sentry.init("beat", beat_schedule=app.conf.beat_schedule)


@worker_init.connect
def _serve_metrics(**_: Any) -> None:
    """Serve the kit's own metrics from the worker's main process."""
    from service.monitoring.metrics import serve

    serve(load().metrics_port)


@worker_init.connect
def _declare_topology(**_: Any) -> None:
    """Declare the whole topology before consuming, so dead letters have somewhere to go."""
    from service.topology import connect, declare

    if not declare_topology_enabled():
        return  # least privilege: the topology comes from the broker's definitions
    try:
        conn = connect(load())
    except BrokerUnavailable as exc:
        logger.warning("topology not declared at start (%s); it will be on first dead letter", exc)
        return
    try:
        declare(conn)
    except TopologyConflict as exc:
        logger.critical("%s", exc)
        raise SystemExit(2) from None
    finally:
        conn.release()


@beat_init.connect
def _beat_setup(sender: Any = None, **_: Any) -> None:
    """Beat publishes with publisher confirms; its schedule file lives in KIT_STATE_DIR."""
    app.conf.broker_transport_options = {"confirm_publish": True}
    load().state_dir.mkdir(parents=True, exist_ok=True)
