"""Dead-letter operations: look at, replay, purge, export and import dead letters.

Which dead letters an operation takes is ``service.dlq_filters``; the archive
format of export, import and purge --archive is ``service.dlq_archive``.

Every operation reads a dead-letter queue by consuming it WITHOUT acking. A
message the operation does not take is held unacked until the end and then
returned with ``basic.nack(requeue)``; RabbitMQ puts requeued messages back at
their original positions, so listing changes nothing, and a replay or purge
leaves the messages it skips where they were, in their order.

A message that is taken is first republished (replay) or written to the
archive file (purge --archive), and only acked once the broker confirmed it /
the file was synced. Killing the process at any moment therefore loses
nothing: unacked messages return to the queue, and at worst one message that
was already republished is replayed again.

Two replays or purges of one queue cannot run at once: each holds an
exclusive "lock" queue on its connection (released by the broker when the
connection goes, also on kill -9); a second one is refused with a message.

``unroutable.dead`` (queues.UNROUTABLE_QUEUE) is handled like the dead-letter
queues. Its messages were published to the task exchange with a routing key no
work queue is bound to; they carry no kit-* headers, so their reason
(``unroutable``) and explanation come from the queue and the routing key they
were delivered with. A replay puts one back on the work queue its routing key
names, if that is one; the others need ``to=``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import amqp
from kombu import Connection

from service import headers as h
from service import queues
from service.dlq_archive import export_record, to_jsonable
from service.dlq_filters import Filters, as_utc
from service.errors import DeadLetterError, KitError
from service.publishing import ConfirmedChannel, Outgoing, republished_properties
from service.settings import Settings

#: Headers a replay removes, so the task starts over with a fresh retry budget.
_RESET_ON_REPLAY = (h.WORKER_LOST, h.WAITS, h.RETRY_RULE, queues.WAIT_HEADER, "x-death", "x-first-death-exchange",
                    "x-first-death-queue", "x-first-death-reason", "x-last-death-exchange",
                    "x-last-death-queue", "x-last-death-reason")
#: Purges and imports confirm (or sync) this many messages at a time.
BATCH = 200
#: A replay republishes and confirms one message before acking it, so killing
#: it duplicates at most one message. ``batch`` trades that for speed.
REPLAY_BATCH = 1
#: The reason of every message in queues.UNROUTABLE_QUEUE (none carries a kit-reason header).
REASON_UNROUTABLE = "unroutable"


class QueueBusy(DeadLetterError):
    """Another replay, purge or import holds the queue."""


# -- reading ------------------------------------------------------------------------


@dataclass
class DeadLetter:
    """One message of a dead-letter queue, with what the kit knows about why it died."""

    queue: str
    position: int
    body: bytes
    headers: dict[str, Any]
    properties: dict[str, Any]
    delivery_tag: int = 0
    #: The routing key and exchange it was delivered with: for a dead letter its work
    #: queue and tasks.dead, for an unroutable message the key it was published with.
    routing_key: str = ""
    exchange: str = ""

    @property
    def unroutable(self) -> bool:
        """True for a message of queues.UNROUTABLE_QUEUE."""
        return self.queue == queues.UNROUTABLE_QUEUE

    @property
    def id(self) -> str:
        """The Celery task id, else the message's own id, else a hash of the body."""
        for value in (self.headers.get("id"), self.properties.get("message_id"),
                      self.properties.get("correlation_id")):
            if value:
                return str(value)
        return "sha1:" + hashlib.sha1(self.body).hexdigest()[:16]  # noqa: S324 - an identifier, not security

    @property
    def task(self) -> str:
        return str(self.headers.get("task") or "")

    @property
    def reason(self) -> str:
        """The kit's reason, or RabbitMQ's own (x-death) for broker dead-lettering.

        ``unroutable`` for every message of queues.UNROUTABLE_QUEUE: that is why
        it is there, whatever headers it carries from an earlier life.
        """
        if self.unroutable:
            return REASON_UNROUTABLE
        if self.headers.get(h.REASON):
            return str(self.headers[h.REASON])
        death = self._last_death()
        return f"broker-{death.get('reason')}" if death else "unknown"

    @property
    def exception_type(self) -> str:
        return str(self.headers.get(h.EXCEPTION_TYPE) or "")

    @property
    def exception_message(self) -> str:
        if self.unroutable:
            return (f"no work queue is bound to routing key {self.routing_key!r} on exchange "
                    f"{self.published_to!r}; the work queues are {', '.join(queues.WORK_QUEUE_NAMES)}")
        return str(self.headers.get(h.EXCEPTION_MESSAGE) or "")

    @property
    def published_to(self) -> str:
        """The exchange it was published to: for an unroutable message, the one whose
        alternate exchange parked it (an imported one is delivered by that alternate exchange)."""
        if self.unroutable and self.exchange in ("", queues.UNROUTABLE_EXCHANGE):
            return queues.TASK_EXCHANGE
        return self.exchange

    @property
    def attempts(self) -> int:
        value = self.headers.get(h.ATTEMPTS)
        if value is not None and h.count(value):
            return h.count(value)
        return h.count(self.headers.get("retries")) + 1

    @property
    def replays(self) -> int:
        return h.count(self.headers.get(h.REPLAYS))

    @property
    def source_queue(self) -> str:
        """The work queue to put it back on; "" for an unroutable message whose routing key
        names no work queue (it has none: a replay needs ``to``)."""
        if self.unroutable:
            return self.routing_key if self.routing_key in queues.WORK_QUEUE_NAMES else ""
        source = self.headers.get(h.SOURCE_QUEUE)
        if source in queues.WORK_QUEUE_NAMES:
            return str(source)
        death = self._last_death()
        if death and death.get("queue") in queues.WORK_QUEUE_NAMES:
            return str(death["queue"])
        return work_queue_of(self.queue)

    @property
    def died_at(self) -> datetime | None:
        """When it was dead-lettered (UTC), from the kit's header or RabbitMQ's x-death."""
        value = self.headers.get(h.DEAD_LETTERED_AT)
        if value:
            try:
                return as_utc(datetime.fromisoformat(str(value)))
            except ValueError:
                pass
        death = self._last_death()
        if death and isinstance(death.get("time"), datetime):
            return as_utc(death["time"])
        if self.unroutable:
            return self._published_at()
        return None

    def _published_at(self) -> datetime | None:
        """When it was published, if the publisher said (AMQP timestamp, the kit client's kit-enqueued-at):
        for an unroutable message that is when it was parked."""
        stamp = self.properties.get("timestamp")
        if isinstance(stamp, datetime):
            return as_utc(stamp)
        for value in (stamp, self.headers.get(h.ENQUEUED_AT)):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                try:
                    return datetime.fromtimestamp(float(value), UTC)
                except (OverflowError, OSError, ValueError):
                    continue
        return None

    def _last_death(self) -> dict[str, Any] | None:
        deaths = self.headers.get("x-death")
        if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
            return deaths[0]  # RabbitMQ keeps the most recent first
        return None

    def summary(self) -> dict[str, Any]:
        """The fields ``dlq list`` shows (``retry_rule``: the ``kit-retry-rule`` header)."""
        died = self.died_at
        return {
            "position": self.position,
            "id": self.id,
            "task": self.task,
            "reason": self.reason,
            # The retry rule that decided (service.retry_policy), for tasks that ran; None otherwise.
            "retry_rule": str(self.headers[h.RETRY_RULE]) if self.headers.get(h.RETRY_RULE) else None,
            "exception": self.exception_type,
            "message": self.exception_message,
            "attempts": self.attempts,
            "replays": self.replays,
            "source_queue": self.source_queue or None,
            "routing_key": self.routing_key,
            "died_at": died.isoformat(timespec="seconds") if died else None,
        }

    def details(self, show_args: bool = True) -> dict[str, Any]:
        """Everything ``dlq show`` shows."""
        info = self.summary()
        info.update(
            queue=self.queue,
            exchange=self.exchange,
            traceback=str(self.headers.get(h.TRACEBACK) or ""),
            first_failure_at=self.headers.get(h.FIRST_FAILURE_AT),
            last_failure_at=self.headers.get(h.LAST_FAILURE_AT),
            x_death=to_jsonable(self.headers.get("x-death") or []),
            headers=to_jsonable(self.headers),
            properties=to_jsonable(self.properties),
            body_bytes=len(self.body),
        )
        if show_args:
            info["args"], info["kwargs"] = _decode_args(self)
        else:
            info["headers"] = {k: ("<hidden>" if k in ("argsrepr", "kwargsrepr") else v)
                               for k, v in info["headers"].items()}
        return info


def _decode_args(letter: DeadLetter) -> tuple[Any, Any]:
    if letter.properties.get("content_type") != "application/json":
        return None, None
    try:
        args, kwargs, _ = json.loads(letter.body)
        return args, kwargs
    except (ValueError, TypeError):
        return None, None


def work_queue_of(name: str) -> str:
    """The work queue a dead-letter queue belongs to."""
    for queue in queues.WORK_QUEUE_NAMES:
        if queues.dead_letter_queue_name(queue) == name:
            return queue
    raise DeadLetterError(f"{name!r} is not a dead-letter queue")


#: What ``--queue`` accepts besides the queue names: ``default`` for ``default.dead``,
#: ``unroutable`` for ``unroutable.dead``.
_SHORT_NAMES = {name.removesuffix(".dead"): name for name in queues.DEAD_LETTER_QUEUE_NAMES}


def resolve_queues(names: Iterable[str] | None) -> list[str]:
    """Dead-letter queue names from user input: ``default`` or ``default.dead``,
    ``unroutable`` or ``unroutable.dead``; all when empty."""
    dead = list(queues.DEAD_LETTER_QUEUE_NAMES)
    chosen: list[str] = []
    for name in names or ():
        if name in dead:
            chosen.append(name)
        elif name in _SHORT_NAMES:
            chosen.append(_SHORT_NAMES[name])
        else:
            raise DeadLetterError(
                f"unknown queue {name!r}; use a work queue ({', '.join(queues.WORK_QUEUE_NAMES)}), "
                f"unroutable, or a dead-letter queue ({', '.join(dead)})"
            )
    return list(dict.fromkeys(chosen)) or dead  # each queue once, in the order given


# -- the queue walker -----------------------------------------------------------------


class _Walk:
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
        # Unlimited prefetch: held messages must not stall the delivery of the rest.
        self.channel.basic_qos(0, 0, False)
        tag = self.channel.basic_consume(self.queue, no_ack=False, callback=self._received.append)
        position = 0
        try:
            while position < self.count:
                if not self._received:
                    try:
                        self.channel.connection.drain_events(timeout=5)
                    except TimeoutError:
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


def browse(conn: Connection, queue: str, filters: Filters | None = None) -> list[DeadLetter]:
    """The dead letters of ``queue`` (matching ``filters``), oldest first. Changes nothing."""
    walk = _Walk(conn, queue)
    try:
        return [letter for letter in walk if filters is None or filters.match(letter)]
    finally:
        walk.close()


def find(conn: Connection, queue_names: Iterable[str], letter_id: str) -> DeadLetter:
    """The dead letter with ``letter_id`` in any of the queues. Raises DeadLetterError if none."""
    for queue in queue_names:
        for letter in browse(conn, queue, Filters(ids=(letter_id,))):
            return letter
    raise DeadLetterError(f"no dead letter with id {letter_id!r} in {', '.join(queue_names)}")


def stats(conn: Connection, queue: str) -> dict[str, Any]:
    """Count, oldest, newest and counts by task, exception and reason of one queue
    (of queues.UNROUTABLE_QUEUE also by routing key)."""
    letters = browse(conn, queue)
    died = [d for d in (letter.died_at for letter in letters) if d]
    result = {
        "queue": queue,
        "count": len(letters),
        "oldest": min(died).isoformat(timespec="seconds") if died else None,
        "newest": max(died).isoformat(timespec="seconds") if died else None,
        "by_task": dict(Counter(letter.task or "(none)" for letter in letters).most_common()),
        "by_exception": dict(Counter(letter.exception_type or "(none)" for letter in letters).most_common()),
        "by_reason": dict(Counter(letter.reason for letter in letters).most_common()),
    }
    if queue == queues.UNROUTABLE_QUEUE:
        result["by_routing_key"] = dict(Counter(letter.routing_key for letter in letters).most_common())
    return result


# -- locking ---------------------------------------------------------------------------


def _lock(conn: Connection, queue: str) -> amqp.Channel:
    """Hold ``queue``'s lock: an exclusive queue that dies with this connection."""
    channel = conn.channel()
    try:
        channel.queue_declare(queues.lock_queue_name(queue), exclusive=True, auto_delete=True)
    except amqp.exceptions.ResourceLocked:
        raise QueueBusy(
            f"another replay, purge or import is working on {queue!r}; wait for it to finish "
            "(its lock is released when it ends or its process dies)"
        ) from None
    return channel


def is_busy(conn: Connection, queue: str) -> bool:
    """True when a replay or purge (on another connection) holds ``queue``."""
    channel = conn.channel()
    try:
        channel.queue_declare(queues.lock_queue_name(queue), passive=True)
    except amqp.exceptions.ResourceLocked:
        return True
    except amqp.exceptions.NotFound:
        return False
    finally:
        try:
            channel.close()
        except Exception:  # noqa: BLE001 - the broker closed it already
            pass
    return False


def hold(conn: Connection, queue: str) -> amqp.Channel:
    """Take ``queue``'s lock for the life of ``conn`` (see ``release``); raises QueueBusy."""
    return _lock(conn, queue)


def release(channel: amqp.Channel, queue: str) -> None:
    """Give back a lock taken with ``hold``."""
    _unlock(channel, queue)


def _unlock(channel: amqp.Channel, queue: str) -> None:
    """Release ``queue``'s lock (the broker also does when the connection closes)."""
    try:
        channel.queue_delete(queues.lock_queue_name(queue))
        channel.close()
    except Exception:  # noqa: BLE001 - a lost connection has released the lock already
        pass


# -- replay and purge -----------------------------------------------------------------------


@dataclass
class Outcome:
    """What an operation did, message by message.

    ``refused`` are over their replay budget; ``homeless`` are unroutable
    messages a replay without ``to`` has no work queue for. Both stay where they
    were and count as refused.
    """

    taken: list[DeadLetter] = field(default_factory=list)
    skipped: int = 0
    refused: list[DeadLetter] = field(default_factory=list)
    failed: list[tuple[DeadLetter, str]] = field(default_factory=list)
    matched: int = 0
    homeless: list[DeadLetter] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"taken": len(self.taken), "skipped": self.skipped,
                "refused": len(self.refused) + len(self.homeless), "failed": len(self.failed)}


def replayed_message(letter: DeadLetter, target: str) -> Outgoing:
    """The message a replay publishes: same body and priority, a fresh retry
    budget, the replay counter incremented."""
    headers = {k: v for k, v in letter.headers.items() if k not in _RESET_ON_REPLAY}
    headers["retries"] = 0
    # A replayed task runs now: whatever its original ETA or expiry, the operator asked for it.
    headers["eta"] = None
    headers["expires"] = None
    headers[h.REPLAYS] = letter.replays + 1
    headers[h.REPLAYED_AT] = h.utc_now_iso()
    headers[h.ENQUEUED_AT] = time.time()
    return Outgoing(queues.TASK_EXCHANGE, target, letter.body, headers, republished_properties(letter.properties))


def _require_work_queue(conn: Connection, name: str) -> None:
    """Raise DeadLetterError when work queue ``name`` does not exist.

    The task exchange parks what it cannot route in unroutable.dead and the
    broker confirms it as routed, so a replay into a deleted work queue would
    move its dead letters there without a word: it is checked first.
    """
    channel = conn.channel()
    try:
        channel.queue_declare(name, passive=True)
    except amqp.exceptions.NotFound:
        raise DeadLetterError(
            f"work queue {name!r} does not exist on the broker (a replay would park its tasks in "
            f"{queues.UNROUTABLE_QUEUE}); run `python -m service topology declare`"
        ) from None
    finally:
        try:
            channel.close()
        except Exception:  # noqa: BLE001 - the broker closed it already
            pass


class _Pacer:
    """Sleeps so that at most ``rate`` messages per second go out (no limit when None)."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self.next_at = time.monotonic()

    def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        if now < self.next_at:
            time.sleep(self.next_at - now)
        self.next_at = max(now, self.next_at) + self.interval


def replay(
    conn: Connection,
    settings: Settings,
    queue: str,
    filters: Filters,
    *,
    to: str | None = None,
    limit: int | None = None,
    rate: float | None = None,
    max_replays: int = 3,
    force: bool = False,
    dry_run: bool = False,
    batch: int = REPLAY_BATCH,
    progress: Callable[[DeadLetter, str], None] | None = None,
) -> Outcome:
    """Put matching dead letters of ``queue`` back on their work queue (or ``to``).

    Each message is republished and confirmed before it is acked; with ``batch``
    N > 1, N are confirmed at a time (faster; a kill may then duplicate up to N). A message
    already replayed ``max_replays`` times is refused unless ``force``. An unroutable
    message whose routing key is no work queue has nowhere to go back to: without
    ``to`` it is refused (``Outcome.homeless``). With ``dry_run`` nothing is
    published, acked or locked: the outcome lists what would be replayed.
    """
    if to is not None:
        try:
            queues.work_queue(to)
        except ValueError as exc:
            raise DeadLetterError(str(exc)) from None
    outcome = Outcome()
    lock = None if dry_run else _lock(conn, queue)
    walk = _Walk(conn, queue)
    publisher = None if dry_run else ConfirmedChannel(settings)
    pacer = _Pacer(rate)
    window: list[DeadLetter] = []
    window_size = 1 if rate else max(1, batch)

    present: set[str] = set()

    def flush() -> bool:
        """Publish the window, then ack it; False (nothing acked) when the broker failed."""
        if not window:
            return True
        assert publisher is not None
        try:
            for target in {to or d.source_queue for d in window} - present:
                _require_work_queue(conn, target)
                present.add(target)
            publisher.publish_many([replayed_message(d, to or d.source_queue) for d in window], window=len(window))
        except KitError as exc:
            for letter in window:
                outcome.failed.append((letter, str(exc)))
                _report(progress, letter, "failed")
            window.clear()
            return False
        for letter in window:
            walk.ack(letter)
            outcome.taken.append(letter)
            _report(progress, letter, "replayed")
        window.clear()
        return True

    try:
        for letter in walk:
            if limit is not None and outcome.matched >= limit:
                outcome.skipped += 1
                continue
            if not filters.match(letter):
                outcome.skipped += 1
                continue
            outcome.matched += 1
            if to is None and not letter.source_queue:
                outcome.homeless.append(letter)
                _report(progress, letter, "refused")
                continue
            if letter.replays >= max_replays and not force:
                outcome.refused.append(letter)
                _report(progress, letter, "refused")
                continue
            if dry_run:
                outcome.taken.append(letter)
                _report(progress, letter, "would replay")
                continue
            pacer.wait()
            window.append(letter)
            if len(window) >= window_size and not flush():
                break  # the broker failed: stop; everything not acked stays in the queue
        else:
            flush()
    finally:
        walk.close()
        if publisher is not None:
            publisher.close()
        if lock is not None:
            _unlock(lock, queue)
    return outcome


def purge(
    conn: Connection,
    queue: str,
    filters: Filters,
    *,
    limit: int | None = None,
    archive: TextIO | None = None,
    progress: Callable[[DeadLetter, str], None] | None = None,
) -> Outcome:
    """Delete matching dead letters of ``queue``; with ``archive``, each is written
    (and the file synced) before it is deleted."""
    outcome = Outcome()
    lock = _lock(conn, queue)
    walk = _Walk(conn, queue)
    batch: list[DeadLetter] = []

    def flush() -> None:
        if archive is not None and batch:
            archive.flush()
            _fsync(archive)
        for letter in batch:
            walk.ack(letter)
            outcome.taken.append(letter)
            _report(progress, letter, "purged")
        batch.clear()

    try:
        for letter in walk:
            if (limit is not None and outcome.matched >= limit) or not filters.match(letter):
                outcome.skipped += 1
                continue
            outcome.matched += 1
            if archive is not None:
                archive.write(json.dumps(export_record(letter)) + "\n")
            batch.append(letter)
            if len(batch) >= BATCH:
                flush()
        flush()
    finally:
        walk.close()
        _unlock(lock, queue)
    return outcome


def _fsync(stream: TextIO) -> None:
    try:
        os.fsync(stream.fileno())
    except (AttributeError, OSError, ValueError):
        pass  # not a real file (stdout, a pipe): nothing to sync


def _report(progress: Callable[[DeadLetter, str], None] | None, letter: DeadLetter, what: str) -> None:
    if progress is not None:
        progress(letter, what)


# -- export and import --------------------------------------------------------------------


def export(conn: Connection, queue: str, filters: Filters, out: TextIO, *, limit: int | None = None) -> int:
    """Write matching dead letters of ``queue`` to ``out`` as JSON Lines. Changes nothing."""
    letters = browse(conn, queue, filters)
    if limit is not None:
        letters = letters[:limit]
    for letter in letters:
        out.write(json.dumps(export_record(letter)) + "\n")
    out.flush()
    return len(letters)


def import_records(conn: Connection, settings: Settings, records: list[dict[str, Any]],
                   queue: str | None = None) -> int:
    """Put archived dead letters back into their dead-letter queue (or ``queue``), confirmed.

    Headers and body are kept exactly as exported.
    """
    publisher = ConfirmedChannel(settings)
    try:
        outgoing = []
        for record in records:
            target = queue or record["queue"]
            properties = republished_properties(record["properties"])
            if target == queues.UNROUTABLE_QUEUE:
                # Straight into the alternate exchange (fanout), with the routing key it had:
                # through the task exchange it would reach a work queue bound to that key.
                outgoing.append(Outgoing(queues.UNROUTABLE_EXCHANGE, str(record.get("routing_key") or ""),
                                         record["body"], record["headers"], properties))
                continue
            # The dead-letter exchange routes by work queue name to its DLQ.
            outgoing.append(Outgoing(queues.DEAD_LETTER_EXCHANGE, work_queue_of(target), record["body"],
                                     record["headers"], properties))
        return publisher.publish_many(outgoing, window=BATCH)
    finally:
        publisher.close()
