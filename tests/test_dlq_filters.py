"""Pure logic of the dead-letter library: Filters (search, ids), summarize, the lock's holder texts. No broker."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from datetime import UTC, datetime

import pytest

from service import deadletters as dl
from service.deadletters import Filters
from service.deadletters.lock import HOLDER_CHARS, _parsed, _record


@dataclasses.dataclass
class Row:
    """A row as the console keeps it: only the attributes Filters.match and summarize read."""

    id: str = "id-1"
    task: str = "webhooks.deliver"
    exception_type: str = "requests.exceptions.ConnectTimeout"
    exception_message: str = "connect timeout to hooks.example.com"
    reason: str = "retries-exhausted"
    died_at: datetime | None = datetime(2026, 3, 1, 8, tzinfo=UTC)
    routing_key: str = "default"


SEARCHES = [
    # (search, row, matches)
    ("timeout", Row(), True),  # in the message and the class name
    ("TIMEOUT", Row(), True),  # any case
    ("Timeout", Row(exception_type="builtins.TimeoutError", exception_message="read took 5 s"), True),  # the type
    ("timeouterror", Row(exception_type="TimeoutError", exception_message=""), True),
    ("requests.exceptions", Row(), True),  # the qualified name
    ("hooks.example", Row(), True),
    ("  hooks.example  ", Row(), True),  # surrounding blanks ignored
    ("*timeout*", Row(), False),  # text, not a pattern
    ("[x]", Row(exception_message="amount [x] is wrong"), True),
    ("refused", Row(), False),
    ("straße", Row(exception_message="STRASSE 1 unknown"), True),  # casefold, not lower
    ("", Row(exception_type="", exception_message=""), True),  # empty: no search
    ("x", Row(exception_type="", exception_message=""), False),  # nothing to find it in
    ("nachricht", Row(exception_message="Ünïcode Nachricht"), True),
]


@pytest.mark.parametrize(("search", "row", "matches"), SEARCHES, ids=[repr(s) for s, *_ in SEARCHES])
def test_search_is_text_in_the_exception_message_or_class_any_case(search, row, matches):
    assert Filters(search=search).match(row) is matches


def test_search_combines_with_the_other_filters():
    row = Row()
    assert Filters(search="timeout", tasks=("webhooks.*",), reasons=("retries-exhausted",)).match(row)
    assert not Filters(search="timeout", tasks=("emails.*",)).match(row)
    assert not Filters(search="timeout", since=datetime(2026, 3, 2, tzinfo=UTC)).match(row)


def test_ids_are_matched_in_a_set_and_stay_a_tuple():
    ids = [f"id-{n}" for n in range(50_000)]
    filters = Filters(ids=ids)  # any iterable: kept as a tuple
    assert isinstance(filters.ids, tuple) and filters.ids[:2] == ("id-0", "id-1")
    rows = [Row(id=f"id-{n}") for n in range(0, 100_000, 2)]
    started = time.perf_counter()
    matched = sum(filters.match(row) for row in rows)
    assert matched == 25_000
    # 50,000 lookups in a tuple of 50,000 would take minutes; in a set, milliseconds.
    assert time.perf_counter() - started < 2.0
    assert not Filters(ids=("id-1",)).match(Row(id="id-2"))
    assert Filters().match(Row(id="anything"))


def test_filters_compare_hash_and_replace_by_their_fields():
    a = Filters(ids=["x", "y"], search="Timeout")
    b = Filters(ids=("x", "y"), search="Timeout")
    assert a == b and hash(a) == hash(b)
    assert "_ids" not in repr(a) and "_needle" not in repr(a)
    changed = dataclasses.replace(a, ids=("z",), search="refused")
    assert changed.match(Row(id="z", exception_message="connection refused"))
    assert not changed.match(Row(id="x", exception_message="connection refused"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.search = "other"  # type: ignore[misc]


def test_summarize_counts_rows_as_stats_does():
    rows = [Row(), Row(id="2", died_at=datetime(2026, 3, 2, tzinfo=UTC)),
            Row(id="3", task="emails.send", exception_type="", reason="permanent-error", died_at=None)]
    summary = dl.summarize("default.dead", rows)
    assert summary == {
        "queue": "default.dead", "count": 3,
        "oldest": "2026-03-01T08:00:00+00:00", "newest": "2026-03-02T00:00:00+00:00",
        "by_task": {"webhooks.deliver": 2, "emails.send": 1},
        "by_exception": {"requests.exceptions.ConnectTimeout": 2, "(none)": 1},
        "by_reason": {"retries-exhausted": 2, "permanent-error": 1},
    }
    assert dl.summarize("unroutable.dead", rows)["by_routing_key"] == {"default": 3}
    assert dl.summarize("bulk.dead", [])["oldest"] is None


# -- the lock's holder record and texts ---------------------------------------------------------


def test_queue_busy_names_the_holder_and_since_when():
    record = {"holder": "alice via the console (replay)", "since": "2026-03-01T08:00:00+00:00", "host": "web-1",
              "pid": 7, "queue": "default.dead"}
    busy = dl.QueueBusy("default.dead", record)
    assert busy.queue == "default.dead" and busy.holder == record
    assert str(busy) == ("another replay, purge or import is working on 'default.dead': alice via the console "
                         "(replay) since 2026-03-01T08:00:00+00:00; wait for it to finish (its lock is released "
                         "when it ends or its process dies)")
    unknown = dl.QueueBusy("bulk.dead")
    assert unknown.holder is None
    assert "'bulk.dead' (its holder left no record of who it is); wait for it to finish" in str(unknown)
    assert isinstance(unknown, dl.DeadLetterError)
    nameless = {"holder": None, "since": None, "host": None, "pid": None, "queue": "bulk.dead"}  # holder_of's
    assert dl.QueueBusy("bulk.dead", nameless).holder is None and str(dl.QueueBusy("bulk.dead", nameless)) == str(
        unknown)


def test_holder_texts():
    assert dl.holder_text({"holder": "bob", "since": "2026-03-01T08:00:00+00:00"}) == (
        "bob since 2026-03-01T08:00:00+00:00")
    assert dl.holder_text({"holder": "", "since": None, "host": "h", "pid": 3}) == "pid 3 on h"
    assert dl.holder_text({"holder": None, "since": None, "host": None, "pid": None, "queue": "q"}) == (
        "a holder that left no record")
    me = dl.process_holder("dlq replay")
    assert me.endswith(f"@{socket.gethostname()} pid {os.getpid()} (dlq replay)")
    assert dl.process_holder() == me.removesuffix(" (dlq replay)")


def test_records_are_one_line_and_only_well_formed_ones_are_read():
    record = _record("default.dead", "eve\nvia\tthe console" + "x" * 500)
    assert "\n" not in record["holder"] and "\t" not in record["holder"]
    assert record["holder"].startswith("eve via the console") and len(record["holder"]) == HOLDER_CHARS
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert datetime.fromisoformat(record["since"]).tzinfo is not None
    good = json.dumps(record).encode()
    assert _parsed(good, "default.dead") == record
    assert _parsed(good, "bulk.dead") is None  # another queue's record
    for bad in (b"not json", b"[]", b"\xff\xfe", json.dumps({**record, "pid": "7"}).encode(),
                json.dumps({**record, "pid": True}).encode(), json.dumps({**record, "since": "yesterday"}).encode(),
                json.dumps({**record, "since": "2026-03-01T08:00:00"}).encode(),  # no zone
                json.dumps({k: v for k, v in record.items() if k != "holder"}).encode()):
        assert _parsed(bad, "default.dead") is None, bad
    shifted = _parsed(json.dumps({**record, "since": "2026-03-01T10:00:00+02:00"}), "default.dead")
    assert shifted is not None and shifted["since"] == "2026-03-01T08:00:00+00:00"  # UTC
