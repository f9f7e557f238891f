"""The worker's request handler: decides, in the main process, how a run ended.

Celery's defaults lose or loop messages here (see the design notes): a failed
late-acked task is acked and gone, a hard time limit can requeue forever, a
poison message that kills its process is redelivered forever. This handler
instead, for every failure:

1. asks ``retry_policy.decide`` whether to retry or give up;
2. publishes the message, confirmed, to a wait queue or to the dead-letter
   queue with the failure in its headers;
3. only then acks the original. If that publish failed, it rejects the
   original without requeue, so RabbitMQ dead-letters it by itself.
"""

from __future__ import annotations

import logging
from typing import Any

from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from celery.exceptions import Ignore, Reject, Retry, Terminated, TimeLimitExceeded, WorkerLostError
from celery.utils.saferepr import saferepr
from celery.utils.serialization import UnpickleableExceptionWrapper
from celery.worker import state
from celery.worker.request import Request

from service import headers as h
from service.monitoring import metrics
from service.retry_policy import decide
from service.worker import routing
from service.worker.task import arguments_do_not_fit

logger = logging.getLogger(__name__)


def _unwrap(exc: BaseException) -> BaseException:
    return exc.exc if isinstance(exc, ExceptionWithTraceback) else exc


def _was_unpicklable(exc: BaseException) -> bool:
    return isinstance(exc, UnpickleableExceptionWrapper)


def _type_name(exc: BaseException) -> str:
    """The exception's class name, also when Celery wrapped it because it could not be pickled."""
    if isinstance(exc, UnpickleableExceptionWrapper):
        module = exc.exc_module
        return exc.exc_cls_name if module == "builtins" else f"{module}.{exc.exc_cls_name}"
    return h.exception_type_name(exc)


class ReliableRequest(Request):
    """Celery Request that retries through the broker and dead-letters with reasons."""

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        """A pool process took the task: record how long it waited in its queue."""
        super().on_accepted(pid, time_accepted)
        try:
            metrics.observe_start(routing.source_queue(self._message), self.name, self._message.headers or {})
        except Exception:  # noqa: BLE001 - metrics must never break task handling
            logger.debug("could not record queue wait", exc_info=True)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        """Hard time limit: dead-letter with reason ``time-limit``, then let Celery ack."""
        if not soft and self.task.acks_late and not self.acknowledged and not state.should_terminate:
            self._finish(
                TimeLimitExceeded(timeout),
                traceback=f"TimeLimitExceeded: hard time limit ({timeout}s) exceeded",
                permanent_reason=h.REASON_TIME_LIMIT,
                events=False,  # Celery's own on_timeout sends task-failed
            )
        super().on_timeout(soft, timeout)

    def on_retry(self, exc_info: ExceptionInfo) -> None:
        """The task called ``self.retry()``: schedule it in a wait queue (or give up)."""
        retry = _unwrap(exc_info.exception)
        if self.acknowledged or not isinstance(retry, Retry):
            return super().on_retry(exc_info)
        cause = retry.exc if isinstance(retry.exc, BaseException) else retry
        when = retry.when if isinstance(retry.when, (int, float)) else None
        permanent = None
        if arguments_do_not_fit(self.task, cause, self.args, self.kwargs):
            permanent = h.REASON_INVALID_ARGUMENTS
        self._finish(cause, traceback=exc_info.traceback, requested_delay_s=when, permanent_reason=permanent)

    def on_failure(self, exc_info: ExceptionInfo, send_failed_event: bool = True, return_ok: bool = False) -> None:
        """The task raised, or its process died: retry or dead-letter it."""
        exc = _unwrap(exc_info.exception)
        if (
            self.acknowledged
            or state.should_terminate
            or not self.task.acks_late
            or isinstance(exc, (Terminated, Reject, Ignore, MemoryError))
        ):
            return super().on_failure(exc_info, send_failed_event, return_ok)
        if isinstance(exc, Retry):
            return self.on_retry(exc_info)
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            if self._already_cancelled or self._already_revoked:
                return None
            exc_info = self._worker_lost_info(exc)
            exc = _unwrap(exc_info.exception)
        if isinstance(exc, WorkerLostError):
            worker_lost = int((self._message.headers or {}).get(h.WORKER_LOST) or 0) + 1
            self._finish(exc, traceback=exc_info.traceback, worker_lost=worker_lost)
            return None
        if isinstance(exc, TimeLimitExceeded):
            # The pool reports a hard time limit here before calling on_timeout.
            permanent = h.REASON_TIME_LIMIT
        elif arguments_do_not_fit(self.task, exc, self.args, self.kwargs):
            permanent = h.REASON_INVALID_ARGUMENTS
        else:
            # ReliableTask.__call__ turned every retryable exception into a Retry,
            # so this one was judged final in the pool process. It is not judged
            # again here: its class may not have survived pickling.
            policy = self.task.retry_policy()
            exhausted = int(getattr(self._context, "retries", 0) or 0) >= policy.max_retries
            permanent = h.REASON_RETRIES_EXHAUSTED if exhausted else h.REASON_PERMANENT
        self._finish(exc, traceback=exc_info.traceback, permanent_reason=permanent)
        return None

    # -- internals ----------------------------------------------------------------

    def _finish(
        self,
        exc: BaseException,
        *,
        traceback: str | None,
        requested_delay_s: float | None = None,
        permanent_reason: str | None = None,
        worker_lost: int = 0,
        events: bool = True,
    ) -> None:
        retries = int(getattr(self._context, "retries", 0) or 0)
        decision = decide(
            self.task.retry_policy(),
            exc,
            retries=retries,
            worker_lost=worker_lost,
            requested_delay_s=requested_delay_s,
            permanent_reason=permanent_reason,
        )
        failure: dict[str, Any] = {
            "exception_type": _type_name(exc),
            "exception_message": str(getattr(exc, "text", None) or exc) if _was_unpicklable(exc) else str(exc),
            "traceback": traceback or "",
            "attempts": retries + 1,
        }
        if decision.retry:
            sent = routing.schedule_retry(self._message, decision.delay_s, failure, worker_lost=worker_lost)
            if sent:
                self.acknowledge()
                if events:
                    self.send_event("task-retried", exception=saferepr(exc), traceback=failure["traceback"])
                return
            # The retry could not be scheduled: park it rather than lose or loop it.
            decision_reason = h.REASON_RETRIES_EXHAUSTED
        else:
            decision_reason = decision.reason
        sent = routing.dead_letter(self._message, decision_reason, failure, worker_lost=worker_lost)
        if sent:
            self.acknowledge()
        else:
            logger.error(
                "%s[%s]: could not publish a dead letter; rejecting it so RabbitMQ dead-letters it",
                self.name, self.id,
            )
            self.reject(requeue=False)
        if events:
            self.send_event("task-failed", exception=saferepr(exc), traceback=failure["traceback"])
            if worker_lost:
                self.task.backend.mark_as_failure(self.id, exc, request=self._context, store_result=self.store_errors)
