"""The worker's request handler: decides, in the main process, how a run ended.

Celery's defaults lose or loop messages here (see the design notes): a failed
late-acked task is acked and gone, a hard time limit can requeue forever, a
poison message that kills its process is redelivered forever. This handler
instead, for every failure:

1. takes the decision the pool process made (``ReliableTask``: a KitRetry, or
   the exception carrying its final decision), else asks ``retry_policy.decide``
   itself, whether to retry or give up;
2. publishes the message, confirmed, to a wait queue or to the dead-letter
   queue with the failure in its headers;
3. only then acks the original. If that publish failed, it rejects the
   original without requeue, so RabbitMQ dead-letters it by itself.

The rule that decided is logged and, on a dead letter, recorded in its
``kit-retry-rule`` header.

A task whose ``expires`` passed before it ran is dead-lettered as ``expired``
(Celery would ack it away as revoked), a cancelled one as ``revoked`` (also one that Celery's own
``revoke(terminate=True)`` stopped while it ran). None of these handlers lets an
exception escape: a bug or a value it cannot use dead-letters the message as
``invalid-message`` (or rejects it), so no message stays unacked.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from functools import wraps
from typing import Any, TypeVar

from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from celery.exceptions import Ignore, Reject, Retry, Terminated, TimeLimitExceeded, WorkerLostError
from celery.utils.saferepr import saferepr
from celery.utils.serialization import UnpickleableExceptionWrapper
from celery.worker import state
from celery.worker.request import Request

from service import headers as h
from service.monitoring import metrics
from service.retry_policy import Decision, decide
from service.status import recorder
from service.worker import routing
from service.worker.task import KitRetry, arguments_do_not_fit, final_decision

logger = logging.getLogger(__name__)


_Handler = TypeVar("_Handler", bound=Callable[..., Any])


def _never_wedges(handler: _Handler) -> _Handler:
    """Run a request handler; if it raises, dead-letter (or reject) the message instead of leaving it unacked."""

    @wraps(handler)
    def guarded(self: ReliableRequest, *args: Any, **kwargs: Any) -> Any:
        try:
            return handler(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the message must end somewhere
            logger.exception("%s[%s]: the worker could not handle this message", self.name, self.id)
            self._last_resort(exc)
            return None

    return guarded  # type: ignore[return-value]


def _unwrap(exc: BaseException) -> BaseException:
    return exc.exc if isinstance(exc, ExceptionWithTraceback) else exc


def _was_unpicklable(exc: BaseException) -> bool:
    return isinstance(exc, UnpickleableExceptionWrapper)


def _exception_class(exc: BaseException) -> type[BaseException]:
    """The exception's class; for one Celery wrapped because it could not be pickled, the class it wraps.

    The retry rules match classes, so a wrapped exception is judged as itself
    wherever its class can be imported (else as the wrapper).
    """
    if not isinstance(exc, UnpickleableExceptionWrapper):
        return type(exc)
    try:
        found: Any = importlib.import_module(exc.exc_module)
        for part in str(exc.exc_cls_name).split("."):
            found = getattr(found, part)
    except Exception:  # noqa: BLE001 - a class we cannot find: judge the wrapper
        return type(exc)
    return found if isinstance(found, type) and issubclass(found, BaseException) else type(exc)


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

    def revoked(self) -> bool:
        """Whether the task must not run; Celery asks before it runs one (and on receipt of an ETA one).

        A task cancelled with ``task cancel`` (a cancel mark in the result
        backend: ``service.status``, it outlives worker restarts) or by Celery's
        own revoke (this worker's in-memory set) is dead-lettered with reason
        ``revoked`` instead of being acked away, so it stays accounted for; its
        recorded state becomes revoked. Expired tasks: ``maybe_expire``.
        """
        if self._already_revoked:
            return True
        if not self.acknowledged and (self.id in state.revoked or recorder.is_cancelled(self.id)):
            self._announce_revoked("revoked", False, None, False)  # dead-letters it first
            return True
        return super().revoked()

    def _announce_revoked(self, reason: str, terminated: bool, signum: Any, expired: bool) -> None:
        """Celery's end of a revoked task (it acks the message away), after dead-lettering it as ``revoked``.

        Every way Celery revokes passes here: ``revoked`` above, and Celery's own
        terminate (``control.revoke(id, terminate=True)``, Flower's Terminate) of a
        running task, whose REVOKED write the kit's backend drops; the dead letter
        records the revoked state. An expired task was dead-lettered by
        ``maybe_expire`` already, and an acknowledged message has nothing left to park.
        """
        if not self.acknowledged and not expired:
            self._dead_letter_revoked(terminated)
        super()._announce_revoked(reason, terminated, signum, expired)

    @_never_wedges
    def _dead_letter_revoked(self, terminated: bool = False) -> None:
        failure = {
            "exception_type": "Revoked",
            "exception_message": ("terminated by Celery's revoke(terminate=True) while it ran" if terminated
                                  else "cancelled (task cancel / revoke) before a worker ran it"),
            "traceback": "",
            "attempts": h.count(self._request_dict.get("retries")) + 1,
        }
        logger.warning("%s[%s] was %s: dead-lettering it", self.name, self.id,
                       "terminated" if terminated else "cancelled")
        if routing.dead_letter(self._message, h.REASON_REVOKED, failure):
            self.acknowledge()
        else:
            self.reject(requeue=False)

    def maybe_expire(self) -> bool:
        """A task whose ``expires`` has passed: dead-letter it as ``expired`` (Celery then reports it revoked).

        Celery would ack it away. The id is not added to the worker's revoked
        set, so a replay of the dead letter runs.
        """
        expires = self.expires
        if not expires:
            return False
        now = datetime.now(UTC if expires.tzinfo else None)
        if now <= expires:
            return False
        if not self.acknowledged:
            self._dead_letter_expired(expires)
        return True

    @_never_wedges
    def _dead_letter_expired(self, expires: datetime) -> None:
        failure = {
            "exception_type": "Expired",
            "exception_message": f"the task expired at {expires.isoformat()} before a worker could run it",
            "traceback": "",
            "attempts": h.count(self._request_dict.get("retries")) + 1,
        }
        logger.warning("%s[%s] expired at %s: dead-lettering it", self.name, self.id, expires.isoformat())
        if routing.dead_letter(self._message, h.REASON_EXPIRED, failure):
            self.acknowledge()
        else:
            self.reject(requeue=False)

    @_never_wedges
    def on_timeout(self, soft: bool, timeout: float) -> None:
        """Hard time limit: dead-letter with reason ``time-limit``, then let Celery ack."""
        if not soft and self.task.acks_late and not self.acknowledged and not state.should_terminate:
            exc = TimeLimitExceeded(timeout)
            self._finish(
                exc,
                traceback=f"TimeLimitExceeded: hard time limit ({timeout}s) exceeded",
                decision=self._decide(exc, permanent_reason=h.REASON_TIME_LIMIT),
                events=False,  # Celery's own on_timeout sends task-failed
            )
        super().on_timeout(soft, timeout)

    @_never_wedges
    def on_retry(self, exc_info: ExceptionInfo) -> None:
        """The pool decided on a retry (a KitRetry; a bare Retry is judged here): schedule it (or give up)."""
        retry = _unwrap(exc_info.exception)
        if self.acknowledged or not isinstance(retry, Retry):
            return super().on_retry(exc_info)
        cause = retry.exc if isinstance(retry.exc, BaseException) else retry
        when = retry.when if isinstance(retry.when, (int, float)) and not isinstance(retry.when, bool) else None
        if arguments_do_not_fit(self.task, cause, self.args, self.kwargs):
            decision = self._decide(cause, permanent_reason=h.REASON_INVALID_ARGUMENTS)
        elif isinstance(retry, KitRetry) and retry.rule and when is not None:
            decision = Decision(True, delay_s=float(when), rule=retry.rule)
        else:
            decision = self._decide(cause, retry_requested=True, requested_delay_s=when)
        self._finish(cause, traceback=exc_info.traceback, decision=decision)

    @_never_wedges
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
            worker_lost = h.count((self._message.headers or {}).get(h.WORKER_LOST)) + 1
            self._finish(exc, traceback=exc_info.traceback, decision=self._decide(exc, worker_lost=worker_lost),
                         worker_lost=worker_lost)
            return None
        decision = final_decision(exc, self.id, self._retries())
        if decision is not None:
            pass  # judged final in the pool process (ReliableTask.__call__), which saw the real exception
        elif isinstance(exc, TimeLimitExceeded):
            # The pool reports a hard time limit here before calling on_timeout.
            decision = self._decide(exc, permanent_reason=h.REASON_TIME_LIMIT)
        elif arguments_do_not_fit(self.task, exc, self.args, self.kwargs):
            decision = self._decide(exc, permanent_reason=h.REASON_INVALID_ARGUMENTS)
        else:
            # No decision came with it (its class drops instance attributes, or
            # Celery had to wrap it to pickle it): the same rules, on its class.
            # Only a self.retry() past its limit decides otherwise in the pool; such
            # an exception is then judged as if raised (at worst retried again up
            # to the task's own limit, or dead-lettered as permanent-error).
            decision = self._decide(_exception_class(exc))
        self._finish(exc, traceback=exc_info.traceback, decision=decision)
        return None

    # -- internals ----------------------------------------------------------------

    def _last_resort(self, error: BaseException) -> None:
        """A handler failed: dead-letter the message as invalid-message, else reject it (never raises)."""
        if self.acknowledged:
            return
        failure = {
            "exception_type": h.exception_type_name(error),
            "exception_message": f"the worker could not handle this message: {error}",
            "traceback": "",
            "attempts": 1,
        }
        try:
            if routing.dead_letter(self._message, h.REASON_INVALID_MESSAGE, failure):
                self.acknowledge()
                return
        except Exception:  # noqa: BLE001
            logger.exception("%s[%s]: could not dead-letter it either", self.name, self.id)
        try:
            self.reject(requeue=False)  # RabbitMQ dead-letters it through the work queue's DLX
        except Exception:  # noqa: BLE001 - the channel is gone: the broker redelivers it
            logger.exception("%s[%s]: could not reject it", self.name, self.id)

    def _retries(self) -> int:
        return h.count(getattr(self._context, "retries", 0))

    def _decide(self, exc: BaseException | type[BaseException], **kwargs: Any) -> Decision:
        """``retry_policy.decide`` for this task and delivery."""
        return decide(self.task.retry_policy(), exc, retries=self._retries(), **kwargs)

    def _set_rule(self, rule: str | None) -> None:
        """Set (or remove) the message's ``kit-retry-rule`` header; routing copies the headers it publishes."""
        headers = self._message.headers
        if isinstance(headers, dict):
            headers.pop(h.RETRY_RULE, None)
            if rule:
                headers[h.RETRY_RULE] = rule

    def _finish(
        self,
        exc: BaseException,
        *,
        traceback: str | None,
        decision: Decision,
        worker_lost: int = 0,
        events: bool = True,
    ) -> None:
        """Carry out ``decision``: publish the retry or the dead letter (confirmed), then ack the original."""
        retries = self._retries()
        failure: dict[str, Any] = {
            "exception_type": _type_name(exc),
            "exception_message": str(getattr(exc, "text", None) or exc) if _was_unpicklable(exc) else str(exc),
            "traceback": traceback or "",
            "attempts": retries + 1,
        }
        limit = f" (limit {decision.limit})" if decision.limit is not None else ""
        if decision.retry:
            logger.info("%s[%s]: retry in %.3gs by rule %s%s", self.name, self.id, decision.delay_s,
                        decision.rule, limit)
            self._set_rule(None)  # a retry does not carry the rule of an earlier death
            sent = routing.schedule_retry(self._message, decision.delay_s, failure, worker_lost=worker_lost)
            if sent:
                self.acknowledge()
                if events:
                    self.send_event("task-retried", exception=saferepr(exc), traceback=failure["traceback"])
                return
            # The retry could not be scheduled: park it rather than lose or loop it.
            decision_reason = h.REASON_RETRIES_EXHAUSTED
        else:
            logger.info("%s[%s]: %s by rule %s%s", self.name, self.id, decision.reason, decision.rule, limit)
            decision_reason = decision.reason
        self._set_rule(decision.rule)
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
