"""The dead-letter archive format, without a broker."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from service.deadletters import EXPORT_FORMAT, DeadLetterError, from_jsonable, read_archive, to_jsonable


def test_header_values_json_lacks_come_back_as_the_same_types():
    headers = {"x-death": [{"time": datetime(2026, 11, 21, 14, 0, tzinfo=UTC), "count": 3}],
               "raw": b"\x00\xff", "ratio": Decimal("0.25"), "plain": ["a", 1, None, True]}
    assert from_jsonable(json.loads(json.dumps(to_jsonable(headers)))) == headers


def test_an_archive_naming_a_queue_of_another_system_is_refused_with_its_line(tmp_path: Path):
    record = {"format": EXPORT_FORMAT, "queue": "default.dead", "id": "a", "body": "eA==", "headers": {},
              "properties": {}}
    path = tmp_path / "archive.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(dict(record, queue="orders.dead")) + "\n")
    with pytest.raises(DeadLetterError, match=r"archive.jsonl:2: unknown dead-letter queue 'orders.dead'; the kit"):
        read_archive(path)
    path.write_text(json.dumps(record) + "\n")
    [loaded] = read_archive(path)
    assert loaded["body"] == b"x" and loaded["queue"] == "default.dead"
