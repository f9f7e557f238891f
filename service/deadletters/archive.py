"""The dead-letter archive: JSON Lines that ``dlq export`` and ``purge --archive`` write and ``dlq import`` reads.

One record per dead letter, with its body (base64), headers, properties and the
routing key it was delivered with (what an unroutable message was published
with; records written before it was recorded have none).
AMQP values JSON lacks (timestamps, bytes, decimals) are tagged so they come
back as the same types: an export, purge and import round-trip a message byte
for byte, headers included.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from service import headers as h
from service import queues
from service.deadletters.letter import DeadLetter, DeadLetterError, from_jsonable, to_jsonable

#: The ``format`` of every archive record; a reader refuses any other.
EXPORT_FORMAT = "celery-rabbitmq-kit/dead-letter/v1"


def export_record(letter: DeadLetter) -> dict[str, Any]:
    """One JSON Lines record of the archive: everything needed to put it back."""
    return {
        "format": EXPORT_FORMAT,
        "queue": letter.queue,
        "id": letter.id,
        "body": base64.b64encode(letter.body).decode(),
        "headers": to_jsonable(letter.headers),
        "properties": to_jsonable(letter.properties),
        "routing_key": letter.routing_key,
        "exported_at": h.utc_now_iso(),
    }


def read_archive(path: Path) -> list[dict[str, Any]]:
    """Read and check a whole archive before anything is published.

    Raises DeadLetterError naming the first bad line.
    """
    records = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DeadLetterError(f"cannot read {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if record.get("format") != EXPORT_FORMAT:
                raise ValueError(f"not a {EXPORT_FORMAT} record")
            if record["queue"] not in queues.DEAD_LETTER_QUEUE_NAMES:
                raise DeadLetterError(f"unknown dead-letter queue {record['queue']!r}; the kit's are "
                                      f"{', '.join(queues.DEAD_LETTER_QUEUE_NAMES)}")
            if not isinstance(record.setdefault("routing_key", ""), str):
                raise ValueError("routing_key is not a string")
            record["body"] = base64.b64decode(record["body"], validate=True)
            record["headers"] = from_jsonable(record["headers"])
            record["properties"] = from_jsonable(record["properties"])
        except DeadLetterError as exc:
            raise DeadLetterError(f"{path}:{number}: {exc}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DeadLetterError(f"{path}:{number}: not a dead-letter record ({exc}); nothing was imported") from None
        records.append(record)
    return records
