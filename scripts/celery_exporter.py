"""Run danihodovic/celery-exporter with the kit's broker settings.

The exporter takes its broker only as ``--broker-url`` with the password in it,
which would put the password on the command line (``ps`` shows it) and in
compose files. This launcher builds that URL inside the process from the kit's
own settings, as the workers do, and passes every other argument unchanged:

    KIT_BROKER_URL            pyamqp://kit-monitor@rabbitmq:5672/kit (no password); for a
                              cluster one URL per node separated by ';' (kombu's failover
                              syntax, which the exporter's Celery app follows)
    KIT_BROKER_PASSWORD_FILE  /run/secrets/rabbitmq_monitor_password
    KIT_CONNECT_TIMEOUT       seconds the start-up check waits for the broker (default 5)

It runs in the exporter's own virtual environment (deploy/exporter/requirements.txt:
the exporter pins prometheus-client<0.22 and installs a top-level package ``src``),
so it does not import the kit: the standard library, plus py-amqp (the
exporter's own dependency, through Celery) for the start-up check:

    .venv-exporter/bin/python scripts/celery_exporter.py --port 9808 --queues urgent,default,bulk

Before the exporter starts, one AMQP connection is opened as the exporter will
open it (on a cluster, to the first node that answers). What stands in the way
ends the launcher with one ``error: ...`` line and exit status 2, as the kit's
workers do: at once for a refused login, a vhost that does not exist or that the
user may not use, or a certificate that does not verify; after
KIT_CONNECT_TIMEOUT for a broker (every node of it) that does not answer.
Once the exporter runs, losing the broker is the exporter's to handle
(``--retry-interval``). Its log (loguru) is told not to print the values of
variables in tracebacks: they hold the broker URL with the password.
"""

from __future__ import annotations

import os
import ssl
import sys
import time
import uuid
from typing import Any, NoReturn
from urllib.parse import quote, unquote, urlsplit, urlunsplit

#: Exit status when the exporter cannot start (the kit's workers use the same).
EXIT_STARTUP = 2
#: Default of KIT_CONNECT_TIMEOUT, as in the kit's settings.
DEFAULT_CONNECT_TIMEOUT_S = 5.0
_SCHEMES = ("pyamqp", "amqp", "amqps")
#: Celery's event exchange, which the exporter reads task and worker events from.
EVENT_EXCHANGE = "celeryev"


def fail(message: str) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with EXIT_STARTUP."""
    sys.stderr.write(f"error: {' '.join(message.split())}\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_STARTUP)


def node_urls(url: str) -> list[str]:
    """The node URLs of a broker URL: one, or several separated by ``;`` (a cluster)."""
    return [part.strip() for part in url.split(";")]


def broker_url(environ: dict[str, str]) -> str:
    """KIT_BROKER_URL with the password of KIT_BROKER_PASSWORD_FILE put in (quoted), into every node's URL."""
    url = environ.get("KIT_BROKER_URL", "").strip()
    if not url:
        fail("set KIT_BROKER_URL (pyamqp://user@host:5672/vhost) and KIT_BROKER_PASSWORD_FILE")
    for node in node_urls(url):
        if node.split("://", 1)[0].lower() not in _SCHEMES or "://" not in node:
            fail(f"KIT_BROKER_URL={redact(url)!r} is not an AMQP URL; expected pyamqp://user@host:5672/vhost "
                 "(or one such URL per cluster node, separated by ';')")
    password_file = environ.get("KIT_BROKER_PASSWORD_FILE", "").strip()
    if not password_file:
        return url
    with open(password_file, encoding="utf-8") as f:
        password = f.read().strip()
    if not password:
        fail(f"KIT_BROKER_PASSWORD_FILE={password_file!r} is empty")
    with_password = []
    for node in node_urls(url):
        parts = urlsplit(node)
        if not parts.username:
            fail("KIT_BROKER_PASSWORD_FILE is set but KIT_BROKER_URL names no user (user@host)")
        host = parts.netloc.rsplit("@", 1)[1]
        netloc = f"{quote(unquote(parts.username), safe='')}:{quote(password, safe='')}@{host}"
        with_password.append(urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)))
    return ";".join(with_password)


def redact(url: str) -> str:
    """The URL with its password hidden (every node's, in a ``;`` list)."""
    if ";" in url:
        return ";".join(redact(node) for node in node_urls(url))
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"


def ssl_options(argv: list[str]) -> dict[str, object]:
    """The exporter's --broker-ssl-option NAME=VALUE arguments, as it passes them to the broker connection."""
    options: dict[str, object] = {}
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--broker-ssl-option"]
    values += [a.split("=", 1)[1] for a in argv if a.startswith("--broker-ssl-option=")]
    for value in values:
        if "=" in value:
            name, setting = value.split("=", 1)
            options[name] = int(setting) if setting.isnumeric() else setting
    return options


def check_broker(url: str, argv: list[str], environ: dict[str, str]) -> None:
    """Open one AMQP connection as the exporter would; ``fail`` with one line if that cannot work.

    A refused login, a missing vhost, no permission on it and a certificate
    that does not verify fail at once; anything else is retried with a short
    backoff until KIT_CONNECT_TIMEOUT has passed. With several nodes (a
    cluster), each round tries them in order and one that answers is enough.
    """
    import amqp  # the exporter's own dependency (celery -> kombu -> py-amqp)

    raw_timeout = environ.get("KIT_CONNECT_TIMEOUT", "").strip() or str(DEFAULT_CONNECT_TIMEOUT_S)
    try:
        timeout = float(raw_timeout)
    except ValueError:
        fail(f"KIT_CONNECT_TIMEOUT={raw_timeout!r} is not a number of seconds")
    nodes = node_urls(url)
    where = redact(url)
    deadline = time.monotonic() + timeout
    # A node that does not answer must leave time for the next one.
    per_node = max(timeout / len(nodes), 1.0)
    backoff = 0.1
    last_error: BaseException | None = None
    while True:
        for node in nodes:
            parts = urlsplit(node)
            secure = parts.scheme.lower() == "amqps"
            try:
                port = parts.port or (5671 if secure else 5672)
            except ValueError:
                fail(f"KIT_BROKER_URL={redact(url)!r} has a port that is not a number")
            user = unquote(parts.username or "guest")
            vhost = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path) or "/"
            at = redact(node)
            tls: object = False
            if secure:
                tls = {"server_hostname": parts.hostname, **ssl_options(argv)}
            conn = amqp.Connection(
                f"{parts.hostname or 'localhost'}:{port}", userid=user, password=unquote(parts.password or "guest"),
                virtual_host=vhost, connect_timeout=max(min(deadline - time.monotonic(), per_node), 0.1), ssl=tls,
            )
            try:
                conn.connect()
                _check_event_rights(conn, user, vhost)
                conn.close()
                return
            except amqp.exceptions.AccessRefused:
                fail(f"the broker at {at} refused the login of user {user!r} (403 ACCESS_REFUSED): the user "
                     "does not exist or the password is wrong. Check the user in KIT_BROKER_URL and its password "
                     "(the file KIT_BROKER_PASSWORD_FILE names, or the URL's).")
            except amqp.exceptions.NotAllowed as exc:
                text = str(getattr(exc, "reply_text", "") or exc)
                if "limit" not in text:  # a connection limit may clear: retry that
                    if "not found" in text:
                        fail(f"vhost {vhost!r} does not exist on the broker at {at} (530 NOT_ALLOWED). Check "
                             "the vhost at the end of KIT_BROKER_URL, or create it: `python -m service broker "
                             f"provision --vhost {vhost} --secrets-dir DIR`.")
                    fail(f"user {user!r} may not use vhost {vhost!r} on the broker at {at} (530 NOT_ALLOWED: "
                         f"{text}). Grant permissions: `rabbitmqctl set_permissions -p {vhost} {user} ...` "
                         "(`python -m service broker provision` sets up the kit's users).")
                last_error = exc
            except ssl.SSLCertVerificationError as exc:
                fail(f"TLS certificate verification of the broker at {at} failed: {exc.verify_message or exc}. "
                     "Pass the CA that signed it with --broker-ssl-option ca_certs=FILE and use the host name "
                     "the certificate names in KIT_BROKER_URL.")
            except Exception as exc:  # noqa: BLE001 - nothing listening, a timeout: may heal
                last_error = exc
            finally:
                try:
                    conn.collect()
                except Exception:  # noqa: BLE001
                    pass
        if time.monotonic() + backoff >= deadline:
            fail(f"cannot connect to the broker at {where} within {timeout:g}s (KIT_CONNECT_TIMEOUT): "
                 f"{str(last_error) or type(last_error).__name__}. Check that RabbitMQ runs and listens "
                 "there and that the host and port of KIT_BROKER_URL are right.")
        time.sleep(backoff)
        backoff = min(backoff * 2, 1.0)


def _check_event_rights(conn: Any, user: str, vhost: str) -> None:
    """Do what the exporter does first: declare the event exchange and a queue of its own bound to it.

    The queue is exclusive, so it goes with the connection.
    """
    import amqp

    channel = conn.channel()
    try:
        channel.exchange_declare(EVENT_EXCHANGE, "topic", durable=True, auto_delete=False)
        queue = f"{EVENT_EXCHANGE}.{uuid.uuid4()}"
        channel.queue_declare(queue, durable=False, auto_delete=True, exclusive=True)
        channel.queue_bind(queue, EVENT_EXCHANGE, "#")
    except amqp.exceptions.AccessRefused as exc:
        fail(f"user {user!r} lacks a right in vhost {vhost!r} that the exporter needs "
             f"({getattr(exc, 'reply_text', exc)}): configure on exchange {EVENT_EXCHANGE} and queues "
             f"{EVENT_EXCHANGE}.*, write on those queues, read on {EVENT_EXCHANGE}. The kit's monitor user "
             "has exactly these (`python -m service broker provision`).")


def main(argv: list[str]) -> None:
    """Check the broker, then run the exporter's own command line with ``--broker-url`` added."""
    if any(a == "--broker-url" or a.startswith("--broker-url=") for a in argv):
        fail("set KIT_BROKER_URL (and KIT_BROKER_PASSWORD_FILE) instead of --broker-url")
    environ = dict(os.environ)
    try:
        url = broker_url(environ)
    except OSError as exc:
        fail(f"KIT_BROKER_PASSWORD_FILE cannot be read: {exc.strerror}")
    if not any(a in ("-h", "--help") for a in argv):
        check_broker(url, argv, environ)
    # loguru shows variables' values in tracebacks by default: the URL holds the password.
    os.environ.setdefault("LOGURU_DIAGNOSE", "NO")
    from src.cli import cli  # the exporter's click command

    cli(args=["--broker-url", url, *argv], prog_name="celery-exporter")


if __name__ == "__main__":
    main(sys.argv[1:])
