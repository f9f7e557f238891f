"""Dead-letter operations: browse, stats, replay, purge, export and import.

A message that is taken is first republished (replay) or written to the
archive file (purge --archive), and only acked once the broker confirmed it /
the file was synced. Killing the process at any moment therefore loses
nothing: unacked messages return to the queue (``reader.Walk``), and at worst
one message that was already republished is replayed again. Replay and purge
and import hold the queue's lock (``lock.hold``) while they work, recording
who holds it (``holder``: free text; None names the process).

A replay puts an unroutable message back on the work queue its routing key
names, if that is one; the others need ``to=``.

With a result backend, a replay clears the cancel mark of each task before it
republishes it (so a revoked task that an operator replays runs) and records
its state as replayed after the broker confirmed it (``service.status.recorder``;
best effort: a Redis outage never stops a replay).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import amqp
from kombu import Connection

from service import headers as h
from service import queues
from service.deadletters.archive import export_record
from service.deadletters.filters import Filters
from service.deadletters.letter import DeadLetter, DeadLetterError, work_queue_of
from service.deadletters.lock import hold, release
from service.deadletters.reader import Walk
from service.errors import KitError
from service.publishing import ConfirmedChannel, Outgoing, republished_properties
from service.settings import Settings
from service.status import recorder

#: Headers a replay removes (headers.RESET_ON_REPLAY and the wait queue's routing header).
_RESET_ON_REPLAY = (*h.RESET_ON_REPLAY, queues.WAIT_HEADER)
#: Purges and imports confirm (or sync) this many messages at a time.
BATCH = 200
#: A replay republishes and confirms one message before acking it, so killing
#: it duplicates at most one message. ``batch`` trades that for speed.
REPLAY_BATCH = 1


def browse(conn: Connection, queue: str, filters: Filters | None = None) -> list[DeadLetter]:
    """The dead letters of ``queue`` (matching ``filters``), oldest first. Changes nothing."""
    walk = Walk(conn, queue)
    try:
        return [letter for letter in walk if filters is None or filters.match(letter)]
    finally:
        walk.close()


def find(conn: Connection, queue_names: Iterable[str], letter_id: str) -> DeadLetter:
    """The dead letter with ``letter_id`` in any of the queues. Raises DeadLetterError if none."""
    for queue in queue_names:
        walk = Walk(conn, queue)
        letters = iter(walk)
        try:
            for letter in letters:  # stops at the first match; closing the walk returns the rest in place
                if letter.id == letter_id:
                    return letter
        finally:
            letters.close()  # cancels the consumer while the channel is open
            walk.close()
    raise DeadLetterError(f"no dead letter with id {letter_id!r} in {', '.join(queue_names)}")


def stats(conn: Connection, queue: str) -> dict[str, Any]:
    """Count, oldest, newest and counts by task, exception and reason of one queue
    (of queues.UNROUTABLE_QUEUE also by routing key)."""
    return summarize(queue, browse(conn, queue))


def summarize(queue: str, letters: Sequence[Any]) -> dict[str, Any]:
    """``stats`` of letters read already: dead letters, or any rows with their ``task``,
    ``exception_type``, ``reason``, ``died_at`` and ``routing_key``."""
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


def replayed_message(letter: DeadLetter, target: str, profile: queues.Topology | None = None) -> Outgoing:
    """The message a replay publishes: same body and priority, a fresh retry
    budget, the replay counter incremented. On the quorum ``profile`` a high
    or critical task goes back to its work queue's high lane."""
    headers = {k: v for k, v in letter.headers.items() if k not in _RESET_ON_REPLAY}
    headers["retries"] = 0
    # A replayed task runs now: whatever its original ETA or expiry, the operator asked for it.
    headers["eta"] = None
    headers["expires"] = None
    headers[h.REPLAYS] = letter.replays + 1
    headers[h.REPLAYED_AT] = h.utc_now_iso()
    headers[h.ENQUEUED_AT] = time.time()
    properties = republished_properties(letter.properties)
    priority = properties.get("priority")
    priority = priority if isinstance(priority, int) and not isinstance(priority, bool) else 0
    routing_key = (profile or queues.topology()).routing_key(target, priority)
    return Outgoing(queues.TASK_EXCHANGE, routing_key, letter.body, headers, properties)


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
        lane = (" (a high lane of the quorum profile: is KIT_QUEUE_TYPE=quorum right for this broker? "
                "`python -m service topology verify` tells)" if name.endswith(queues.HIGH_LANE_SUFFIX) else "")
        raise DeadLetterError(
            f"work queue {name!r} does not exist on the broker{lane} (a replay would park its tasks in "
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
    holder: str | None = None,
) -> Outcome:
    """Put matching dead letters of ``queue`` back on their work queue (or ``to``).

    Each message is republished and confirmed before it is acked; with ``batch``
    N > 1, N are confirmed at a time (faster; a kill may then duplicate up to N). A message
    already replayed ``max_replays`` times is refused unless ``force``. An unroutable
    message whose routing key is no work queue has nowhere to go back to: without
    ``to`` it is refused (``Outcome.homeless``). With ``dry_run`` nothing is
    published, acked or locked: the outcome lists what would be replayed.
    Raises QueueBusy when another replay, purge or import holds ``queue``.
    """
    if to is not None:
        try:
            queues.work_queue(to)
        except ValueError as exc:
            raise DeadLetterError(str(exc)) from None
    outcome = Outcome()
    lock = None if dry_run else hold(conn, queue, holder)
    walk = _walk_holding(conn, queue, lock)
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
            profile = queues.topology(settings.queue_type)
            outgoing = [replayed_message(d, to or d.source_queue, profile) for d in window]
            # The queue each one is routed to (a high lane on quorum) must exist: the task
            # exchange would park it in unroutable.dead, confirmed, without a word.
            for target in {message.routing_key for message in outgoing} - present:
                _require_work_queue(conn, target)
                present.add(target)
            tasks = [(d.id, d.task) for d in window]
            recorder.record_replayed(settings, tasks, before_publish=True)  # a cancelled task replayed runs
            started_at = recorder.replay_started()  # a state stamped after it is a worker's: kept
            publisher.publish_many(outgoing, window=len(window))
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
        recorder.record_replayed(settings, tasks, before_publish=False, started_at=started_at)  # its state: replayed
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
            release(lock, queue)
    return outcome


def purge(
    conn: Connection,
    queue: str,
    filters: Filters,
    *,
    limit: int | None = None,
    archive: TextIO | None = None,
    progress: Callable[[DeadLetter, str], None] | None = None,
    holder: str | None = None,
) -> Outcome:
    """Delete matching dead letters of ``queue``; with ``archive``, each is written
    (and the file synced) before it is deleted. Raises QueueBusy when another
    replay, purge or import holds ``queue``."""
    outcome = Outcome()
    lock = hold(conn, queue, holder)
    walk = _walk_holding(conn, queue, lock)
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
        release(lock, queue)
    return outcome


def _walk_holding(conn: Connection, queue: str, lock: amqp.Channel | None) -> Walk:
    """A Walk of ``queue``; when it cannot start (no such queue), ``lock`` is given back first:
    a long-lived connection (the console's) would otherwise keep it."""
    try:
        return Walk(conn, queue)
    except BaseException:
        if lock is not None:
            release(lock, queue)
        raise


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
                   queue: str | None = None, *, holder: str | None = None) -> int:
    """Put archived dead letters back into their dead-letter queue (or ``queue``), confirmed.

    Headers and body are kept exactly as exported. The lock of every queue it
    imports into is held meanwhile; raises QueueBusy, importing nothing, when
    another replay, purge or import holds one.
    """
    locks: list[tuple[Any, str]] = []
    publisher = ConfirmedChannel(settings)
    try:
        for target in sorted({queue or record["queue"] for record in records}):
            locks.append((hold(conn, target, holder), target))
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
        for channel, target in locks:
            release(channel, target)
