"""The messages published on one confirm-mode channel and not yet settled by the broker.

RabbitMQ numbers the messages of a confirm-mode channel from 1 and answers
each with ``basic.ack`` or ``basic.nack`` (``multiple`` settles every tag up to
the one named). A mandatory message that reaches no queue is sent back with
``basic.return`` just before its ack; a return names no delivery tag, so it is
matched to the next acked message with the same exchange, routing key, task id
and body. ``Inflight`` keeps that book and tells each entry's ``Waiter``; it is
not thread-safe (its owner holds a lock).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from service.publishing.message import Outgoing

#: The broker has the message (queued, or held for its queues).
ACKED = "acked"
#: The broker refused it (basic.nack): not queued.
NACKED = "nacked"
#: The broker sent it back (basic.return): no queue is bound for its routing key.
RETURNED = "returned"
#: The channel or connection went away before the broker settled it: its fate is unknown.
LOST = "lost"

_ReturnKey = tuple[str, str, object, bytes]


def return_key(exchange: str, routing_key: str, task_id: object, body: bytes | str) -> _ReturnKey:
    """What a returned message is recognised by (a return carries no delivery tag).

    A body may be text (py-amqp decodes one that has a content encoding): it is compared as UTF-8.
    """
    return exchange, routing_key, task_id, body.encode() if isinstance(body, str) else bytes(body)


def _key_of(message: Outgoing) -> _ReturnKey:
    return return_key(message.exchange, message.routing_key, (message.headers or {}).get("id"), message.body)


class Waiter:
    """A caller waiting for its messages: how many are unsettled, and a wake-up call.

    ``wake`` is called (the book's lock held) when the last of them is settled,
    or when the caller's turn to read the broker's answers has come
    (``unsettled`` still above 0). A bare lock, not an Event: one release wakes
    exactly this caller, which is all a confirm needs.
    """

    __slots__ = ("_lock", "_signalled", "unsettled")

    def __init__(self) -> None:
        self.unsettled = 0
        self._lock = threading.Lock()
        self._lock.acquire()  # held: ``sleep`` blocks until ``wake`` releases it
        self._signalled = False

    @property
    def signalled(self) -> bool:
        """Whether a wake-up was given and not yet taken back by ``rearm``."""
        return self._signalled

    def wake(self) -> None:
        """Wake the caller (once until it rearms). Call with the book's lock held."""
        if not self._signalled:
            self._signalled = True
            self._lock.release()

    def rearm(self, woke: bool) -> None:
        """Take back a wake-up before looking at the state again. Call with the book's lock held.

        ``woke`` is what the last ``sleep`` returned: a wake-up that came after a
        sleep timed out is still pending on the lock and is taken here.
        """
        if self._signalled:
            if not woke:
                self._lock.acquire(blocking=False)
            self._signalled = False

    def sleep(self, timeout: float) -> bool:
        """Sleep until woken or ``timeout`` seconds passed; True when woken."""
        return self._lock.acquire(timeout=timeout)


@dataclass(eq=False)
class Pending:
    """One published message waiting for the broker: its tag, and once settled its outcome.

    ``detail`` says why a message was not acked; ``error`` is the exception that
    closed its channel, when one did. ``waiter`` is told when it is settled.
    """

    message: Outgoing
    tag: int
    waiter: Waiter
    outcome: str | None = None
    detail: str = ""
    error: BaseException | None = None

    def settle(self, outcome: str, detail: str = "", error: BaseException | None = None) -> None:
        """Record the outcome and tell the waiter (once all its messages are settled it is woken)."""
        self.outcome, self.detail, self.error = outcome, detail, error
        self.waiter.unsettled -= 1
        if self.waiter.unsettled == 0:
            self.waiter.wake()


class Inflight:
    """Unsettled messages of one channel by delivery tag, and the returns waiting for their ack."""

    def __init__(self) -> None:
        self._by_tag: OrderedDict[int, Pending] = OrderedDict()
        self._returns: list[tuple[_ReturnKey, str]] = []
        self._next_tag = 1

    def __len__(self) -> int:
        return len(self._by_tag)

    def add(self, message: Outgoing, waiter: Waiter) -> Pending:
        """Register ``message`` as the channel's next publish, before it is written.

        ``waiter`` waits for it and already counts it in ``unsettled`` (from when it was queued).
        """
        entry = Pending(message, self._next_tag, waiter)
        self._by_tag[entry.tag] = entry
        self._next_tag += 1
        return entry

    def withdraw(self, entry: Pending) -> None:
        """Take back the last registered entry, whose message was never written: its tag is the next one's."""
        if self._by_tag and next(reversed(self._by_tag)) == entry.tag:
            del self._by_tag[entry.tag]
            self._next_tag = entry.tag

    def returned(self, key: _ReturnKey, why: str) -> None:
        """The broker returned a message (its ack follows)."""
        self._returns.append((key, why))

    def settle(self, tag: int, multiple: bool, nacked: bool) -> list[Pending]:
        """Record an ack or nack of ``tag`` (and every earlier tag when ``multiple``); the entries it settled."""
        if multiple:
            tags = []
            for t in self._by_tag:
                if t > tag:
                    break  # tags are kept in publish order
                tags.append(t)
        else:
            tags = [tag] if tag in self._by_tag else []
        settled = []
        for t in tags:
            entry = self._by_tag.pop(t)
            if nacked:
                entry.settle(NACKED, "the broker refused it (nack): not queued")
            else:
                why = self._take_return(_key_of(entry.message))
                entry.settle(*((RETURNED, why) if why is not None else (ACKED,)))
            settled.append(entry)
        return settled

    def lose_all(self, detail: str, error: BaseException | None = None) -> list[Pending]:
        """The channel is gone: every unsettled entry is lost (its fate unknown); start again at tag 1."""
        lost = list(self._by_tag.values())
        for entry in lost:
            entry.settle(LOST, detail, error)
        self._by_tag.clear()
        self._returns.clear()
        self._next_tag = 1
        return lost

    def _take_return(self, key: _ReturnKey) -> str | None:
        for index, (returned, why) in enumerate(self._returns):
            if returned == key:
                del self._returns[index]
                return why
        return None
