"""``status(task_id)``: a task's state from the result backend, else from what the broker shows.

With a Redis KIT_RESULT_BACKEND the answer is the task's result key
(``service.status.store``), read with one round trip and a deadline of
KIT_CONNECT_TIMEOUT (at most 10 s). With another Celery backend it is what
Celery stored there, read in a thread with the same deadline (whatever that
backend's client does). Without one, the dead-letter and wait queues are searched
(``service.status.broker``), and ``note`` says what that cannot tell. When the
backend has no record of the task (its record expired, or it was never
recorded), the queues are searched too: an old dead letter is still found.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from service.errors import KitError, ResultBackendUnavailable
from service.settings import Settings, load, redact_url
from service.status import broker
from service.status.model import TaskStatus, check_task_id
from service.status.store import (
    CANCELLED,
    DEAD_LETTERED,
    EXPIRED,
    QUEUED,
    REPLAYED,
    RETRYING,
    StateStore,
    redis_url,
)

#: The kit's states of the stored statuses that map one to one (Celery's own are handled apart).
_STATE_OF = {QUEUED: "queued", RETRYING: "retrying", DEAD_LETTERED: "dead-lettered", EXPIRED: "expired",
             CANCELLED: "revoked", REPLAYED: "replayed", "STARTED": "running", "PROGRESS": "progress",
             "SUCCESS": "succeeded"}

_stores: dict[tuple[str, int, float], StateStore] = {}
_celery_apps: dict[str, Any] = {}
_lock = threading.Lock()


def store_for(settings: Settings) -> StateStore | None:
    """The (shared, per backend URL) store of ``settings``' Redis backend; None for no Redis backend."""
    if redis_url(settings) is None:
        return None
    key = (settings.result_backend, settings.result_expires, min(settings.connect_timeout, 10.0))
    with _lock:
        if key not in _stores:
            store = StateStore.from_settings(settings)
            assert store is not None
            _stores[key] = store
        return _stores[key]


def status(task_id: str, settings: Settings | None = None) -> TaskStatus:
    """The state of ``task_id`` (see TaskStatus). Raises InvalidTaskInput for a malformed id,
    ResultBackendUnavailable when the backend does not answer in time, BrokerUnavailable when there is
    no backend and the broker cannot be reached."""
    task_id = check_task_id(task_id)
    settings = settings or load()
    if not settings.result_backend:
        return broker.look_up(task_id, settings)
    store = store_for(settings)
    if store is None:
        found = from_meta(task_id, _celery_meta(task_id, settings), marked=False)
    else:
        found = from_meta(task_id, *store.read(task_id))
    return _ask_the_broker(found, settings) if found.state == "unknown" else found


def _ask_the_broker(unknown: TaskStatus, settings: Settings) -> TaskStatus:
    """The backend has no record of the task: what the dead-letter and wait queues show, else ``unknown``
    with a note saying what was searched (a broker that cannot be reached is said, not raised)."""
    try:
        seen = broker.look_up(unknown.task_id, settings, why=broker.NOT_IN_BACKEND)
    except KitError as exc:
        return replace(unknown, note=f"{unknown.note}; the broker's queues could not be searched either ({exc})")
    return seen if seen.state != "unknown" else replace(unknown, note=f"{unknown.note}; {seen.note}")


async def astatus(task_id: str, settings: Settings | None = None) -> TaskStatus:
    """``status`` for asyncio code: runs in a thread, so the event loop never waits on Redis or the broker."""
    return await asyncio.to_thread(status, task_id, settings)


def _celery_meta(task_id: str, settings: Settings) -> dict[str, Any] | None:
    """What a non-Redis Celery backend stored for ``task_id`` (None for nothing).

    Read in a daemon thread, waited for KIT_CONNECT_TIMEOUT (at most 10 s): a
    backend whose client has no deadline of its own never hangs the caller.
    """
    url = settings.result_backend
    deadline = min(settings.connect_timeout, 10.0)
    answer: dict[str, Any] = {}

    def read() -> None:
        try:
            answer["meta"] = _celery_backend(url).get_task_meta(task_id)
        except Exception as exc:  # noqa: BLE001 - any backend's own errors: one line, below
            answer["error"] = exc

    reader = threading.Thread(target=read, name="kit-status-backend", daemon=True)
    reader.start()
    reader.join(deadline)
    if reader.is_alive():
        raise ResultBackendUnavailable(f"the result backend {redact_url(url)} did not answer within {deadline:g}s; "
                                       "is it running? (KIT_RESULT_BACKEND)")
    if "error" in answer:
        exc = answer["error"]
        raise ResultBackendUnavailable(
            f"the result backend {redact_url(url)} could not be read ({type(exc).__name__}: {exc}); "
            "check KIT_RESULT_BACKEND")
    meta = answer["meta"]
    return None if meta.get("status") == "PENDING" else meta


def _celery_backend(url: str) -> Any:
    """Celery's backend of ``url`` (one app per URL in this process; Celery makes a backend per thread)."""
    from celery import Celery

    with _lock:
        if url not in _celery_apps:
            _celery_apps[url] = Celery("kit-status", set_as_current=False, backend=url,
                                       config_source={"result_serializer": "json",
                                                      "result_accept_content": ["json"]})
        app = _celery_apps[url]
    return app.backend  # outside the lock: making it may connect, and hang


def _moment(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str) and value:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return None
    else:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _exception_text(result: Any) -> str | None:
    """"ExcType: message" of Celery's stored exception ({"exc_type", "exc_message"})."""
    if not isinstance(result, dict) or not result.get("exc_type"):
        return None
    message = result.get("exc_message")
    if isinstance(message, (list, tuple)):
        message = ", ".join(str(part) for part in message)
    return f"{result['exc_type']}: {message}" if message else str(result["exc_type"])


def from_meta(task_id: str, meta: dict[str, Any] | None, marked: bool) -> TaskStatus:
    """The TaskStatus of a stored meta (None: nothing stored) and cancel mark."""
    if meta is None:
        if marked:
            return TaskStatus(task_id=task_id, state="revoked", source="backend",
                              note="cancelled; no other record of it is left in the result backend")
        return TaskStatus(
            task_id=task_id, state="unknown", source="backend",
            note=("the result backend has no record of this id: it was never published through the kit (or "
                  "published while no result backend was set), or its record expired (KIT_RESULT_EXPIRES)"))
    stored = str(meta.get("status") or "")
    result = meta.get("result")
    details = result if isinstance(result, dict) else {}
    fields: dict[str, Any] = {
        "name": meta.get("name") or None,
        "worker": meta.get("worker") or None,
        "attempt": _count(details.get("attempt")) or _count(meta.get("attempt")),
        "updated_at": _moment(meta.get("updated_at")) or _moment(meta.get("date_done")),
        "source": "backend",
    }
    note: str | None = details.get("note") if isinstance(details.get("note"), str) else None
    state = _STATE_OF.get(stored)
    if stored == "STARTED":
        fields["worker"] = details.get("hostname") or fields["worker"]
    elif stored == "SUCCESS":
        fields["result"] = result
    elif stored in (RETRYING, DEAD_LETTERED, EXPIRED, CANCELLED):
        fields.update(error=details.get("error"), due_at=_moment(details.get("due_at")))
        if stored != RETRYING:
            fields.update(reason=details.get("reason"), dead_letter_queue=details.get("dead_letter_queue"),
                          replayable=bool(details.get("replayable")))
    elif stored == "FAILURE":  # not written by the kit's workers (a non-Redis backend, or another app)
        state, fields["error"] = "dead-lettered", _exception_text(result)
        note = "Celery recorded a failure but not where the task went: look in `python -m service dlq list`"
    elif stored == "RETRY":
        state, fields["error"] = "retrying", _exception_text(result)
        note = "Celery recorded a retry; when it is due is not known here"
    elif stored == "REVOKED":
        state, note = "revoked", "revoked through Celery, not the kit's cancel"
    if state == "progress" or state is None:  # PROGRESS, or a state of the task's own update_state
        fields["progress"] = result if isinstance(result, dict) else {"value": result}
        if state is None:
            state, note = "progress", f"the task reports its own state {stored!r}"
    if marked and state in ("queued", "retrying", "replayed"):
        note = "cancelled: the worker that next receives it dead-letters it as revoked instead of running it"
    elif marked and state in ("running", "progress"):
        note = "cancel asked while it runs: this run goes on to its end; it will not run again"
    return TaskStatus(task_id=task_id, state=state, note=note, **fields)
