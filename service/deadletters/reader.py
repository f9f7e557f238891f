"""Reading a queue without changing it.

Every operation reads a dead-letter queue by consuming it WITHOUT acking
(``Walk``). A message the operation does not take is held unacked until the
end and then returned; RabbitMQ puts requeued messages back at their original
positions, so listing changes nothing, and a replay or purge leaves the
messages it skips where they were, in their order.

Two replays, purges or imports of one queue cannot run at once: each holds
the queue's lock (``service.deadletters.lock``) while it works.
"""

from __future__ import annotations

from collections.abc import Iterator

import amqp
from kombu import Connection

from service.deadletters.letter import DeadLetter, DeadLetterError

#: The largest prefetch count AMQP 0-9-1 can express (a short).
MAX_PREFETCH = 65535
#: What a quorum queue (RabbitMQ 3.10) delivers unacked to a consumer with no prefetch limit.
QUORUM_UNLIMITED_CAP = 2000


class Walk:
    """Consumes a snapshot of a queue without acking; nacks (requeues) what is left at the end."""

    def __init__(self, conn: Connection, queue: str) -> None:
        self.queue = queue
        self.channel = conn.channel()
        self.channel.auto_decode = False  # bodies stay bytes, exactly as stored
        try:
            _, self.count, _ = self.channel.queue_declare(queue, passive=True)
        except amqp.exceptions.NotFound:
            raise DeadLetterError(
                f"queue {queue!r} does not exist on the broker; run `python -m service topology declare`"
            ) from None
        self._received: list[amqp.Message] = []

    def __iter__(self) -> Iterator[DeadLetter]:
        if not self.count:
            return
        # A prefetch of the whole snapshot: held messages must not stall the delivery of the
        # rest. Not 0 ("unlimited"), which a quorum queue caps at 2,000 unacked messages;
        # past the protocol's largest prefetch, 0 is what a classic queue can still serve.
        self.channel.basic_qos(0, self.count if self.count <= MAX_PREFETCH else 0, False)
        tag = self.channel.basic_consume(self.queue, no_ack=False, callback=self._received.append)
        position = 0
        try:
            while position < self.count:
                if not self._received:
                    try:
                        self.channel.connection.drain_events(timeout=5)
                    except TimeoutError:
                        self._check_not_capped(position)
                        break  # the queue shrank under us (someone else consumed)
                    continue
                message = self._received.pop(0)
                position += 1
                yield DeadLetter(
                    queue=self.queue,
                    position=position,
                    body=bytes(message.body),
                    headers=dict(message.properties.get("application_headers") or {}),
                    properties={k: v for k, v in message.properties.items() if k != "application_headers"},
                    delivery_tag=message.delivery_info["delivery_tag"],
                    routing_key=str(message.delivery_info.get("routing_key") or ""),
                    exchange=str(message.delivery_info.get("exchange") or ""),
                )
        finally:
            self.channel.basic_cancel(tag)

    def _check_not_capped(self, position: int) -> None:
        """DeadLetterError when deliveries stopped while messages are still ready: the broker's cap on
        unacked messages (a quorum queue of more than MAX_PREFETCH letters), not a shrinking queue."""
        probe = self.channel.connection.channel()
        try:
            _, ready, _ = probe.queue_declare(self.queue, passive=True)
        finally:
            probe.close()
        if ready:
            cap = min(self.count, MAX_PREFETCH) if self.count <= MAX_PREFETCH else QUORUM_UNLIMITED_CAP
            raise DeadLetterError(
                f"queue {self.queue!r} holds {self.count} messages, but the broker stopped delivering after "
                f"{position} without an ack (a quorum queue serves at most {cap:,} unacked messages "
                "to one reader that holds them all); narrow it with filters (--task, --exception, --since/"
                "--until): what an operation moves or deletes is acked as it goes and does not count")

    def ack(self, letter: DeadLetter) -> None:
        """Remove ``letter`` from the queue (only after its copy is safe)."""
        self.channel.basic_ack(letter.delivery_tag)

    def close(self) -> None:
        """Requeue every message not acked, at its original position.

        Closing the channel is what returns them (py-amqp has no basic.nack).
        """
        try:
            self.channel.close()
        except Exception:  # noqa: BLE001 - a channel the broker closed has requeued them already
            pass
