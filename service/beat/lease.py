"""Beat's schedule lease: an exclusive queue, held by a connection of its own.

Several beats may run; the one whose connection holds the lease schedules. The
lease is the queue ``queues.BEAT_LEASE_QUEUE`` declared exclusive and
auto-delete, the idea of the dlq tools' per-queue lock: RabbitMQ lets one
connection declare it (any other gets 405 RESOURCE_LOCKED) and deletes it when
that connection closes. A holder whose process dies frees it at once (its TCP
connection closes); one that hangs, or whose network goes, frees it when the
broker misses its heartbeats (after 2 to 3 times ``LEASE_HEARTBEAT_S``).
KIT_BROKER_URL is used as given, so a list of nodes (``url1;url2``) fails over
between them.

What a ``Lease`` promises (it does no I/O until ``acquire``; one thread only):

- ``acquire()`` is one attempt, within KIT_CONNECT_TIMEOUT per node and
  ``IO_TIMEOUT_S`` per round trip: True when this process holds the lease, False
  when another connection does; LeaseUnavailable (one line, the cause) when the
  broker cannot be reached or refuses.
- ``confirm()`` proves by a round trip that the lease is still this
  connection's, or raises LeaseLost and closes the connection.
- ``open_channel()`` gives a channel on the lease connection: what is confirmed
  on it reached the broker before the broker could free the lease to anyone else.
- ``keepalive()`` keeps an idle connection's heartbeats going; ``release()``
  gives the lease back. Neither raises.
"""

from __future__ import annotations

import contextlib
from typing import Any

import amqp
from kombu import Connection

from service import queues
from service.connection import permission_refused, refusal
from service.errors import KitError
from service.settings import Settings, redact_url

#: AMQP heartbeat of the lease connection, in seconds. RabbitMQ closes a connection
#: that sent nothing for 2 to 3 times this (it checks once per heartbeat and gives
#: up after two silent checks; 25.8 s measured with 10), which frees the lease of a
#: hung beat or one cut off by the network: 10 to 15 s here. RabbitMQ advises no
#: less than 5 s: lower values misfire on a busy host.
LEASE_HEARTBEAT_S = 5
#: Longest wait for one answer of the broker on the lease connection (a declare, a
#: confirm); a broker slower than that counts as gone.
IO_TIMEOUT_S = 5.0
#: What beat's user must be allowed, for messages about a refusal.
RIGHTS = (f"configure on queues {queues.BEAT_LEASE_QUEUE!r}, {queues.BEAT_STATE_QUEUE!r} and exchange "
          f"{queues.BEAT_STATE_EXCHANGE!r}, write and read on {queues.BEAT_STATE_EXCHANGE!r} and "
          f"{queues.BEAT_STATE_QUEUE!r}")
#: How to get those rights.
RIGHTS_FIX = (f"Beat's user needs {RIGHTS}; the kit-publisher role has them (`python -m service broker "
              "provision` sets them up again).")


class LeaseUnavailable(KitError):
    """The lease could not be tried: the broker is unreachable, or refused (login, vhost, rights)."""


class LeaseLost(KitError):
    """The lease is no longer this connection's (or the connection failed)."""


def describe(exc: BaseException) -> str:
    """An exception in one line: its text, or its type when it has none."""
    return " ".join(str(exc).split()) or type(exc).__name__


def poll_interval(retry: float) -> float:
    """Longest sleep of a beat between two ticks: every tick talks on the lease connection."""
    return min(retry, LEASE_HEARTBEAT_S / 4)


class Lease:
    """The schedule lease of one beat process, on its own heartbeat connection."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._conn: Connection | None = None
        self._channel: Any = None  # the channel that declared the lease, while it is held
        self._idle: Any = None  # a channel for keepalive round trips

    @property
    def held(self) -> bool:
        """Whether this process took the lease and has not lost or released it since."""
        return self._channel is not None

    @property
    def where(self) -> str:
        """The broker node of the lease connection (host:port), for logs."""
        conn = self._conn
        return f"{conn.hostname}:{conn.port}" if conn is not None else "(not connected)"

    def acquire(self) -> bool:
        """One attempt to take the lease: True held, False held by another; LeaseUnavailable else."""
        if self.held:
            return True
        conn = self._connected()
        try:
            channel = conn.channel()
            channel.queue_declare(queues.BEAT_LEASE_QUEUE, exclusive=True, auto_delete=True)
        except amqp.exceptions.ResourceLocked:
            return False  # the broker closed that channel; the connection stays for the next attempt
        except amqp.exceptions.AccessRefused as exc:
            self._drop()
            raise LeaseUnavailable(str(permission_refused(exc, "taking beat's schedule lease", {"queue": "configure"},
                                                          advice=RIGHTS_FIX))) from None
        except Exception as exc:  # noqa: BLE001 - any other failure: the connection is not usable
            self._drop()
            raise LeaseUnavailable(f"the connection to the broker at {self.where} failed: {describe(exc)}") from None
        self._channel = channel
        return True

    def confirm(self) -> None:
        """A round trip proving the lease is still this connection's; LeaseLost (connection closed) if not."""
        if self._channel is None:
            raise LeaseLost("this beat does not hold the lease")
        try:
            self._channel.queue_declare(queues.BEAT_LEASE_QUEUE, passive=True)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the lease cannot be trusted any more
            self._drop()
            raise LeaseLost(f"the lease connection to {self.where} failed: {describe(exc)}") from None

    def open_channel(self) -> Any:
        """A new channel on the lease connection (held lease only); LeaseLost when that fails."""
        if self._conn is None or self._channel is None:
            raise LeaseLost("this beat does not hold the lease")
        try:
            return self._conn.channel()
        except Exception as exc:  # noqa: BLE001
            self._drop()
            raise LeaseLost(f"the lease connection to {self.where} failed: {describe(exc)}") from None

    def keepalive(self) -> None:
        """A round trip on an idle connection so neither side's heartbeat check closes it; never raises.

        A failure closes the connection: the next ``acquire`` connects again.
        """
        if self._conn is None or not self._conn.connected:
            return
        try:
            if self._idle is None or not self._idle.is_open:
                self._idle = self._conn.channel()
            self._idle.basic_qos(0, 0, False)
        except Exception:  # noqa: BLE001 - a broken connection is reopened by the next attempt
            self._drop()

    def release(self) -> None:
        """Give the lease back and close the connection (the broker deletes the queue with it); never raises."""
        if self._conn is not None and self._conn.connected:
            with contextlib.suppress(Exception):
                self._conn.release()  # a proper close: the broker frees the lease at once
        self._drop()

    def _connected(self) -> Connection:
        """The lease connection, connected (each node of KIT_BROKER_URL tried once), or LeaseUnavailable."""
        if self._conn is None:
            settings = self._settings
            ssl = dict(settings.broker_ssl) if settings.broker_ssl else False
            self._conn = Connection(settings.broker_url, heartbeat=LEASE_HEARTBEAT_S, ssl=ssl,
                                    connect_timeout=settings.connect_timeout,
                                    transport_options={"read_timeout": IO_TIMEOUT_S, "write_timeout": IO_TIMEOUT_S})
        conn = self._conn
        if conn.connected:
            return conn
        try:
            conn.ensure_connection(max_retries=max(len(conn.alt), 1) - 1, interval_start=0, interval_step=0,
                                   interval_max=0, reraise_as_library_errors=False)
        except Exception as exc:  # noqa: BLE001 - sorted by refusal() into "refused" and "may heal"
            # The nodes of one cluster share the user and vhost that refusal() names.
            refused = refusal(exc, self._settings.broker_url.split(";")[0])
            self._drop()
            if refused is not None:
                raise LeaseUnavailable(str(refused)) from None
            raise LeaseUnavailable(f"cannot reach the broker at {redact_url(self._settings.broker_url)}: "
                                   f"{describe(exc)}") from None
        return conn

    def _drop(self) -> None:
        """Forget the channels and close the connection without waiting for the broker."""
        self._channel = self._idle = None
        conn = self._conn
        if conn is None:
            return
        with contextlib.suppress(Exception):
            conn.collect()  # drops the socket: nothing to wait for on a connection that failed
        with contextlib.suppress(Exception):
            conn.maybe_switch_next()  # the next attempt starts at the next node of a cluster
