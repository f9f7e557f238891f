"""``revoke(task_id)``: cancel a task that has not run yet, durably.

A cancel is a mark in the result backend (``kit-revoked-<id>``, kept for ten
years plus KIT_RESULT_EXPIRES, the longest countdown and then some; shortened to
KIT_RESULT_EXPIRES once the task is dead-lettered: ``service.status.store``), not
Celery's revoke, which lives in each worker's memory and is forgotten on restart.
Every worker checks the mark before it runs a task
(``service.worker.request.ReliableRequest.revoked``): a cancelled task waiting
in its work queue, in a retry's wait queue or for its countdown never runs; the
worker that next receives it dead-letters it with reason ``revoked`` and its
state stays revoked. A task already running is not stopped: that run goes on
to its end, and it does not run again (a retry of it is dead-lettered). A
finished task is left alone. ``dlq replay`` of a revoked task clears its mark,
so the operator's replay runs it.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from service.errors import ResultBackendUnavailable
from service.settings import Settings, load
from service.status.lookup import from_meta, store_for
from service.status.model import TaskStatus, check_task_id

#: Why ``revoke`` needs a Redis backend.
NEEDS_BACKEND = ("cancelling a task needs a Redis result backend, where every worker looks for the cancel: set "
                 "KIT_RESULT_BACKEND=redis://host:6379/0 for the workers and for this process")


def revoke(task_id: str, settings: Settings | None = None) -> TaskStatus:
    """Cancel ``task_id``; returns its state after the cancel (revoked, or what it already was with a note).

    Raises InvalidTaskInput for a malformed id, ResultBackendUnavailable when
    KIT_RESULT_BACKEND is no Redis URL or Redis does not answer in time.
    """
    task_id = check_task_id(task_id)
    settings = settings or load()
    store = store_for(settings)
    if store is None:
        raise ResultBackendUnavailable(NEEDS_BACKEND)
    before = from_meta(task_id, *store.read(task_id))
    if before.final:
        return replace(before, note=f"already {before.state}: nothing to cancel")
    if before.state in ("running", "progress"):
        store.set_mark(task_id)
    else:
        store.cancel(task_id, {"reason": "revoked", "note": "cancelled: the worker that next receives it "
                               "dead-letters it as revoked instead of running it"}, name=before.name)
    return from_meta(task_id, *store.read(task_id))


async def arevoke(task_id: str, settings: Settings | None = None) -> TaskStatus:
    """``revoke`` for asyncio code (in a thread: the event loop never waits on Redis)."""
    return await asyncio.to_thread(revoke, task_id, settings)
