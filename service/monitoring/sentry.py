"""Sentry for workers, beat and the client: off unless SENTRY_DSN is set.

Where it is initialised (see ``service.app`` and ``service.client``):

- workers: ``worker_init``, in the main process BEFORE the prefork pool forks.
  sentry-sdk's CeleryIntegration patches ``celery.app.trace.build_tracer``, and
  each pool process builds its tracers while it starts, before
  ``worker_process_init`` is sent: initialised there only, no task would be
  instrumented. ``worker_process_init`` then gives each pool process a client
  of its own (a fresh HTTP connection pool: a process forked after the main
  process sent an event would otherwise share its keep-alive socket).
- beat: ``beat_init``. CeleryIntegration(monitor_beat_tasks=True) sends the
  ``in_progress`` check-in of a Sentry Crons monitor from beat and puts the
  monitor in the task's headers; the worker that runs the task sends ``ok`` or
  ``error``. So Crons need the integration in beat AND in the workers.
- the client: on first use, unless the host process (the web app) initialised
  Sentry itself. Its own ``sentry_sdk.init`` is never replaced.

The integration reports an exception raised by a task in the pool process, but
not the kit's retries (Retry) and nothing that is decided in the worker's main
process (time limits, lost workers, unknown tasks, ...). So ``routing.dead_letter``
reports every dead letter explicitly with ``capture_dead_letter``, grouped by
task and exception type; the integration's own event for the same failure gets
the same fingerprint, so one broken task is one Sentry issue.

Task arguments carry e-mail addresses and tokens: unless SENTRY_SEND_TASK_ARGS
is true, they are replaced by ``[Filtered]`` and local variables are not sent.
An exception's message is sent as it is: do not put secrets in it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import sentry_sdk

from service import headers as h
from service.settings import Settings, load

logger = logging.getLogger(__name__)

FILTERED = "[Filtered]"
FINGERPRINT_PREFIX = "kit-dead-letter"
#: Keys whose values are task arguments, wherever they appear in an event.
_ARGUMENT_KEYS = frozenset({"args", "kwargs", "argsrepr", "kwargsrepr"})
_TRACE_HEADERS = ("sentry-trace", "baggage")

_lock = threading.Lock()
_client: Any = None  # the sentry_sdk client this module created, if any
_client_pid = 0
_options: dict[str, Any] = {}


def fingerprint(task: str, exception_type: str) -> list[str]:
    """The grouping of a dead letter: one Sentry issue per task and exception type."""
    return [FINGERPRINT_PREFIX, task, exception_type]


def client_options(settings: Settings) -> dict[str, Any]:
    """The ``sentry_sdk.init`` keyword arguments the kit uses (SENTRY_DSN must be set)."""
    from sentry_sdk.integrations.celery import CeleryIntegration

    send_args = settings.sentry_send_task_args

    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        return prepare_event(event, hint, scrub=not send_args)

    def before_send_transaction(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        return scrub_event(event) if not send_args else event

    options: dict[str, Any] = {
        "dsn": settings.sentry_dsn,
        "environment": settings.sentry_environment or None,
        "release": settings.sentry_release or None,
        "traces_sample_rate": settings.sentry_traces_sample_rate,
        "integrations": [CeleryIntegration(monitor_beat_tasks=True)],
        "before_send": before_send,
        "before_send_transaction": before_send_transaction,
    }
    if send_args:
        # What the integration reads to add task arguments (sentry-sdk >= 2.7x;
        # it also turns off the SDK's default EventScrubber).
        options["data_collection"] = {"queues": True, "stack_frame_variables": True, "user_info": False}
    else:
        # send_default_pii stays unset, which means False: setting it is deprecated
        # in sentry-sdk 2.75 (a DeprecationWarning in every process).
        options["include_local_variables"] = False  # a task's locals are its arguments
    return options


def init(role: str, settings: Settings | None = None, *, beat_schedule: Mapping[str, Any] | None = None) -> bool:
    """Initialise Sentry for ``role`` (worker, beat or client) unless it is off or already on.

    Returns True when this call initialised it. Never raises: a Sentry problem
    must not stop a worker, beat or a publish. ``beat_schedule`` (beat only) is
    checked for intervals Sentry Crons cannot monitor.
    """
    global _client, _client_pid, _options
    try:
        settings = settings or load()
        if not settings.sentry_dsn:
            return False
        for name in unmonitored(beat_schedule or {}):
            logger.warning("beat schedule %r is not monitored by Sentry Crons: its interval is not "
                           "a whole number of minutes", name)
        with _lock:
            current = sentry_sdk.get_client()
            ours = _client is not None and current is _client
            if ours and _client_pid == os.getpid():
                return False  # done already in this process
            if current.is_active() and not ours:
                return False  # the host application's own Sentry: leave it alone
            # First time, or a process forked from one we initialised: a client of its own.
            options = _options if ours else client_options(settings)
            sentry_sdk.init(**options)
            sentry_sdk.get_global_scope().set_tag("kit.role", role)
            _no_error_check_in_on_retry()
            _client, _client_pid, _options = sentry_sdk.get_client(), os.getpid(), options
            return True
    except Exception:  # noqa: BLE001 - Sentry must never break the kit
        logger.warning("could not initialise Sentry", exc_info=True)
        return False


def unmonitored(beat_schedule: Mapping[str, Any]) -> list[str]:
    """Names of beat schedule entries whose interval Sentry Crons skips (under a minute, or not whole minutes).

    sentry-sdk skips them with a warning that only shows with ``debug=True``.
    """
    names = []
    for name, entry in beat_schedule.items():
        every = entry.get("schedule") if isinstance(entry, Mapping) else None
        every = getattr(every, "run_every", every)  # celery.schedules.schedule
        seconds = every.total_seconds() if isinstance(every, timedelta) else every
        if isinstance(seconds, (int, float)) and (seconds < 60 or seconds % 60):
            names.append(name)
    return names


def _no_error_check_in_on_retry() -> None:
    """Keep a Crons check-in in progress while the kit retries the task.

    The integration sends an ``error`` check-in on every Celery Retry, and Sentry
    does not reopen a finished check-in: a scheduled task that succeeds on its
    second try would show as failed. The kit's retry runs the same message (same
    check-in id) again, so its final ``ok`` or ``error`` is what counts.
    """
    from celery.signals import task_retry
    from sentry_sdk.integrations.celery.beat import crons_task_retry

    task_retry.disconnect(crons_task_retry)


def trace_headers() -> dict[str, Any]:
    """Headers that continue the current Sentry trace in the task (empty when Sentry is off).

    sentry-sdk adds these in ``Task.apply_async``, which the kit's client does
    not use. Celery passes the nested ``headers`` entry to the worker as
    ``task.request.headers``, where the integration looks for them.
    """
    try:
        client = sentry_sdk.get_client()
        if not client.is_active():
            return {}
        integration = client.get_integration("celery")
        if integration is not None and not integration.propagate_traces:
            return {}
        found = {k: v for k, v in zip(_TRACE_HEADERS, (sentry_sdk.get_traceparent(), sentry_sdk.get_baggage()),
                                      strict=True) if v}
        return {**found, "headers": dict(found)} if found else {}
    except Exception:  # noqa: BLE001 - never break a publish
        logger.debug("no Sentry trace headers", exc_info=True)
        return {}


def capture_dead_letter(headers: Mapping[str, Any], *, published: bool = True) -> str | None:
    """Report a dead letter to Sentry; returns the event id (None when Sentry is off).

    ``headers`` are the dead letter's headers (with the kit-* failure headers).
    Task arguments are never sent. Never raises.
    """
    try:
        if not sentry_sdk.get_client().is_active():
            return None
        task = str(headers.get("task") or "<unknown task>")
        exc_type = str(headers.get(h.EXCEPTION_TYPE) or "UnknownError")
        reason = str(headers.get(h.REASON) or "")
        queue = str(headers.get(h.SOURCE_QUEUE) or "")
        module, _, name = exc_type.rpartition(".")
        details = {
            "task_id": headers.get("id"),
            "queue": queue,
            "reason": reason,
            "attempts": headers.get(h.ATTEMPTS),
            "worker_lost": headers.get(h.WORKER_LOST),
            "first_failure_at": headers.get(h.FIRST_FAILURE_AT),
            "last_failure_at": headers.get(h.LAST_FAILURE_AT),
            "dead_lettered_at": headers.get(h.DEAD_LETTERED_AT),
            "worker": headers.get(h.WORKER),
            # False: the kit could not publish it; RabbitMQ dead-lettered it without the kit-* headers.
            "published_with_reason": published,
            "traceback": headers.get(h.TRACEBACK) or "",
        }
        event: dict[str, Any] = {
            "level": "error",
            "logger": "service.dead_letters",
            "transaction": task,
            "fingerprint": fingerprint(task, exc_type),
            "tags": {"task": task, "queue": queue, "reason": reason, "celery_task_id": str(headers.get("id") or "")},
            "exception": {"values": [{
                "type": name,
                "module": module or None,
                "value": str(headers.get(h.EXCEPTION_MESSAGE) or ""),
                "mechanism": {"type": "kit.dead_letter", "handled": False},
            }]},
            "contexts": {"dead_letter": {k: v for k, v in details.items() if v is not None}},
        }
        with sentry_sdk.isolation_scope() as scope:
            # The main process's breadcrumbs are about other tasks.
            scope.clear_breadcrumbs()
            incoming = {k: headers[k] for k in _TRACE_HEADERS if isinstance(headers.get(k), str)}
            if incoming:
                sentry_sdk.continue_trace(incoming)  # link it to the trace that published the task
            event_id = sentry_sdk.capture_event(event)
            _close_check_in(headers)
            return event_id
    except Exception:  # noqa: BLE001 - Sentry must never break task handling
        logger.warning("could not report a dead letter to Sentry", exc_info=True)
        return None


def _close_check_in(headers: Mapping[str, Any]) -> None:
    """A dead-lettered beat task failed its Crons check-in, also when no pool process could say so.

    (Time limits, lost workers and unknown tasks are decided in the main process,
    where Celery's task_failure signal, which the integration listens to, is not sent.)
    """
    nested = headers.get("headers") if isinstance(headers.get("headers"), Mapping) else {}
    monitor = {**nested, **headers}
    slug, check_in_id = monitor.get("sentry-monitor-slug"), monitor.get("sentry-monitor-check-in-id")
    if not slug or not check_in_id:
        return
    from sentry_sdk.crons import MonitorStatus, capture_checkin

    started = monitor.get("sentry-monitor-start-timestamp-s")
    try:
        duration = time.time() - float(started) if started else None
    except (TypeError, ValueError):
        duration = None
    config = monitor.get("sentry-monitor-config")
    capture_checkin(monitor_slug=str(slug), check_in_id=str(check_in_id), status=MonitorStatus.ERROR,
                    duration=duration, monitor_config=config if isinstance(config, Mapping) and config else None)


# -- before_send ------------------------------------------------------------------


def prepare_event(event: dict[str, Any], hint: dict[str, Any] | None, *, scrub: bool = True) -> dict[str, Any]:
    """``before_send``: group a task's failure with its dead letter; scrub task arguments."""
    try:
        job = (event.get("extra") or {}).get("celery-job")
        exc_info = (hint or {}).get("exc_info")
        if isinstance(job, dict) and job.get("task_name") and exc_info and exc_info[1] is not None:
            # The integration's event for an exception a task raised in its pool
            # process: under ReliableTask only a final failure gets there (retries
            # are Retry), and the main process dead-letters it.
            task = str(job["task_name"])
            event["fingerprint"] = fingerprint(task, h.exception_type_name(exc_info[1]))
            event.setdefault("tags", {})["task"] = task
    except Exception:  # noqa: BLE001
        logger.debug("could not group a Sentry event", exc_info=True)
    return scrub_event(event) if scrub else event


def scrub_event(event: dict[str, Any]) -> dict[str, Any]:
    """Replace task arguments (args, kwargs, argsrepr, kwargsrepr) in an event by ``[Filtered]``.

    Looks where Celery and the kit put them: ``extra`` (the integration's
    ``celery-job``), the parameters of a log message, and breadcrumb data.
    """
    if isinstance(event.get("extra"), dict):
        event["extra"] = _scrubbed(event["extra"])
    logentry = event.get("logentry")
    if isinstance(logentry, dict) and logentry.get("params"):
        params = _scrubbed(logentry["params"])
        if params != logentry["params"]:
            logentry["params"] = params
            try:
                logentry["formatted"] = logentry["message"] % (params if isinstance(params, dict) else tuple(params))
            except (TypeError, ValueError, KeyError):
                logentry["formatted"] = str(logentry.get("message") or "")
    crumbs = event.get("breadcrumbs")
    values = crumbs.get("values") if isinstance(crumbs, dict) else crumbs
    for crumb in values if isinstance(values, list) else ():
        if isinstance(crumb, dict) and isinstance(crumb.get("data"), dict):
            crumb["data"] = _scrubbed(crumb["data"])
    return event


def _scrubbed(value: Any, depth: int = 0) -> Any:
    if depth > 8:
        return value
    if isinstance(value, Mapping):
        return {k: FILTERED if k in _ARGUMENT_KEYS else _scrubbed(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_scrubbed(v, depth + 1) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    return value
