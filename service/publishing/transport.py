"""What ``ConfirmedChannel`` needs from py-amqp's connection beyond its public methods.

The socket under a connection, whether it has something to read, sending the
frames of many messages at once, and keeping ``basic_publish`` from reading
(only one thread, the drainer, reads). Pinned to py-amqp 5.4 (pyproject.toml).
"""

from __future__ import annotations

import contextlib
import select
import socket
from collections.abc import Iterator
from typing import Any

import amqp
from kombu import Connection

#: Most bytes one receive asks for (``read_ahead``).
READ_AHEAD_BYTES = 16384
#: Bytes ``one_write`` collects before it sends them anyway (a window of big messages is not one huge send).
ONE_WRITE_MAX_BYTES = 1 << 20


def socket_of(transport_conn: amqp.Connection | None) -> socket.socket | None:
    """The socket under a py-amqp connection (None when there is none).

    Read through ``_transport``: py-amqp's ``transport`` property connects again when there is none.
    """
    return getattr(getattr(transport_conn, "_transport", None), "sock", None)


def read_ahead(transport_conn: amqp.Connection) -> None:
    """Let py-amqp read whatever the socket has (up to READ_AHEAD_BYTES), not a frame's exact bytes.

    py-amqp reads each frame with three receives (header, payload, end); the
    broker's acks come many at a time, so one receive now brings several and the
    rest wait in py-amqp's own read buffer (``readable`` looks there first).
    """
    transport = transport_conn._transport
    recv = transport._quick_recv
    transport._quick_recv = lambda n: recv(max(n, READ_AHEAD_BYTES))


def readable(sock: socket.socket, timeout: float, transport_conn: amqp.Connection | None = None) -> bool:
    """Whether ``sock`` has something to read within ``timeout`` seconds (a closed socket counts: reading says so).

    Bytes already in py-amqp's read buffer (``read_ahead``) count too.
    """
    if transport_conn is not None and getattr(getattr(transport_conn, "_transport", None), "_read_buffer", b""):
        return True
    pending = getattr(sock, "pending", None)  # TLS: bytes already decrypted are invisible to poll
    if pending is not None and pending():
        return True
    try:
        poller = select.poll()  # not select(): a descriptor above 1024 is fine
        poller.register(sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(max(0, int(timeout * 1000))))
    except (OSError, ValueError):
        return True


def no_reads_while_publishing(transport_conn: amqp.Connection) -> None:
    """Keep py-amqp's basic_publish from reading the socket itself.

    When the broker supports ``connection.blocked`` py-amqp drains incoming frames
    inside every basic_publish; here only the drainer reads, so that a thread
    waiting for the socket is never left waiting for confirms another already read.
    The capability stays negotiated: blocked notifications still arrive, and are read.
    """
    properties = dict(transport_conn.client_properties)
    properties["capabilities"] = {**(properties.get("capabilities") or {}), "connection.blocked": False}
    transport_conn.client_properties = properties


@contextlib.contextmanager
def one_write(transport_conn: amqp.Connection | None) -> Iterator[None]:
    """Collect the frames written inside the block and send them to the socket at once, at its end.

    One send instead of one per message: on loopback each send costs about as
    much as the broker's work on a small message. Uses py-amqp's per-write hook
    (``transport._write``); frames are complete when collected, so what was
    collected before an error is still sent.
    """
    transport = getattr(transport_conn, "_transport", None)
    real_write = getattr(transport, "_write", None)
    if real_write is None:
        yield
        return
    own = "_write" in vars(transport)  # TCP: the socket's sendall, set on the instance; TLS: the class's method
    chunks: list[bytes] = []
    size = [0]

    def collect(data: Any) -> None:
        chunks.append(bytes(data))  # a copy: py-amqp reuses its frame buffer
        size[0] += len(chunks[-1])
        if size[0] >= ONE_WRITE_MAX_BYTES:  # big messages: send as they come, not all at the end
            flush()

    def flush() -> None:
        data = b"".join(chunks)
        chunks.clear()
        size[0] = 0
        real_write(data)

    transport._write = collect
    try:
        yield
    finally:
        if own:
            transport._write = real_write
        else:
            del transport._write
        if chunks:
            flush()


def no_revive(channel: amqp.Channel) -> None:
    """When the broker closes ``channel``, let it stay closed (py-amqp would reopen it and wait for that).

    py-amqp answers a Channel.Close, then reopens the channel (without confirm
    mode) and waits for the broker inside the reader before it raises. Here the
    reader raises at once, and the channel is marked closed so its owner can
    tell which channel the error was about.
    """
    channel._do_revive = lambda: setattr(channel, "is_open", False)


def close_quietly(conn: Connection) -> None:
    """Let go of a connection without talking to the broker (it may be gone); never raises."""
    try:
        conn.collect()
    except Exception:  # noqa: BLE001 - the socket may be gone already
        pass
