"""Dead letters: what died and why; browse, stats, replay, purge, export and import them.

What lives here: ``letter`` (the ``DeadLetter`` model and the codec of its AMQP
values), ``filters`` (which dead letters an operation takes), ``archive`` (the
JSON Lines format of export, import and purge --archive), ``reader`` (the
unacked walk over a queue), ``lock`` (the per-queue lock of replay, purge and
import, and the record of who holds it) and ``operations`` (what the ``dlq``
commands do). Import the names below from ``service.deadletters``.

May import: ``service.queues``, ``service.headers``, ``service.errors``,
``service.settings``, ``service.publishing`` (confirmed republishing). Never the
command line (``service.cli``), the worker or the local stack; the workers do
not import this package.
"""

from service.deadletters.archive import EXPORT_FORMAT, export_record, read_archive
from service.deadletters.filters import Filters, Matchable, parse_moment
from service.deadletters.letter import (
    REASON_UNROUTABLE,
    DeadLetter,
    DeadLetterError,
    as_utc,
    from_jsonable,
    resolve_queues,
    to_jsonable,
    work_queue_of,
)
from service.deadletters.lock import (
    HOLDER_EXCHANGE,
    QueueBusy,
    hold,
    holder_of,
    holder_queue_name,
    holder_text,
    is_busy,
    process_holder,
    release,
)
from service.deadletters.operations import (
    BATCH,
    REPLAY_BATCH,
    Outcome,
    browse,
    export,
    find,
    import_records,
    purge,
    replay,
    replayed_message,
    stats,
    summarize,
)
from service.deadletters.reader import Walk

__all__ = [
    "BATCH", "EXPORT_FORMAT", "HOLDER_EXCHANGE", "REASON_UNROUTABLE", "REPLAY_BATCH", "DeadLetter", "DeadLetterError",
    "Filters", "Matchable", "Outcome", "QueueBusy", "Walk", "as_utc", "browse", "export", "export_record", "find",
    "from_jsonable", "hold", "holder_of", "holder_queue_name", "holder_text", "import_records", "is_busy",
    "parse_moment", "process_holder", "purge", "read_archive", "release", "replay", "replayed_message",
    "resolve_queues", "stats", "summarize", "to_jsonable", "work_queue_of",
]
