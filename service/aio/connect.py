"""Open an aio-pika connection to any node of KIT_BROKER_URL, sorting failures as service.connection does.

One attempt per node, the last good one first (shared with the sync client),
all within one deadline. What cannot heal (a refused login, a missing vhost,
TLS) is the same BrokerRefused, in the same words, as the sync client's:
aiormq's errors are translated into py-amqp's and judged by
``service.connection.refusal``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Mapping
from typing import Any

import aio_pika
import aiormq
import amqp
from aio_pika.connection import make_url
from kombu import Connection
from kombu.utils.url import parse_url

from service.connection import _last_good, _node_specific, refusal
from service.errors import BrokerRefused
from service.settings import Settings, redact_url

__all__ = ["CLOSE_TIMEOUT_S", "NoAnswer", "connect", "reply_text", "ssl_context"]

#: Seconds closing a connection may take before it is abandoned.
CLOSE_TIMEOUT_S = 2.0


class NoAnswer(ConnectionError):
    """The broker did not answer (connect, handshake or channel) in time."""


def ssl_context(options: Mapping[str, Any]) -> ssl.SSLContext:
    """An SSLContext from ``Settings.broker_ssl``, the sync client's TLS options: certificate and host verified."""
    context = ssl.create_default_context(cafile=options.get("ca_certs") or None)
    if options.get("certfile"):
        context.load_cert_chain(options["certfile"], options.get("keyfile") or None)
    return context


def reply_text(exc: BaseException) -> str:
    """The broker's reply text of an aiormq error (its string argument), else the error in words."""
    if isinstance(exc, NoAnswer | TimeoutError):
        return str(exc) or "no answer from the broker in time"
    cause = exc.__cause__ if isinstance(exc, aiormq.exceptions.AMQPConnectionError) and exc.__cause__ else exc
    texts = [a for a in getattr(cause, "args", ()) if isinstance(a, str)]
    return texts[-1] if texts else str(cause) or type(cause).__name__


async def connect(settings: Settings, context: ssl.SSLContext | None, end: float) -> aio_pika.abc.AbstractConnection:
    """A connection to the first node that answers before ``end`` (loop time); BrokerRefused for what cannot heal.

    Raises the last node's error (NoAnswer for a silent one) when none answered.
    """
    loop = asyncio.get_running_loop()
    nodes = _last_good.order(settings.broker_url)
    last: BaseException = NoAnswer()
    for index, node in enumerate(nodes):
        left = end - loop.time()
        if index and left <= 0:
            break
        conn = aio_pika.Connection(_node_url(node), ssl_context=context)
        try:
            async with asyncio.timeout(max(left, 0.1)):
                await conn.connect()
        except Exception as exc:  # noqa: BLE001 - sorted below into "refused" and "may heal"
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), CLOSE_TIMEOUT_S)
            refused = await _refusal(exc, node, len(nodes), settings, max(end - loop.time(), 0.5))
            if refused is not None:
                raise refused from None
            last = NoAnswer(f"no answer from {redact_url(node)} in time") if isinstance(exc, TimeoutError) else exc
            continue
        _last_good.worked(settings.broker_url, node)
        return conn
    raise last


def _node_url(node: str) -> Any:
    """aio-pika's URL for one kombu-style node URL (``pyamqp://user:password@host:port/vhost``, kombu's defaults)."""
    p = parse_url(node)
    tls = p["transport"] == "amqps"
    return make_url(host=p["hostname"] or "localhost", port=p["port"] or (5671 if tls else 5672),
                    login=p["userid"] or "guest", password=p["password"] or "guest",
                    virtualhost=p["virtual_host"] or "/", ssl=tls)


async def _refusal(exc: BaseException, node: str, nodes: int, settings: Settings,
                   timeout: float) -> BrokerRefused | None:
    """service.connection's verdict on a failure to connect, from aiormq's error turned into py-amqp's."""
    cause: BaseException | None = exc.__cause__ if isinstance(exc.__cause__, ssl.SSLError) else exc
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        cause = amqp.exceptions.AccessRefused(reply_text=reply_text(exc))
    elif isinstance(exc, aiormq.exceptions.ConnectionNotAllowed):
        cause = amqp.exceptions.NotAllowed(reply_text=reply_text(exc))
    elif isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc):
        # aiormq 7.2 loses the broker's reason when it refuses the vhost: ask py-amqp, once, off the loop.
        cause = await asyncio.to_thread(_probe, node, settings.broker_ssl, timeout)
    if cause is None:
        return None
    refused = refusal(cause, node)
    return None if refused is None or (nodes > 1 and _node_specific(cause)) else refused


def _probe(node: str, ssl_options: dict[str, Any] | None, timeout: float) -> BaseException | None:
    """Connect to ``node`` with py-amqp once; the error, or None."""
    conn = Connection(node, connect_timeout=timeout, ssl=dict(ssl_options) if ssl_options else False)
    try:
        conn.ensure_connection(max_retries=0, reraise_as_library_errors=False)
        return None
    except Exception as exc:  # noqa: BLE001 - sorted by the caller
        return exc
    finally:
        conn.release()
