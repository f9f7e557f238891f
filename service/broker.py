"""Broker users, permissions and topology as RabbitMQ definitions: no guest user.

One vhost and one user per role, each allowed only what its job needs
(``PERMISSIONS`` below; deploy/rabbitmq/README.md explains every
regex and what was verified on a real broker)::

    kit-admin      administrator: provisioning, dead-letter operations, the UI
    kit-publisher  web apps (service.client) and beat: publish tasks; beat's
                   lease and schedule state (kit.beat.*); nothing else
    kit-worker     Celery workers: consume the work queues, publish retries and
                   dead letters, Celery's events and remote control
    kit-monitor    celery-exporter and Prometheus: read-only, cannot publish tasks
    kit-console    the dead-letter console (service.console): reads, replays and
                   purges dead letters under their per-queue lock; cannot
                   import dead letters, consume work, retry, or manage anything

The definitions also hold the whole topology of ``service.queues``, so it
exists without any client needing the right to declare (configure) it: workers
run with ``KIT_DECLARE_TOPOLOGY=false``. Load them at boot (``load_definitions``
in rabbitmq.conf) or post them with ``python -m service broker provision``.

Passwords come from files, one per role, named ``rabbitmq_<role>_password``
(``SECRET_FILE``), e.g. Docker/Kubernetes secrets under /run/secrets. Only
their salted SHA-256 hashes go into the definitions, computed the way RabbitMQ
does (``rabbit_password_hashing_sha256``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from service import queues
from service.deadletters.lock import HOLDER_EXCHANGE, holder_queue_name
from service.errors import BrokerUnavailable, KitError
from service.settings import ConfigError, read_secret
from service.topology import exchange_fix

ROLES: tuple[str, ...] = ("admin", "publisher", "worker", "monitor", "console")
DEFAULT_USER_PREFIX = "kit-"
#: Secret file of a role's password, in the secrets directory.
SECRET_FILE = "rabbitmq_{role}_password"
HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
#: Shortest password accepted, and values refused whatever their length.
MIN_PASSWORD_LENGTH = 12
_WELL_KNOWN = re.compile(r"(?i)^(guest|admin|administrator|root|password|secret|rabbitmq?|celery|kit|"
                         r"change[-_ ]?me.*|1234.*|letmein|test)$")

TAGS: dict[str, list[str]] = {
    "admin": ["administrator"],
    "publisher": [],
    "worker": [],
    "monitor": ["monitoring"],  # management API and UI read-only, for metrics
    "console": [],  # AMQP only: the console shows the broker through the library, not the management API
}

NOTHING = "^$"


def _any_of(*patterns: str) -> str:
    """An anchored regex matching exactly one of ``patterns`` (already regexes)."""
    return "^(" + "|".join(patterns) + ")$"


def _name(name: str) -> str:
    return re.escape(name)


# Celery's transient resources, by name (see service.queues).
_EVENT_EXCHANGE = _name(queues.EVENT_EXCHANGE)
_EVENT_QUEUES = _name(queues.EVENT_QUEUE_PREFIX) + ".+"  # celeryev.<uuid> (gossip, exporter, Flower)
_PIDBOX = _name(queues.PIDBOX_EXCHANGE)
_PIDBOX_REPLY = _name(queues.PIDBOX_REPLY_EXCHANGE)
_PIDBOX_QUEUES = ".+" + _name(queues.PIDBOX_QUEUE_SUFFIX)  # <node>.celery.pidbox and <uuid>.reply.celery.pidbox
_REPLY_QUEUES = ".+\\." + _PIDBOX_REPLY  # <uuid>.reply.celery.pidbox only
_CELERY_OWN = (_EVENT_EXCHANGE, _EVENT_QUEUES, _PIDBOX, _PIDBOX_REPLY, _PIDBOX_QUEUES)
# Beat's own resources (service.beat): its lease queue, its state queue and exchange.
_BEAT_LEASE = _name(queues.BEAT_LEASE_QUEUE)
_BEAT_STATE = _name(queues.BEAT_STATE_QUEUE)
_BEAT_EXCHANGE = _name(queues.BEAT_STATE_EXCHANGE)
# The dead-letter queues and, per queue, the lock of replay/purge/import and the record of its holder
# (service.deadletters.lock): an exclusive queue, a record queue, and the exchange the records go through.
_DEAD_LETTER_QUEUES = tuple(_name(n) for n in queues.DEAD_LETTER_QUEUE_NAMES)
_DLQ_LOCKS = tuple(_name(queues.lock_queue_name(n)) for n in queues.DEAD_LETTER_QUEUE_NAMES)
_DLQ_HOLDER_QUEUES = tuple(_name(holder_queue_name(n)) for n in queues.DEAD_LETTER_QUEUE_NAMES)
_DLQ_HOLDER_EXCHANGE = _name(HOLDER_EXCHANGE)

#: role -> the configure, write and read regexes of RabbitMQ's permissions.
#: RabbitMQ checks: declare and delete need configure on the resource; publish
#: needs write on the exchange; consume, get and purge need read on the queue;
#: bind needs write on the queue and read on the exchange. A passive declare
#: needs none of them.
#: A message TASK_EXCHANGE cannot route goes on to its alternate exchange
#: (UNROUTABLE_EXCHANGE) without any check of the publisher's rights there
#: (RabbitMQ 3.10.8, tests/test_security.py): write on TASK_EXCHANGE is all it
#: takes, so no role but the admin gets a right on UNROUTABLE_EXCHANGE (the admin's
#: dlq import publishes there), and only the admin and the console (list, replay) read
#: UNROUTABLE_QUEUE.
PERMISSIONS: dict[str, dict[str, str]] = {
    "admin": {"configure": ".*", "write": ".*", "read": ".*"},
    "publisher": {
        # Beat runs as this user: it declares its lease and its state (queue, exchange, binding).
        "configure": _any_of(_BEAT_EXCHANGE, _BEAT_LEASE, _BEAT_STATE),
        # Tasks, tasks with a countdown (wait queues), Celery's task-sent event; beat's state
        # (publish to its exchange, bind its queue).
        "write": _any_of(_name(queues.TASK_EXCHANGE), _name(queues.RETRY_EXCHANGE), _EVENT_EXCHANGE,
                         _BEAT_EXCHANGE, _BEAT_STATE),
        # Only beat's state: bind its queue to its exchange, read the one message.
        "read": _any_of(_BEAT_EXCHANGE, _BEAT_STATE),
    },
    "worker": {
        # Nothing of the kit's: only Celery's events and remote control (pidbox).
        "configure": _any_of(*_CELERY_OWN),
        # Retries and dead letters; never TASK_EXCHANGE (a worker enqueues no new work).
        "write": _any_of(_name(queues.RETRY_EXCHANGE), _name(queues.DEAD_LETTER_EXCHANGE), *_CELERY_OWN),
        # The work queues and their high lanes (quorum profile; unused on classic).
        "read": _any_of(*(_name(n) for n in queues.WORK_QUEUE_NAMES),
                        *(_name(queues.high_lane_name(n)) for n in queues.WORK_QUEUE_NAMES), *_CELERY_OWN),
    },
    "monitor": {
        # Its own event queue and inspect broadcasts with their reply queue.
        "configure": _any_of(_EVENT_EXCHANGE, _EVENT_QUEUES, _PIDBOX, _PIDBOX_REPLY, _REPLY_QUEUES),
        "write": _any_of(_PIDBOX, _EVENT_QUEUES, _REPLY_QUEUES),
        "read": _any_of(_EVENT_EXCHANGE, _EVENT_QUEUES, _PIDBOX_REPLY, _REPLY_QUEUES),
    },
    "console": {
        # Only the per-queue locks and their holder records (declare, delete): nothing of the topology.
        "configure": _any_of(*_DLQ_LOCKS, *_DLQ_HOLDER_QUEUES, _DLQ_HOLDER_EXCHANGE),
        # Replay (confirmed, to the task exchange; no events); the holder record: publish it, bind its queue.
        # Not tasks.dead nor tasks.unroutable (no import), tasks.retry, celeryev or amq.default.
        "write": _any_of(_name(queues.TASK_EXCHANGE), _DLQ_HOLDER_EXCHANGE, *_DLQ_HOLDER_QUEUES),
        # The dead-letter queues (an unacked walk; ack what was replayed or purged); the holder
        # records (purge, consume, basic.get; bind to their exchange). No work queue.
        "read": _any_of(*_DEAD_LETTER_QUEUES, *_DLQ_HOLDER_QUEUES, _DLQ_HOLDER_EXCHANGE),
    },
}

#: Routing keys a role may publish to the (topic) event exchange: the client
#: sends only task-sent, workers task-* and worker-* events. No entry: none may.
EVENT_TOPIC_WRITE: dict[str, str] = {
    "publisher": "^task\\.sent$",
    "worker": "^(task|worker)\\..+$",
    "admin": ".*",
}


def user_name(role: str, user_prefix: str = DEFAULT_USER_PREFIX) -> str:
    """The broker user of ``role``, e.g. kit-worker."""
    return f"{user_prefix}{role}"


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password)), 4-byte salt."""
    salt = os.urandom(4) if salt is None else salt
    if len(salt) != 4:
        raise ValueError("RabbitMQ's password salt is 4 bytes")
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode("utf-8")).digest()).decode("ascii")


def check_password(password: str, hashed: str) -> bool:
    """Whether ``password`` matches a rabbit_password_hashing_sha256 hash."""
    raw = base64.b64decode(hashed)
    return password_hash(password, raw[:4]) == hashed


def _topology(vhost: str, profile: queues.Topology) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                              list[dict[str, Any]]]:
    exchanges = [
        {"name": x.name, "vhost": vhost, "type": x.type, "durable": True, "auto_delete": False,
         "internal": False, "arguments": dict(x.arguments)}
        for x in (*queues.EXCHANGE_DEFINITIONS, queues.Exchange(queues.EVENT_EXCHANGE, queues.EVENT_EXCHANGE_TYPE))
    ]
    declared = [
        {"name": q.name, "vhost": vhost, "durable": True, "auto_delete": False, "arguments": dict(q.arguments)}
        for q in profile.all_queues
    ]
    bindings = [
        {"source": q.exchange, "vhost": vhost, "destination": q.name, "destination_type": "queue",
         "routing_key": q.binding_key, "arguments": dict(q.binding_arguments)}
        for q in profile.all_queues
    ]
    return exchanges, declared, bindings


def definitions(vhost: str, passwords: dict[str, str], user_prefix: str = DEFAULT_USER_PREFIX,
                queue_type: str = queues.DEFAULT_QUEUE_TYPE) -> dict[str, Any]:
    """RabbitMQ definitions (GET/POST /api/definitions, ``load_definitions``) of the kit.

    The queues are those of ``queue_type``'s profile (KIT_QUEUE_TYPE).

    ``passwords`` maps each role of ROLES to its password; only salted hashes
    are put in the result. Raises ConfigError when a role is missing or a
    password is unusable.
    """
    missing = [r for r in ROLES if r not in passwords]
    if missing:
        raise ConfigError(f"no password for the broker role(s) {', '.join(missing)}")
    for role in ROLES:
        _check_password(role, passwords[role])
    if not vhost:
        raise ConfigError("the vhost name is empty")
    users = [
        {"name": user_name(role, user_prefix), "password_hash": password_hash(passwords[role]),
         "hashing_algorithm": HASHING_ALGORITHM, "tags": TAGS[role], "limits": {}}
        for role in ROLES
    ]
    permissions = [{"user": user_name(role, user_prefix), "vhost": vhost, **PERMISSIONS[role]} for role in ROLES]
    topic_permissions = [
        {"user": user_name(role, user_prefix), "vhost": vhost, "exchange": queues.EVENT_EXCHANGE,
         "write": EVENT_TOPIC_WRITE.get(role, NOTHING), "read": ".*"}
        for role in ROLES
    ]
    exchanges, declared, bindings = _topology(vhost, queues.topology(queue_type))
    return {
        "users": users,
        "vhosts": [{"name": vhost}],
        "permissions": permissions,
        "topic_permissions": topic_permissions,
        "parameters": [],
        "policies": [],
        "queues": declared,
        "exchanges": exchanges,
        "bindings": bindings,
    }


def _check_password(role: str, password: str) -> None:
    if not isinstance(password, str) or not password:
        raise ConfigError(f"the password of the broker role {role!r} is empty")
    if _WELL_KNOWN.match(password.strip()):
        raise ConfigError(f"the password of the broker role {role!r} is a well-known default; generate one")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ConfigError(
            f"the password of the broker role {role!r} has {len(password)} characters; use at least "
            f"{MIN_PASSWORD_LENGTH} (e.g. `openssl rand -base64 24`)"
        )


def read_passwords(secrets_dir: str | Path, roles: tuple[str, ...] = ROLES) -> dict[str, str]:
    """Read each role's password from ``<secrets_dir>/rabbitmq_<role>_password``.

    Surrounding whitespace (a trailing newline) is dropped, as KIT_BROKER_PASSWORD_FILE
    does. Raises ConfigError naming the file when one is missing, unreadable or empty.
    """
    directory = Path(secrets_dir)
    if not directory.is_dir():
        raise ConfigError(f"the secrets directory {str(directory)!r} does not exist")
    passwords: dict[str, str] = {}
    for role in roles:
        path = directory / SECRET_FILE.format(role=role)
        password = read_secret(
            path,
            unreadable=f"{path} cannot be read: {{error}}",
            empty=f"{path} is empty: write the {role} user's broker password there",
            missing=(f"{path} is missing: write the {role} user's broker password there "
                     f"(files: {', '.join(SECRET_FILE.format(role=r) for r in roles)})"),
        )
        _check_password(role, password)
        passwords[role] = password
    return passwords


def write_definitions(defs: dict[str, Any], out: str | Path) -> None:
    """Write definitions as JSON readable by their owner only (they hold password hashes)."""
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), 0o600)
        json.dump(defs, f, indent=2, sort_keys=True)
        f.write("\n")


class ProvisioningError(KitError):
    """The management API refused the definitions."""


def _management(method: str, management_url: str, path: str, admin_user: str, admin_password: str,
                body: Any = None, timeout: float = 30) -> Any:
    url = management_url.rstrip("/") + path
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    token = base64.b64encode(f"{admin_user}:{admin_password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace").strip()
        hint = ""
        if exc.code == 401:
            hint = f" (the management API refused the user {admin_user!r}: wrong password or not an administrator)"
        raise ProvisioningError(f"{method} {url} answered {exc.code}{hint}: {detail[:500]}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BrokerUnavailable(
            f"cannot reach RabbitMQ's management API at {management_url}: {reason}. "
            "Check KIT_ADMIN_URL / --management-url and that the management plugin is enabled."
        ) from None
    return json.loads(payload) if payload else None


def drift(defs: dict[str, Any], live_queues: list[dict[str, Any]], live_exchanges: list[dict[str, Any]]) -> list[str]:
    """How the live queues and exchanges of a vhost differ from the definitions (empty: they match).

    RabbitMQ's definitions import keeps an existing queue or exchange as it is,
    silently, when its arguments differ; this finds such leftovers.
    """
    problems = []
    queues_by_name = {q["name"]: q for q in live_queues}
    for wanted in defs["queues"]:
        live = queues_by_name.get(wanted["name"])
        if live is None:
            problems.append(f"queue {wanted['name']!r} is missing")
        elif live.get("arguments", {}) != wanted["arguments"] or live.get("durable") != wanted["durable"]:
            problems.append(f"queue {wanted['name']!r} has arguments {live.get('arguments')} "
                            f"(durable={live.get('durable')}), the kit wants {wanted['arguments']}")
    exchanges_by_name = {e["name"]: e for e in live_exchanges}
    for wanted in defs["exchanges"]:
        live = exchanges_by_name.get(wanted["name"])
        if live is None:
            problems.append(f"exchange {wanted['name']!r} is missing")
        elif (live.get("type"), live.get("durable")) != (wanted["type"], wanted["durable"]):
            problems.append(f"exchange {wanted['name']!r} is {live.get('type')} (durable={live.get('durable')}), "
                            f"the kit wants {wanted['type']}")
        elif (live.get("arguments") or {}) != wanted.get("arguments", {}):
            problems.append(f"exchange {wanted['name']!r} has arguments {live.get('arguments') or {}}, "
                            f"the kit wants {wanted.get('arguments', {})}")
    return problems


def provision(defs: dict[str, Any], management_url: str, admin_user: str, admin_password: str,
              timeout: float = 30) -> None:
    """POST the definitions to RabbitMQ's management API, then check the topology took.

    Idempotent: posting again only renews the password hashes. Raises
    BrokerUnavailable when the API cannot be reached, ProvisioningError when it
    refuses (bad credentials, not an administrator) or when a queue or exchange
    already exists with other arguments (RabbitMQ keeps it as it is).
    """
    _management("POST", management_url, "/api/definitions", admin_user, admin_password, defs, timeout)
    for vhost in {v["name"] for v in defs["vhosts"]}:
        quoted = urllib.parse.quote(vhost, safe="")
        problems = drift(
            {"queues": [q for q in defs["queues"] if q["vhost"] == vhost],
             "exchanges": [e for e in defs["exchanges"] if e["vhost"] == vhost]},
            _management("GET", management_url, f"/api/queues/{quoted}", admin_user, admin_password, timeout=timeout),
            _management("GET", management_url, f"/api/exchanges/{quoted}", admin_user, admin_password,
                        timeout=timeout),
        )
        if problems:
            fixes = []
            if any(p.startswith("queue ") for p in problems):
                fixes.append("For a queue: stop its consumers, move or drain its messages, delete it "
                             f"(rabbitmqctl delete_queue NAME -p {vhost}), then provision again.")
            replaced = [p for p in problems if p.startswith("exchange ") and not p.endswith("is missing")]
            for name in dict.fromkeys(p.split("'")[1] for p in replaced):
                fixes.append(f"For exchange {name!r}: {exchange_fix(name, vhost)}.")
            raise ProvisioningError(
                f"users and permissions are in place, but vhost {vhost!r} holds an older topology that "
                f"RabbitMQ kept: {'; '.join(problems)}. {' '.join(fixes)}"
            )

