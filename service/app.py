"""The Celery application of workers and beat, configured from the environment.

Everything that keeps messages from being lost or looped is set here; the
design notes explain each choice. Workers are started with
``python -m service worker`` (or ``celery -A service.app worker``) and consume
the work queues of ``service.queues`` only: dead-letter and wait queues are not
in ``task_queues``, so no worker ever consumes them.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import beat_init, celeryd_init, worker_init, worker_process_init
from kombu import Exchange
from kombu import Queue as KombuQueue

from service import queues, startup
from service.errors import InvalidTaskInput
from service.settings import ConfigError, Settings, load, redact_url
from service.status.backend import celery_config
from service.worker.lanes import LaneAMQP, NativeDelayedDeliveryWarning

logger = logging.getLogger(__name__)

#: The kit's own task modules; KIT_TASK_MODULES adds more.
TASK_MODULES = (
    "service.tasks.emails",
    "service.tasks.reports",
    "service.tasks.webhooks",
    "service.tasks.maintenance",
    "service.tasks.work_logs",
    "service.tasks.notifications",
)


class TaskRouter:
    """Celery router: the queue the caller named, else ``queues.TASK_ROUTES`` (shared with the client).

    An explicit ``queue=`` (``apply_async``, ``send_task``, ``@app.task(queue=...)``)
    or ``routing_key=`` wins; one that is not a kit work queue raises
    InvalidTaskInput before anything is sent (a routing key nothing is bound to
    would be dropped by the broker). Names the task exchange too: otherwise Celery
    publishes through the default exchange (amq.default), which the broker's
    publisher user may not write to. On the quorum profile a task of high or
    critical priority goes to its work queue's high lane.
    """

    def __init__(self, profile: queues.Topology) -> None:
        self.profile = profile

    def __call__(self, name: str, args: Any, kwargs: Any, options: Any, task: Any = None,
                 **kw: Any) -> dict[str, str]:
        """The queue, exchange and routing key of one task."""
        options = options or {}
        queue = _queue_asked_for(options) or queues.queue_for_task(name)
        priority = options.get("priority")
        if not isinstance(priority, int) or isinstance(priority, bool):
            priority = queues.PRIORITIES[queues.DEFAULT_PRIORITY]
        return {"queue": queue, "exchange": queues.TASK_EXCHANGE,
                "routing_key": self.profile.routing_key(queue, priority)}


#: The router of the classic profile (``make_app`` builds the app's own from KIT_QUEUE_TYPE).
route_task = TaskRouter(queues.topology())


def _queue_asked_for(options: dict[str, Any]) -> str | None:
    asked = options.get("queue")
    queue = asked.name if isinstance(asked, KombuQueue) else asked
    key = options.get("routing_key")
    try:
        if queue:
            queues.work_queue(str(queue))
        if key:
            queues.work_queue(str(key))
    except ValueError as exc:
        raise InvalidTaskInput(f"{exc}: the kit's task exchange routes by work queue name") from None
    if queue and key and key != queue:
        raise InvalidTaskInput(f"queue={queue!r} and routing_key={key!r} disagree; name the work queue once")
    return str(queue or key) if (queue or key) else None


#: Celery's own environment variables for what the kit configures from KIT_* settings.
CELERY_ENVIRONMENT = ("CELERY_BROKER_URL", "CELERY_BROKER_READ_URL", "CELERY_BROKER_WRITE_URL",
                      "CELERY_RESULT_BACKEND")


def check_one_source_of_configuration(settings: Settings) -> None:
    """Refuse Celery's own broker variables when they disagree with the kit's settings.

    Celery lets CELERY_BROKER_URL override its configuration, so a tutorial's
    compose file would move the workers to another broker while the client,
    ``dlq`` and ``topology`` stay on KIT_BROKER_URL. A value equal to the kit's
    broker is harmless; any other is a ConfigError naming both.
    """
    for name in CELERY_ENVIRONMENT:
        value = os.environ.get(name, "").strip()
        if not value:
            continue
        if name == "CELERY_RESULT_BACKEND":
            if value == settings.result_backend:
                continue
            raise ConfigError(
                f"{name}={redact_url(value)!r} is set, but the kit's workers store no results there: "
                "unset it and set KIT_RESULT_BACKEND (which `task status` and `task cancel` read too)")
        if value not in (settings.broker_url, os.environ.get("KIT_BROKER_URL", "").strip()):
            raise ConfigError(
                f"{name}={redact_url(value)!r} disagrees with KIT_BROKER_URL={redact_url(settings.broker_url)!r}: "
                "every part of the kit (workers, beat, client, dlq, topology) reads KIT_BROKER_URL and "
                f"KIT_BROKER_PASSWORD_FILE; unset {name} or set KIT_BROKER_URL to the broker you mean")


def kit_beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The kit's own beat entries: the periodic clean-up of report exports."""
    return {
        "maintenance.cleanup_reports": {
            "task": "maintenance.cleanup_reports",
            "schedule": settings.cleanup_interval,
            "options": {"priority": queues.PRIORITIES["low"]},
        },
    }


def make_app() -> Celery:
    """Build the Celery app from the current environment."""
    settings = load()
    check_one_source_of_configuration(settings)
    # KIT_DECLARE_TOPOLOGY=false: the queues come from the broker's definitions and
    # the worker's user may not declare them (service.broker), so never try.
    no_declare = not settings.declare_topology
    profile = queues.topology(settings.queue_type)
    tasks = queues.exchange(queues.TASK_EXCHANGE)
    task_exchange = Exchange(tasks.name, type=tasks.type, durable=True, arguments=dict(tasks.arguments),
                             no_declare=no_declare)
    if profile.lanes:
        logging.getLogger("celery.app.base").addFilter(NativeDelayedDeliveryWarning())
    # LaneAMQP: a worker of a work queue consumes its high lane too (quorum profile).
    app = Celery("service", task_cls="service.worker.task:ReliableTask", amqp=LaneAMQP)
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
            # Quorum queues in the list also make Celery use per-consumer QoS
            # (worker_detect_quorum_queues), which quorum queues need.
            for q in profile.work_queues + profile.lanes
        ],
        task_default_queue=queues.DEFAULT_QUEUE,
        task_default_exchange=queues.TASK_EXCHANGE,
        task_default_exchange_type="direct",
        task_default_routing_key=queues.DEFAULT_QUEUE,
        task_routes=(TaskRouter(profile),),
        task_create_missing_queues=False,
        # Quorum queues refuse x-max-priority: their priorities are the high lanes.
        task_queue_max_priority=None if profile.lanes else queues.MAX_PRIORITY,
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
        # KIT_RESULT_BACKEND: states and results (service.status.backend), or none stored.
        **celery_config(settings),
        # Task events feed celery-exporter and Flower.
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=True,
        worker_log_color=False,
        imports=TASK_MODULES + settings.task_modules,
        enable_utc=True,
        timezone=settings.timezone,
        beat_schedule_filename=str(settings.state_dir / "celerybeat-schedule"),
        # Several beats may run: the one holding the schedule lease on the broker sends (service.beat).
        beat_scheduler="service.beat.scheduler:LeasedScheduler",
        beat_schedule=kit_beat_schedule(settings),
    )
    return app


def _run_by_celery_command() -> bool:
    """Whether this process is the ``celery`` command (``celery -A service.app ...``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return (spec is not None and spec.name == "celery.__main__") or Path(sys.argv[0]).name == "celery"


def _make_app_or_exit() -> Celery:
    try:
        return make_app()
    except ConfigError as exc:
        if not _run_by_celery_command():
            raise
        startup.exit_with(exc)  # one line instead of Celery's "Unable to load celery application" traceback


app = _make_app_or_exit()


def add_beat_entry(name: str, task: str, schedule: Any, *, args: tuple[Any, ...] = (),
                   kwargs: dict[str, Any] | None = None, **options: Any) -> None:
    """Add a periodic task to beat's schedule, beside the kit's own entries.

    Call it from a module in KIT_TASK_MODULES; ``schedule`` is seconds, a
    ``timedelta`` or a ``celery.schedules.crontab`` (in KIT_TIMEZONE).
    ``options`` are ``apply_async`` options (``queue``, ``priority``, ...).
    Raises ValueError for a name the kit uses. ``app.conf.beat_schedule.update()``
    works too; assigning a new dict to ``app.conf.beat_schedule`` drops the kit's
    entries (beat then logs a warning naming them).
    """
    if name in kit_beat_schedule(load()):
        raise ValueError(f"beat entry {name!r} is the kit's own; choose another name")
    app.conf.beat_schedule[name] = {"task": task, "schedule": schedule, "args": tuple(args),
                                    "kwargs": dict(kwargs or {}), "options": options}


@celeryd_init.connect  # worker only, before Celery prints anything or connects
def _check_worker_start(options: dict[str, Any] | None = None, **_: Any) -> None:
    """Queues known, broker lets us in, topology declared (or present): else one line and exit 2.

    Declares the whole topology before consuming, so dead letters have somewhere to go.
    """
    startup.run_or_exit(lambda: startup.check_worker((options or {}).get("queues")))


@celeryd_init.connect
def _name_the_worker(sender: Any = None, **_: Any) -> None:
    """The states a worker records name it as Celery does (``w1@host``)."""
    from service.status.recorder import set_worker_name

    set_worker_name(str(sender or ""))


@beat_init.connect  # connected first: runs before the other beat_init receivers
def _check_beat_start(**_: Any) -> None:
    """The broker lets beat's user in: else one line and exit 2 (not silence until the first schedule)."""
    startup.run_or_exit(startup.check_beat)


@beat_init.connect
def _warn_about_dropped_beat_entries(**_: Any) -> None:
    """A user module that replaced ``beat_schedule`` wholesale dropped the kit's entries: say which."""
    dropped = sorted(set(kit_beat_schedule(load())) - set(app.conf.beat_schedule or {}))
    if dropped:
        logger.warning(
            "app.conf.beat_schedule was replaced, which dropped the kit's beat entries %s: they will not run. "
            "Add entries with service.app.add_beat_entry(...) or app.conf.beat_schedule.update(...) instead.",
            ", ".join(dropped))


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


@beat_init.connect
def _beat_setup(sender: Any = None, **_: Any) -> None:
    """Beat publishes with publisher confirms; its schedule file lives in KIT_STATE_DIR."""
    app.conf.broker_transport_options = {"confirm_publish": True}
    load().state_dir.mkdir(parents=True, exist_ok=True)
