"""What workers and replays write: retrying, dead-lettered/expired/revoked, replayed; the cancel check.

Called by the worker's main process (``service.worker.routing`` after a retry
or dead letter was published, ``service.worker.request`` before a task runs)
and by ``dlq replay``. Every call is best effort: it never raises and gives
up within ``store.BEST_EFFORT_TIMEOUT_S`` (then skips Redis for a while), so
a dead Redis never fails or holds up a retry, a dead letter or a task; the
state of that task is then not recorded (a warning says so). Without a Redis
KIT_RESULT_BACKEND every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from service import headers as h
from service import queues
from service.settings import Settings, load
from service.status.store import (
    BEST_EFFORT_TIMEOUT_S,
    CANCELLED,
    DEAD_LETTERED,
    EXPIRED,
    RETRYING,
    StateStore,
    now_iso,
)

#: The reason of a dead letter RabbitMQ made from a rejected message (x-death says ``rejected``), as
#: ``dlq list`` and ``status`` without a backend name it.
BROKER_REJECTED = "broker-rejected"

#: The stored status of a dead letter, by reason (any other reason: DEAD-LETTERED).
_STATUS_BY_REASON = {h.REASON_EXPIRED: EXPIRED, h.REASON_REVOKED: CANCELLED}

_worker_name = socket.gethostname()
_store: StateStore | None = None
_store_pid = 0
_max_replays = 0
_lock = threading.Lock()
_operator_stores: dict[str, StateStore | None] = {}


def set_worker_name(name: str) -> None:
    """The worker's node name (``w1@host``) to record with the states it writes (celeryd_init)."""
    global _worker_name
    if name:
        _worker_name = str(name)


def worker_store() -> StateStore | None:
    """This process's store (KIT_RESULT_BACKEND read once per process), None without a Redis backend."""
    global _store, _store_pid, _max_replays
    with _lock:
        if _store_pid != os.getpid():
            settings = load()
            _store = StateStore.from_settings(settings, timeout=BEST_EFFORT_TIMEOUT_S)
            _max_replays = settings.max_replays
            _store_pid = os.getpid()
        return _store


def _operator_store(settings: Settings) -> StateStore | None:
    """One store per backend URL in an operator's process (one connection for a whole replay)."""
    url = settings.result_backend
    with _lock:
        if url not in _operator_stores:
            _operator_stores[url] = StateStore.from_settings(settings, timeout=BEST_EFFORT_TIMEOUT_S)
        return _operator_stores[url]


def _error(failure: dict[str, Any]) -> str | None:
    kind, text = failure.get("exception_type"), failure.get("exception_message")
    if not kind:
        return None
    return f"{kind}: {text}" if text else str(kind)


def _task(headers: dict[str, Any]) -> tuple[str, str | None]:
    task_id, name = headers.get("id"), headers.get("task")
    return (task_id if isinstance(task_id, str) else ""), (str(name) if name else None)


def record_retrying(headers: dict[str, Any], delay_s: float, failure: dict[str, Any]) -> None:
    """A retry was scheduled: RETRYING with the attempt that failed, its error and when the next is due."""
    task_id, name = _task(headers)
    store = worker_store()
    if store is None or not task_id:
        return
    due = datetime.now(UTC) + timedelta(seconds=max(0.0, float(delay_s)))
    store.record(task_id, RETRYING, {"attempt": h.count(failure.get("attempts")) or 1, "error": _error(failure),
                                     "due_at": due.isoformat()}, name=name, worker=_worker_name)


def record_dead_lettered(headers: dict[str, Any], reason: str, failure: dict[str, Any], source_queue: str,
                         *, published: bool) -> None:
    """A dead letter was published (or, ``published`` False, the message rejected into the DLQ by RabbitMQ).

    EXPIRED for reason ``expired``, CANCELLED for ``revoked``, else DEAD-LETTERED;
    with the reason, the DLQ, the error and whether ``dlq replay`` takes it without --force.
    Not published, the reason is ``broker-rejected``, as the broker's dead letter (x-death only) and
    ``dlq list`` show it; ``note`` names the kit's. Once published as ``revoked``, the cancel mark is
    shortened to KIT_RESULT_EXPIRES (``StateStore.end_mark``).
    """
    task_id, name = _task(headers)
    store = worker_store()
    if store is None or not task_id:
        return
    details = {
        "reason": reason if published else BROKER_REJECTED,
        "dead_letter_queue": queues.dead_letter_queue_name(source_queue),
        "replayable": h.count(headers.get(h.REPLAYS)) < _max_replays,
        "attempt": h.count(failure.get("attempts")) or 1,
        "error": _error(failure),
    }
    if not published:
        details["note"] = (f"dead-lettered as {reason}, but the dead letter could not be published: the worker "
                           "rejected the message, so RabbitMQ dead-lettered it without the kit's headers "
                           f"(reason {BROKER_REJECTED})")
    store.record(task_id, _STATUS_BY_REASON.get(reason, DEAD_LETTERED), details, name=name, worker=_worker_name)
    if published and reason == h.REASON_REVOKED:
        store.end_mark(task_id)


def is_cancelled(task_id: str) -> bool:
    """Whether ``task_id`` carries a cancel mark. False without a backend, and when Redis cannot tell within
    store.MARK_CHECK_TIMEOUT_S: the task then runs (a cancel is not enforced while Redis is down: holding
    every task for an outage of the telemetry store would stop the service), with a warning naming it.
    Redis is asked again for every task; the store logs each check that failed."""
    store = worker_store()
    if store is None or not task_id:
        return False
    return bool(store.has_mark(task_id))  # None (logged there): not known, so it runs


def record_replayed(settings: Settings, letters: list[tuple[str, str]], *, before_publish: bool,
                    started_at: str = "") -> None:
    """``dlq replay``'s hook. Before the publish: clear the cancel marks of ``letters`` (task id, name), so
    a cancelled task that an operator replays runs. After it: REPLAYED, unless a worker already wrote a later
    state (one stamped at or after ``started_at``, the replay's ``replay_started()`` taken before the
    publish). Best effort, like every call here."""
    store = _operator_store(settings)
    if store is None or not letters:
        return
    if before_publish:
        store.clear_marks(task_id for task_id, _ in letters)
    else:
        store.record_replayed(letters, started_at)


def replay_started() -> str:
    """The moment a replay starts publishing, for ``record_replayed(started_at=...)``."""
    return now_iso()
