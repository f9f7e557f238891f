"""Open a connection to the broker, and say in one line why one could not be opened.

Two kinds of failure, treated differently:

- what may heal by itself (nothing listening yet, a timeout, a broker that is
  starting or at its connection limit) is retried with a short backoff until
  KIT_CONNECT_TIMEOUT has passed, then raised as BrokerUnavailable;
- what cannot heal until someone changes something (a refused login, a vhost
  that does not exist or that the user may not use, a certificate that does
  not verify, a right the user lacks) is raised at once as BrokerRefused, with
  the user, vhost or resource named and the fix.

``refusal`` is the one place that tells the two apart; the publisher
(service.publishing), the start-up checks (service.startup) and the command
line (service.cli.base) all use it.
"""

from __future__ import annotations

import re
import ssl
import threading
import time
from typing import Any
from urllib.parse import unquote, urlsplit

import amqp
from kombu import Connection

from service.errors import BrokerRefused, BrokerUnavailable
from service.setting_rules import split_broker_urls
from service.settings import Settings, redact_url

#: First pause between two attempts to connect; each pause doubles, up to the next.
FIRST_BACKOFF_S = 0.1
#: Longest pause between two attempts to connect.
MAX_BACKOFF_S = 1.0

# RabbitMQ's wording (3.10): "NOT_ALLOWED - vhost kit not found", "NOT_ALLOWED -
# access to vhost 'kit' refused for user 'u'" (no permissions there), the same
# with ": connection limit (5) is reached" (transient), and for a resource
# "ACCESS_REFUSED - access to exchange 'tasks' in vhost 'kit' refused for user 'u'".
_VHOST_MISSING = re.compile(r"vhost (?P<vhost>.*?) not found")
_VHOST_REFUSED = re.compile(r"access to vhost '(?P<vhost>[^']*)' refused for user '(?P<user>[^']*)'")
_RESOURCE_REFUSED = re.compile(
    r"access to (?P<kind>exchange|queue|topic) '(?P<name>[^']*)' in vhost '(?P<vhost>[^']*)' "
    r"refused for user '(?P<user>[^']*)'"
)
# OpenSSL reasons that mean the broker refused our (missing) client certificate.
_CLIENT_CERT_REASONS = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN")


def user_and_vhost(url: str) -> tuple[str, str]:
    """The user name and vhost a broker URL names (kombu's defaults: guest, ``/``); of node 1 in a ``;`` list."""
    parts = urlsplit(split_broker_urls(url)[0])
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    return unquote(parts.username or "guest"), unquote(path) or "/"


def _reply_text(exc: BaseException) -> str:
    return str(getattr(exc, "reply_text", "") or exc)


def refusal(exc: BaseException, url: str) -> BrokerRefused | None:
    """The BrokerRefused that a failure to connect means, or None when it may heal (retry it).

    ``url`` is the broker URL that was used (its password is never shown).
    """
    where = redact_url(url)
    user, vhost = user_and_vhost(url)
    text = _reply_text(exc)
    if isinstance(exc, amqp.exceptions.AccessRefused):
        if _RESOURCE_REFUSED.search(text):
            return permission_refused(exc, "connecting")
        return BrokerRefused(
            f"the broker at {where} refused the login of user {user!r} (403 ACCESS_REFUSED): the user "
            "does not exist or the password is wrong. Check the user in KIT_BROKER_URL and its password "
            "(the file KIT_BROKER_PASSWORD_FILE names, or the URL's)."
        )
    if isinstance(exc, amqp.exceptions.NotAllowed):
        if "limit" in text:
            return None  # a connection limit: other connections may close
        if match := _VHOST_MISSING.search(text):
            vhost = match["vhost"]
            return BrokerRefused(
                f"vhost {vhost!r} does not exist on the broker at {where} (530 NOT_ALLOWED). Check the "
                "vhost at the end of KIT_BROKER_URL, or create it with the kit's users, permissions and "
                f"topology: `python -m service broker provision --vhost {vhost} --secrets-dir DIR` (or "
                f"`rabbitmqctl add_vhost {vhost}`, then `rabbitmqctl set_permissions -p {vhost} {user} ...`)."
            )
        if match := _VHOST_REFUSED.search(text):
            vhost, user = match["vhost"], match["user"]
            return BrokerRefused(
                f"user {user!r} may not use vhost {vhost!r} on the broker at {where} (530 NOT_ALLOWED: "
                f"the user has no permissions there). Grant them with `rabbitmqctl set_permissions -p "
                f"{vhost} {user} <configure> <write> <read>` (`python -m service broker provision` sets "
                "up the kit's users), or put a user of that vhost in KIT_BROKER_URL."
            )
        return BrokerRefused(f"the broker at {where} does not allow the connection ({text}); check KIT_BROKER_URL.")
    if isinstance(exc, amqp.exceptions.InvalidPath):
        return BrokerRefused(f"the broker at {where} refused vhost {vhost!r} ({text}); check KIT_BROKER_URL.")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return BrokerRefused(
            f"TLS certificate verification of the broker at {where} failed: {exc.verify_message or exc}. "
            "Set KIT_BROKER_CA_FILE to the CA that signed the broker's certificate and use the host name "
            "the certificate names in KIT_BROKER_URL."
        )
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", "") or ""
        if reason == "WRONG_VERSION_NUMBER":
            return BrokerRefused(
                f"the broker at {where} does not speak TLS on that port ({reason}): use the broker's TLS "
                "port (5671) with amqps://, or pyamqp:// with its plain port (5672), in KIT_BROKER_URL."
            )
        if any(r in reason for r in _CLIENT_CERT_REASONS):
            return BrokerRefused(
                f"the broker at {where} refused the TLS client certificate ({reason}): set "
                "KIT_BROKER_CLIENT_CERT_FILE and KIT_BROKER_CLIENT_KEY_FILE to a certificate its CA signed."
            )
    return None


def permission_refused(exc: BaseException, doing: str, rights: dict[str, str] | None = None,
                       advice: str = "") -> BrokerRefused:
    """A BrokerRefused for a 403 on an operation (a declare, a bind, a read), naming user and resource.

    ``doing`` says what needed the right ("declaring the topology"), ``rights``
    which right that operation needs on each kind of resource ({"queue":
    "configure"}), ``advice`` replaces the general fix.
    """
    text = _reply_text(exc)
    match = _RESOURCE_REFUSED.search(text)
    if not match:
        return BrokerRefused(f"the broker refused {doing} ({text}). {advice or _grant('VHOST', 'USER')}")
    user, kind, name, vhost = match["user"], match["kind"], match["name"], match["vhost"]
    right = (rights or {}).get(kind)
    lacks = f"the {right} right" if right else "a right"
    return BrokerRefused(
        f"user {user!r} lacks {lacks} on {kind} {name!r} in vhost {vhost!r}, which {doing} needs "
        f"(403 ACCESS_REFUSED). {advice or _grant(vhost, user)}"
    )


def _grant(vhost: str, user: str) -> str:
    return (
        "Run it as a user that has the right (the kit's admin), or grant it: `rabbitmqctl set_permissions "
        f"-p {vhost} {user} <configure> <write> <read>` (see `python -m service broker`)."
    )


class _LastGoodNode:
    """Index of the node (in KIT_BROKER_URL's list) this process last connected to; tried first next time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._index: dict[str, int] = {}

    def order(self, url: str) -> list[str]:
        """The node URLs of ``url``, starting with the one that worked last."""
        nodes = split_broker_urls(url)
        with self._lock:
            first = self._index.get(url, 0) % len(nodes)
        return nodes[first:] + nodes[:first]

    def worked(self, url: str, node_url: str) -> None:
        """Remember that ``node_url`` (one of ``url``'s nodes) took a connection."""
        nodes = split_broker_urls(url)
        with self._lock:
            self._index[url] = nodes.index(node_url) if node_url in nodes else 0


_last_good = _LastGoodNode()


def open_connection(settings: Settings, timeout: float, **options: Any) -> Connection:
    """One attempt at each node of KIT_BROKER_URL, the last good one first; the first that answers wins.

    The connection returned keeps every node as its failover list, starting with
    the one it is on, so kombu's own reconnects move on to the next node. Each
    attempts together take at most ``timeout`` seconds (a node that does not
    answer gets what is left). Raises BrokerRefused at once for what retrying
    cannot heal on any node (a refused login, a missing vhost, TLS: the nodes
    of a cluster share users and vhosts), else the last node's error.
    """
    nodes = _last_good.order(settings.broker_url)
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    for index, node in enumerate(nodes):
        left = deadline - time.monotonic()
        if index and left <= 0:
            break
        conn = Connection(";".join(nodes[index:] + nodes[:index]), connect_timeout=max(left, 0.1),
                          ssl=dict(settings.broker_ssl) if settings.broker_ssl else False, **options)
        try:
            conn.ensure_connection(max_retries=0, reraise_as_library_errors=False)  # one attempt
        except Exception as exc:  # noqa: BLE001 - sorted below into "refused" and "may heal"
            conn.release()
            refused = refusal(exc, node)
            if refused is not None and not (len(nodes) > 1 and _node_specific(exc)):
                raise refused from None
            last_error = exc
            continue
        _last_good.worked(settings.broker_url, node)
        return conn
    assert last_error is not None
    raise last_error


def _node_specific(exc: BaseException) -> bool:
    """A refusal that may be this node's alone (e.g. "vhost kit is down" on one node): try the next node."""
    if not isinstance(exc, amqp.exceptions.NotAllowed):
        return False
    text = _reply_text(exc)
    return not (_VHOST_MISSING.search(text) or _VHOST_REFUSED.search(text))


def connect(settings: Settings) -> Connection:
    """Open a kombu connection to the broker (any node of KIT_BROKER_URL), or raise.

    Transient failures are retried with a short backoff until
    ``settings.connect_timeout`` has passed, then BrokerUnavailable is raised;
    BrokerRefused at once when retrying cannot help (see ``refusal``).
    """
    deadline = time.monotonic() + settings.connect_timeout
    backoff = FIRST_BACKOFF_S
    while True:
        remaining = deadline - time.monotonic()
        try:
            return open_connection(settings, remaining)
        except BrokerRefused:
            raise
        except Exception as exc:  # noqa: BLE001 - every node failed in a way that may heal
            last_error = exc
        if time.monotonic() + backoff >= deadline:
            raise BrokerUnavailable(
                f"cannot connect to the broker at {redact_url(settings.broker_url)} within "
                f"{settings.connect_timeout:g}s (KIT_CONNECT_TIMEOUT): {str(last_error) or type(last_error).__name__}. "
                "Check that RabbitMQ runs and listens there and that the host and port of KIT_BROKER_URL "
                "are right."
            ) from None
        time.sleep(backoff)
        backoff = min(backoff * 2, MAX_BACKOFF_S)
