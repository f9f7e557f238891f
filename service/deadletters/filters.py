"""Which dead letters an operation takes: the filters of ``dlq list|replay|purge|export``."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from service.deadletters.letter import DeadLetter, DeadLetterError, as_utc

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_moment(text: str, now: datetime | None = None) -> datetime:
    """ISO 8601 (``2026-11-21``, ``2026-11-21T14:00``, with or without zone; UTC
    when none) or an age (``30m``, ``2h``, ``7d`` ago)."""
    value = text.strip()
    match = _RELATIVE.match(value)
    if match:
        return (now or datetime.now(UTC)) - timedelta(seconds=float(match[1]) * _UNITS[match[2]])
    try:
        return as_utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
    except ValueError:
        raise DeadLetterError(
            f"cannot read the time {text!r}: use ISO 8601 (2026-11-21 or 2026-11-21T14:30:00Z) "
            "or an age like 30m, 2h, 7d"
        ) from None


@dataclass(frozen=True)
class Filters:
    """Which dead letters an operation takes. Empty fields match everything.

    ``task`` and ``exception`` accept shell-style patterns (``emails.*``,
    ``*Timeout*``); ``exception`` matches the qualified or the short class name.
    """

    tasks: tuple[str, ...] = ()
    exceptions: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    ids: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None

    def match(self, letter: DeadLetter) -> bool:
        """True when ``letter`` passes every filter given."""
        if self.ids and letter.id not in self.ids:
            return False
        if self.tasks and not any(fnmatch.fnmatchcase(letter.task, p) for p in self.tasks):
            return False
        if self.exceptions:
            full = letter.exception_type
            short = full.rsplit(".", 1)[-1]
            if not any(fnmatch.fnmatchcase(full, p) or fnmatch.fnmatchcase(short, p) for p in self.exceptions):
                return False
        if self.reasons and letter.reason not in self.reasons:
            return False
        if self.since or self.until:
            died = letter.died_at
            if died is None or (self.since and died < self.since) or (self.until and died > self.until):
                return False
        return True
