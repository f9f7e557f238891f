"""The worker's consumer: messages that can never run go to the dead-letter queue.

Celery acks (and so loses) a body it cannot decode, and rejects unknown task
names and disallowed content types without a word of why. Here each of them
is published to its queue's dead-letter queue with the reason in its headers,
then acked; if that publish fails, the message is rejected without requeue and
RabbitMQ dead-letters it through the work queue's x-dead-letter-exchange.

Before Celery sees a message, it is checked whole (``service.worker.validation``):
a malformed one is dead-lettered as ``invalid-message`` with the field that is
wrong. A message whose ``eta`` is more than ETA_HOLD_S ahead goes back to a
broker wait queue instead of waiting in this process's memory.
"""

from __future__ import annotations

import logging
import traceback
from datetime import UTC, datetime
from typing import Any

import amqp
from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed
from kombu.message import Message
from vine import promise

from service import headers as h
from service.worker import routing, validation

#: A message due within this many seconds is held by Celery until its ETA;
#: one due later waits in the broker (service.worker.routing.wait_until_due).
ETA_HOLD_S = 2.0

logger = logging.getLogger(__name__)


def _failure(exc: BaseException | None, message_text: str) -> dict[str, Any]:
    return {
        "exception_type": h.exception_type_name(exc) if exc else "InvalidMessage",
        "exception_message": message_text,
        "traceback": "".join(traceback.format_exception(exc)) if exc else "",
        "attempts": 1,
    }


class ReliableConsumer(Consumer):
    """Celery Consumer that dead-letters, with a reason, what it cannot run."""

    class Blueprint(Consumer.Blueprint):
        """Celery's consumer steps without native delayed delivery.

        Celery turns it on when it sees quorum queues: it would declare 28
        ``celery_delayed_*`` exchanges and queues (which a least-privilege worker
        may not) and bind every work queue to them. The kit keeps waits in its
        own wait queues instead.
        """

        default_steps = [step for step in Consumer.Blueprint.default_steps if "delayed_delivery" not in step]

    def start(self) -> None:
        """Consume; a user the broker does not let read the work queues ends the worker with one line.

        Celery would print its "Unrecoverable error" traceback. Only reading can
        be refused here: the start-up check (service.startup) has already let
        the user in and checked the topology.
        """
        try:
            super().start()
        except amqp.exceptions.AccessRefused as exc:
            from service import startup
            from service.connection import permission_refused

            startup.exit_with(permission_refused(
                exc, "consuming the work queues", {"queue": "read"},
                "The worker's user needs read on the work queues it consumes (the kit's kit-worker "
                "user has it: `python -m service broker provision`)."))

    def _park(self, message: Message, reason: str, exc: BaseException | None, text: str) -> None:
        if message.acknowledged:
            return
        if routing.dead_letter(message, reason, _failure(exc, text)):
            message.ack()
        else:
            message.reject(requeue=False)
        task_id = (message.headers or {}).get("id") if isinstance(message.headers, dict) else None
        if self.event_dispatcher and isinstance(task_id, str) and task_id:
            try:
                self.event_dispatcher.send("task-failed", uuid=task_id, exception=f"{reason}: {text}"[:500])
            except Exception:  # noqa: BLE001 - an event is telemetry; the message is handled
                logger.debug("could not send task-failed for %r", task_id, exc_info=True)

    def _invalid(self, message: Message) -> str | None:
        """What is wrong with a message, or None; None too when its body cannot be decoded
        (Celery's own path then dead-letters it as undecodable or content-disallowed)."""
        try:
            body = message.decode()
        except Exception:  # noqa: BLE001 - left to on_decode_error / on_invalid_task
            return None
        return validation.problem(message.headers, body)

    def _localize_naive_times(self, message: Message) -> None:
        """A naive ``eta``/``expires`` means KIT_TIMEZONE (Celery's ``timezone``): rewrite it as UTC.

        Celery's worker would read a naive time as UTC, so ``eta=datetime.now() + ...``
        published on a machine in Asia/Shanghai would run eight hours late.
        """
        for name in ("eta", "expires"):
            moment = validation.parse_time(name, message.headers.get(name))
            if moment is not None and moment.tzinfo is None:
                message.headers[name] = moment.replace(tzinfo=self.app.timezone).astimezone(UTC).isoformat()

    def _wait_if_far(self, message: Message) -> bool:
        """Send a message due later than ETA_HOLD_S from now to a wait queue; True when it went.

        An expired message is left to Celery's request, which dead-letters it
        (service.worker.request). If the wait cannot be published, Celery holds
        the message until its ETA, as it would without the kit.
        """
        headers = message.headers
        eta = validation.parse_time("eta", headers.get("eta"))
        if eta is None:
            return False
        now = datetime.now(UTC)
        expires = validation.parse_time("expires", headers.get("expires"))
        if expires is not None and _aware(expires) <= now:
            return False
        delay = (_aware(eta) - now).total_seconds()
        if delay <= ETA_HOLD_S:
            return False
        if routing.wait_until_due(message, delay):
            message.ack()
            return True
        return False

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        """A body that cannot be decoded: dead-letter it instead of acking it away."""
        if isinstance(exc, ContentDisallowed):
            return self.on_invalid_task(None, message, exc)
        logger.error("undecodable message (content type %r): %s", message.content_type, exc)
        self._park(message, h.REASON_UNDECODABLE, exc, f"cannot decode the body as {message.content_type!r}: {exc}")
        return None

    def on_unknown_message(self, body: Any, message: Message) -> None:
        """A message that is not a Celery task message at all."""
        logger.error("message without a task name: headers=%r", message.headers)
        self._park(message, h.REASON_INVALID_MESSAGE, None, "not a Celery task message (no task name)")

    def on_unknown_task(self, body: Any, message: Message, exc: Exception) -> None:
        """A task name this worker does not know."""
        name = (message.headers or {}).get("task")
        logger.error("unknown task %r, id %s", name, (message.headers or {}).get("id"))
        self._park(message, h.REASON_UNKNOWN_TASK, exc, f"no task named {name!r} is registered on the workers")

    def on_invalid_task(self, body: Any, message: Message, exc: Exception) -> None:
        """A disallowed content type (pickle, ...) or a malformed task message."""
        if isinstance(exc, ContentDisallowed):
            reason = h.REASON_CONTENT_DISALLOWED
            text = f"content type {message.content_type!r} is not accepted (JSON only): {exc}"
        else:
            reason, text = h.REASON_INVALID_MESSAGE, f"invalid task message: {exc}"
        logger.error("%s: %s", reason, text)
        self._park(message, reason, exc, text)

    def create_task_handler(self, promise: Any = promise) -> Any:
        """Wrap Celery's handler so a malformed message cannot crash the consumer loop."""
        handler = super().create_task_handler(promise)

        def on_task_received(message: Message) -> Any:
            try:
                problem = self._invalid(message)
                if problem:
                    logger.error("invalid task message %r: %s", _identity(message), problem)
                    self._park(message, h.REASON_INVALID_MESSAGE, None, problem)
                    return None
                self._localize_naive_times(message)
                if self._wait_if_far(message):
                    return None
                return handler(message)
            except self.connection_errors:
                raise
            except Exception as exc:  # noqa: BLE001 - anything else is a bad message
                if message.acknowledged:
                    raise
                logger.error("malformed task message: %r", exc)
                self._park(message, h.REASON_INVALID_MESSAGE, exc, f"malformed task message: {exc}")
                return None

        return on_task_received


def _aware(moment: datetime) -> datetime:
    """A naive time counts as UTC, as Celery's worker reads it."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _identity(message: Message) -> str:
    headers = message.headers if isinstance(message.headers, dict) else {}
    return f"{headers.get('task')!r}[{headers.get('id')!r}]"
