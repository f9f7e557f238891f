"""The base class of every task: acks late, retries through the broker.

Per-task settings (class attributes or ``@app.task(...)`` options):

- ``max_retries``: retries before the task is dead-lettered; None means
  KIT_MAX_RETRIES. Unlimited retries are not offered: every task ends somewhere.
- ``permanent_exceptions``: exception classes that are never retried
  (``service.errors.PermanentError`` never is either).
- ``retry_delay_base`` / ``retry_delay_max``: seconds; None means the
  KIT_RETRY_BACKOFF_* settings.
- ``max_worker_lost``: deliveries that may kill the worker process before the
  message counts as poison; None means KIT_MAX_WORKER_LOST.

``self.retry(countdown=...)`` works as in Celery but publishes nothing from the
task: the worker's main process moves the message to a wait queue.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, ClassVar

from celery import Task
from celery.exceptions import Ignore, Reject, Retry

from service import headers as h
from service.retry_policy import Policy, decide
from service.settings import load


def arguments_do_not_fit(task: Task, exc: BaseException, args: Any, kwargs: Any) -> bool:
    """True when ``exc`` is the TypeError of calling ``task`` with arguments its signature refuses."""
    if not isinstance(exc, TypeError):
        return False
    try:
        inspect.signature(task.run).bind(*(args or ()), **(kwargs or {}))
    except TypeError:
        return True
    except (ValueError, AttributeError):
        return False
    return False


class ReliableTask(Task):
    """Celery Task with the kit's delivery guarantees (see the module docstring)."""

    Request = "service.worker.request:ReliableRequest"
    acks_late = True
    reject_on_worker_lost = True
    max_retries: int | None = None
    permanent_exceptions: ClassVar[tuple[type[BaseException], ...]] = ()
    retry_delay_base: float | None = None
    retry_delay_max: float | None = None
    max_worker_lost: int | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task; turn a retryable exception into a Retry with its backoff delay.

        Deciding here, in the pool process, makes Celery log and count the run
        as retried rather than failed. The worker's main process then moves the
        message to a wait queue (see service.worker.request).
        """
        try:
            return super().__call__(*args, **kwargs)
        except (Retry, Ignore, Reject):
            raise
        except Exception as exc:
            permanent = h.REASON_INVALID_ARGUMENTS if arguments_do_not_fit(self, exc, args, kwargs) else None
            decision = decide(self.retry_policy(), exc, retries=self.request.retries or 0, permanent_reason=permanent)
            if not decision.retry:
                raise
            raise Retry(exc=exc, when=round(decision.delay_s, 3)) from exc

    def retry_policy(self) -> Policy:
        """This task's retry settings, with the environment's defaults filled in."""
        settings = load()
        return Policy(
            max_retries=settings.max_retries if self.max_retries is None else int(self.max_retries),
            backoff_base_s=self.retry_delay_base or settings.retry_backoff_base,
            backoff_max_s=self.retry_delay_max or settings.retry_backoff_max,
            max_worker_lost=self.max_worker_lost or settings.max_worker_lost,
            permanent_exceptions=tuple(self.permanent_exceptions),
        )

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: Any = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Retry:
        """Ask for a retry; the worker schedules it in a broker wait queue.

        Unlike Celery's own ``retry``, nothing is published from here and no
        ETA message is held by the worker. ``args``/``kwargs`` changes are not
        supported: the same message runs again.
        """
        if exc is None:
            exc = sys.exc_info()[1]
        reason = Retry(exc=exc, when=countdown)
        if throw:
            raise reason
        return reason
