"""The worker's consumer: messages that can never run go to the dead-letter queue.

Celery acks (and so loses) a body it cannot decode, and rejects unknown task
names and disallowed content types without a word of why. Here each of them
is published to its queue's dead-letter queue with the reason in its headers,
then acked; if that publish fails, the message is rejected without requeue and
RabbitMQ dead-letters it through the work queue's x-dead-letter-exchange.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed
from kombu.message import Message
from vine import promise

from service import headers as h
from service.worker import routing

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

    def _park(self, message: Message, reason: str, exc: BaseException | None, text: str) -> None:
        if message.acknowledged:
            return
        if routing.dead_letter(message, reason, _failure(exc, text)):
            message.ack()
        else:
            message.reject(requeue=False)
        if self.event_dispatcher and (message.headers or {}).get("id"):
            self.event_dispatcher.send("task-failed", uuid=message.headers["id"], exception=f"{reason}: {text}"[:500])

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
