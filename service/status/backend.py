"""The workers' result backend: Celery's Redis backend, with the kit's rules for what it writes.

Imported by ``service.app`` only (it imports Celery). ``celery_config`` is the
Celery configuration of KIT_RESULT_BACKEND; with a Redis URL the backend class
is ``KitRedisBackend``, which differs from Celery's in three ways:

- it does not store FAILURE, RETRY and REVOKED. In the kit a failed run is
  always retried or dead-lettered by the worker's main process, which records
  that itself (``service.status.recorder``) AFTER the pool's write; Celery's own
  writes of these states (the pool's trace, a worker-lost or hard-time-limit
  failure, an expired task's REVOKED, all in the main process too) would
  otherwise land after the kit's and leave a wrong final state;
- a write that fails (Redis down or slow, BACKEND_TIMEOUT_S) is logged and
  skipped instead of raised: Celery would turn it into a failure of the task,
  and the kit into a retry, so a Redis outage would re-run tasks that
  succeeded. After a failure the process skips the backend for
  PAUSE_AFTER_FAILURE_S (one timeout per outage, not two per task);
- every write carries ``name``, ``worker``, ``attempt`` and ``updated_at``
  (Celery keeps the first two only with ``result_extended``, which also stores
  the arguments).

Other backends Celery knows work as Celery makes them (status then shows only
Celery's states, and ``task cancel`` needs Redis).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import states
from celery.backends.redis import RedisBackend

from service.settings import Settings, redact_url
from service.status.store import PAUSE_AFTER_FAILURE_S, now_iso, redis_url

logger = logging.getLogger(__name__)

#: Celery's states the kit records itself (see the module docstring).
DROPPED_STATES = frozenset({states.FAILURE, states.RETRY, states.REVOKED})
#: Seconds a worker's write to the result backend may take to connect, and to be answered.
BACKEND_TIMEOUT_S = 2.0


class KitRedisBackend(RedisBackend):
    """Celery's RedisBackend that leaves failures to the kit and never fails a task over a failed write."""

    _paused_until = 0.0

    def store_result(self, task_id: Any, result: Any, state: str, traceback: Any = None, request: Any = None,
                     **kwargs: Any) -> Any:
        """Store ``state`` unless it is one of DROPPED_STATES; log (do not raise) when Redis fails."""
        if state in DROPPED_STATES or time.monotonic() < self._paused_until:
            return result
        try:
            return super().store_result(task_id, result, state, traceback, request=request, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a state is telemetry; the task's outcome is the broker's
            self._paused_until = time.monotonic() + PAUSE_AFTER_FAILURE_S
            logger.warning("could not store state %s of task %s in the result backend %s (%s: %s); tasks go on, "
                           "their states are not stored for the next %gs", state, task_id,
                           redact_url(self.url or ""), type(exc).__name__, exc, PAUSE_AFTER_FAILURE_S)
            return result

    def _get_result_meta(self, result: Any, state: str, traceback: Any, request: Any, format_date: bool = True,
                         encode: bool = False) -> dict[str, Any]:
        meta = super()._get_result_meta(result, state, traceback, request, format_date=format_date, encode=encode)
        if request is not None:
            meta.setdefault("name", getattr(request, "task", None))
            meta.setdefault("worker", getattr(request, "hostname", None))
            retries = getattr(request, "retries", None)
            if isinstance(retries, int) and not isinstance(retries, bool):
                meta["attempt"] = retries + 1
        meta["updated_at"] = now_iso()
        return meta


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery's result settings for KIT_RESULT_BACKEND: none stored when it is empty."""
    if not settings.result_backend:
        return {"task_ignore_result": True, "task_track_started": False}
    url = settings.result_backend
    if redis_url(settings):
        url = f"{KitRedisBackend.__module__}:{KitRedisBackend.__name__}+{url}"
    return {
        "result_backend": url,
        "result_expires": settings.result_expires,
        "task_ignore_result": False,
        # STARTED, with the worker's hostname and pid: `task status` says running, and where.
        "task_track_started": True,
        "result_backend_always_retry": False,
        # Celery's Redis defaults wait 120 s per answer and retry a write 20 times: a dead
        # Redis would hold every task for minutes.
        "redis_socket_timeout": BACKEND_TIMEOUT_S,
        "redis_socket_connect_timeout": BACKEND_TIMEOUT_S,
        "redis_retry_on_timeout": False,
        "result_backend_transport_options": {"retry_policy": {"max_retries": 0}},
    }
