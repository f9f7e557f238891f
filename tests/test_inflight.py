"""The in-flight book of a confirm-mode channel: tags, acks (multiple), nacks, returns matched to their ack."""

from __future__ import annotations

from service.publishing import Outgoing
from service.publishing.inflight import ACKED, LOST, NACKED, RETURNED, Inflight, Waiter, return_key


def _message(task_id: str, body: bytes | str = b"[]", routing_key: str = "default") -> Outgoing:
    return Outgoing("tasks", routing_key, body, {"id": task_id}, {})


def test_tags_count_from_one_and_a_multiple_ack_settles_every_earlier_tag():
    book, waiter = Inflight(), Waiter()
    waiter.unsettled = 4  # counted when its caller queued them
    entries = [book.add(_message(f"t{n}"), waiter) for n in range(4)]
    assert [e.tag for e in entries] == [1, 2, 3, 4] and waiter.unsettled == 4
    assert book.settle(3, multiple=True, nacked=False) == entries[:3]
    assert [e.outcome for e in entries] == [ACKED, ACKED, ACKED, None] and not waiter.signalled
    book.settle(4, multiple=False, nacked=True)
    assert entries[3].outcome == NACKED and waiter.unsettled == 0 and waiter.signalled
    assert book.settle(4, multiple=False, nacked=False) == []  # settled once only


def test_a_return_marks_the_next_ack_of_the_same_message_returned_not_another():
    book, mine, other = Inflight(), Waiter(), Waiter()
    mine.unsettled = other.unsettled = 1
    returned = book.add(_message("same", body='["x"]'), mine)  # a text body: py-amqp decodes some
    fine = book.add(_message("other"), other)
    book.returned(return_key("tasks", "default", "same", b'["x"]'), "no queue")
    book.settle(2, multiple=True, nacked=False)
    assert (returned.outcome, returned.detail) == (RETURNED, "no queue") and fine.outcome == ACKED


def test_losing_the_channel_settles_everything_as_lost_and_starts_again_at_tag_1():
    book, waiter = Inflight(), Waiter()
    waiter.unsettled = 3
    entries = [book.add(_message(f"t{n}"), waiter) for n in range(3)]
    error = OSError("reset")
    book.lose_all("the connection broke", error)
    assert {e.outcome for e in entries} == {LOST} and all(e.error is error for e in entries)
    assert waiter.signalled and len(book) == 0
    assert book.add(_message("again"), waiter).tag == 1
