"""Task status and cancel: what happened to a published task, from one place.

What lives here: ``model`` (``TaskStatus``, ``STATES``), ``store`` (the
states in Redis: Celery's result key, the kit's statuses, cancel marks),
``lookup`` (``status``), ``broker`` (the answer without a result backend, from
the dead-letter and wait queues), ``revoke`` (``revoke``: a durable cancel),
``marks`` (``QueuedMarker``: publishers record "queued"), ``recorder`` (what
workers and ``dlq replay`` record) and ``backend`` (the workers' Celery result
backend; imported by ``service.app`` only, the rest never imports Celery).
Import the names below from ``service.status`` (``service.client`` re-exports
``status`` and ``revoke``).

May import: ``service.settings``, ``service.errors``, ``service.headers``,
``service.queues``, ``service.connection``, ``service.deadletters``. Never the
command line or the worker; the worker imports ``recorder``.
"""

from service.status.lookup import astatus, status
from service.status.marks import QueuedMarker
from service.status.model import FINAL_STATES, STATES, TaskStatus, check_task_id
from service.status.revoke import arevoke, revoke

__all__ = ["FINAL_STATES", "STATES", "QueuedMarker", "TaskStatus", "arevoke", "astatus", "check_task_id",
           "revoke", "status"]
