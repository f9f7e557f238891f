"""Configuration read from environment variables, validated once, at load.

Every setting has a safe default so a local broker works out of the box, and a
rule (its kind and accepted range) that ``load()`` checks generically: a bad
value is one ``ConfigError`` line naming the variable, the value and what is
accepted. The README's configuration table is generated from ``SETTINGS``
below (``python -m service config --markdown``), so the names, defaults,
accepted ranges and descriptions live in exactly one place.
"""

from __future__ import annotations

import math
import os
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.headerregistry import Address
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, quote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from service.queues import WAIT_TIERS_S

# Kinds of setting: how a value is parsed and checked (see _PARSERS).
FLOAT = "float"  #: a finite decimal number in [minimum, maximum]
INT = "int"  #: ASCII digits in [minimum, maximum], or one of ``choices``
BOOL = "bool"  #: true/false, 1/0, yes/no, on/off
CHOICE = "choice"  #: one of ``choices``, case-insensitive
TEXT = "text"  #: one line of text, may be empty
HOST = "host"  #: a host name or IP address
EMAIL = "email"  #: a bare e-mail address, local@domain
FILE = "file"  #: empty, or the path of a readable file
DIR = "dir"  #: the path of a directory (created when needed)
MODULES = "modules"  #: comma-separated Python module names, may be empty
BROKER_URL = "broker-url"  #: a pyamqp://, amqps:// or amqp:// URL
SENTRY_DSN = "sentry-dsn"  #: empty, or http(s)://key@host/project
TIMEZONE = "timezone"  #: an IANA time zone name (UTC, Asia/Shanghai)

#: Broker URL schemes the kit accepts.
AMQP_SCHEMES = ("pyamqp", "amqps", "amqp")
#: Log levels of workers and beat.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: Longest task body the client may accept: RabbitMQ's default max_message_size (128 MiB).
RABBITMQ_MAX_MESSAGE_BYTES = 128 * 1024 * 1024
#: RabbitMQ's consumer_timeout in deploy/rabbitmq/rabbitmq.conf, in seconds: a task
#: acked late must end (hard time limit) before the broker closes its channel.
CONSUMER_TIMEOUT_S = 3600
#: Ceiling of network timeouts, in seconds: an hour is already far more than useful.
MAX_TIMEOUT_S = 3600
#: Ceiling of the retry, replay and worker-lost counts.
MAX_COUNT = 1000

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NOT_FINITE = ("nan", "inf", "infinity")
_HOST_TEXT = re.compile(r"[A-Za-z0-9._:\[\]-]+")
_SHOWN_CHARS = 80


@dataclass(frozen=True)
class Setting:
    """One environment variable: its name, default (as text), meaning and rule.

    The rule is ``kind`` (one of the kinds above) with, for numbers, the range
    ``minimum``..``maximum`` (each bound inclusive unless ``min_inclusive`` or
    ``max_inclusive`` says otherwise) and, for choices, the accepted ``choices``.
    """

    name: str
    default: str
    description: str
    kind: str
    minimum: float | None = None
    maximum: float | None = None
    min_inclusive: bool = True
    max_inclusive: bool = True
    choices: tuple[str | int, ...] = ()

    def accepted(self) -> str:
        """What the setting accepts, in words (for errors and the README)."""
        return _ACCEPTED[self.kind](self)


def _seconds(name: str, default: str, description: str, minimum: float, maximum: float,
             max_inclusive: bool = True) -> Setting:
    """A duration in seconds (or another finite number) within a range."""
    return Setting(name, default, description, FLOAT, minimum, maximum, max_inclusive=max_inclusive)


def _count(name: str, default: str, description: str, minimum: int, maximum: int) -> Setting:
    """An integer within a range."""
    return Setting(name, default, description, INT, minimum, maximum)


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "KIT_BROKER_URL",
        "pyamqp://kit-admin@127.0.0.1:5672/kit",
        "Broker URL, without the password when KIT_BROKER_PASSWORD_FILE is set. Use the "
        "`pyamqp://` (or `amqps://`) scheme: plain `amqp://` silently switches to librabbitmq "
        "where it is installed. The default is the local stack's administrator (see README).",
        BROKER_URL,
    ),
    Setting(
        "KIT_BROKER_PASSWORD_FILE",
        "",
        "File holding the broker password (a Docker/Kubernetes secret); it replaces the "
        "password of KIT_BROKER_URL, so the URL can be written without one.",
        FILE,
    ),
    Setting(
        "KIT_BROKER_CA_FILE",
        "",
        "CA bundle that signed the broker's certificate, for `amqps://` URLs (empty: the "
        "system's CAs). The certificate and its host name are always verified.",
        FILE,
    ),
    Setting("KIT_BROKER_CLIENT_CERT_FILE", "", "Client certificate for `amqps://` with mutual TLS (optional).", FILE),
    Setting("KIT_BROKER_CLIENT_KEY_FILE", "", "Key of the client certificate (optional).", FILE),
    Setting(
        "KIT_DECLARE_TOPOLOGY",
        "true",
        "Workers declare the exchanges and queues of service/queues.py at start. Least-privilege "
        "workers (the kit-worker user, `python -m service broker`) run with `false`: the topology "
        "then comes from the broker's definitions, and the worker needs no right to change it.",
        BOOL,
    ),
    _seconds("KIT_CONNECT_TIMEOUT", "5",
             "Seconds a command, worker or beat keeps trying to connect to the broker before it fails "
             "with one line (a refused login, a missing vhost or a TLS failure fails at once).",
             0.1, MAX_TIMEOUT_S),
    _seconds(
        "KIT_PUBLISH_TIMEOUT",
        "10",
        "Seconds a publish may take in all, reconnecting included, before it fails "
        "with BrokerUnavailable.",
        0.1, MAX_TIMEOUT_S,
    ),
    _count(
        "KIT_MAX_PAYLOAD_BYTES",
        "1048576",
        "Largest encoded task body the client accepts (at most RabbitMQ's default max_message_size, "
        "128 MiB). Pass a reference (a path or an id) for bigger data.",
        1, RABBITMQ_MAX_MESSAGE_BYTES,
    ),
    Setting(
        "KIT_SEND_SENT_EVENTS",
        "true",
        "The client also sends Celery's `task-sent` event (unconfirmed), so celery-exporter "
        "counts sent tasks and labels them with their queue.",
        BOOL,
    ),
    _seconds("KIT_SOFT_TIME_LIMIT", "300", "Seconds before SoftTimeLimitExceeded is raised inside a task.",
             1, CONSUMER_TIMEOUT_S, max_inclusive=False),
    Setting(
        "KIT_HARD_TIME_LIMIT",
        "360",
        "Seconds before the worker kills a task's process; the task is dead-lettered "
        "with reason `time-limit`. Greater than KIT_SOFT_TIME_LIMIT, and below RabbitMQ's "
        "consumer_timeout (deploy/rabbitmq/rabbitmq.conf), which closes the channel under a longer task.",
        FLOAT, 1, CONSUMER_TIMEOUT_S, min_inclusive=False, max_inclusive=False,
    ),
    _count("KIT_MAX_RETRIES", "5", "Default retries per task (a task may set its own `max_retries`).",
           0, MAX_COUNT),
    _seconds("KIT_RETRY_BACKOFF_BASE", "2", "Seconds of the first retry delay; each retry doubles it.",
             0.001, WAIT_TIERS_S[-1]),
    _seconds("KIT_RETRY_BACKOFF_MAX", "600", "Longest retry delay of the kit's backoff in seconds.",
             1, 86400),
    Setting(
        "KIT_LONGEST_WAIT",
        str(WAIT_TIERS_S[-1]),
        "Longest single wait in the broker, in seconds: one of the wait tiers of service/queues.py "
        "(1, 2, 4, ... 4096). A longer countdown, ETA or retry delay waits again until it is due.",
        INT,
        choices=WAIT_TIERS_S,
    ),
    _count(
        "KIT_MAX_WORKER_LOST",
        "3",
        "Deliveries whose worker process died (kill -9, os._exit, OOM) before a "
        "message is dead-lettered as poison.",
        1, MAX_COUNT,
    ),
    _count(
        "KIT_MAX_REPLAYS",
        "3",
        "`dlq replay` refuses a dead letter replayed this many times already, unless `--force`.",
        0, MAX_COUNT,
    ),
    _count("KIT_CONCURRENCY", "2", "Worker processes per `python -m service worker`.", 1, 1024),
    _count(
        "KIT_METRICS_PORT",
        "9810",
        "Port of a worker's Prometheus endpoint (the kit's own metrics); 0 turns it off.",
        0, 65535,
    ),
    Setting("KIT_LOG_LEVEL", "INFO", "Log level of workers and beat.", CHOICE, choices=LOG_LEVELS),
    Setting(
        "KIT_TIMEZONE",
        "UTC",
        "Celery's `timezone`: the zone of beat's `crontab` entries and of naive ETAs "
        "(`apply_async(eta=datetime(...))` without tzinfo). Messages always carry UTC.",
        TIMEZONE,
    ),
    Setting(
        "KIT_TASK_MODULES",
        "",
        "Extra comma-separated modules with tasks that workers import (the kit's "
        "own `service.tasks.*` are always imported).",
        MODULES,
    ),
    Setting("KIT_STATE_DIR", "var", "Directory for beat's schedule file, pid files and logs.", DIR),
    Setting("KIT_SMTP_HOST", "127.0.0.1", "SMTP server for e-mail tasks.", HOST),
    _count("KIT_SMTP_PORT", "25", "SMTP port.", 1, 65535),
    _seconds("KIT_SMTP_TIMEOUT", "10", "Seconds an SMTP conversation may take.", 0.1, MAX_TIMEOUT_S),
    Setting("KIT_MAIL_FROM", "noreply@localhost", "Envelope sender of e-mail tasks.", EMAIL),
    Setting("KIT_REPORT_DIR", "var/reports", "Where report exports write their CSV files.", DIR),
    Setting(
        "KIT_REPORT_MAX_AGE_HOURS",
        "168",
        "The periodic clean-up deletes exports older than this.",
        FLOAT, 0, 87600, min_inclusive=False,
    ),
    _seconds("KIT_CLEANUP_INTERVAL", "3600", "Seconds between periodic clean-ups scheduled by beat.",
             1, 7 * 86400),
    _seconds("KIT_WEBHOOK_TIMEOUT", "10", "Seconds a webhook delivery may take.", 0.1, MAX_TIMEOUT_S),
    Setting(
        "KIT_WEBHOOK_SECRET_FILE",
        "",
        "File holding the HMAC key used to sign webhook bodies (header "
        "`X-Signature-SHA256`); unsigned when empty.",
        FILE,
    ),
    Setting("SENTRY_DSN", "", "Sentry DSN of workers, beat and the client; Sentry is off when empty.", SENTRY_DSN),
    Setting("SENTRY_ENVIRONMENT", "", "Sentry environment (Sentry's own default, `production`, when empty).", TEXT),
    Setting("SENTRY_RELEASE", "", "Sentry release; when empty Sentry guesses it (e.g. from git).", TEXT),
    Setting("SENTRY_TRACES_SAMPLE_RATE", "0", "Share of task runs sent to Sentry as performance traces, 0 to 1.",
            FLOAT, 0, 1),
    Setting(
        "SENTRY_SEND_TASK_ARGS",
        "false",
        "`true` sends task arguments and local variables to Sentry; they are scrubbed by default "
        "(they carry e-mail addresses and tokens).",
        BOOL,
    ),
)

_BY_NAME = {s.name: s for s in SETTINGS}


class ConfigError(ValueError):
    """An environment variable holds a value that cannot be used."""


class _Rejected(Exception):
    """A value breaks its setting's rule; the message says how ("is out of range")."""


def _raw(name: str) -> str:
    """The variable's value (its default when unset), without surrounding whitespace."""
    return os.environ.get(name, _BY_NAME[name].default).strip()


# -- what each kind accepts, in words -----------------------------------------------------


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _range_text(setting: Setting, noun: str) -> str:
    """``noun`` with the setting's bounds: "a number from 0.1 to 3600", "... above 0 and at most 1"."""
    low, high = setting.minimum, setting.maximum
    if low is not None and high is not None and setting.min_inclusive and setting.max_inclusive:
        return f"{noun} from {_number_text(low)} to {_number_text(high)}"
    bounds = []
    if low is not None:
        bounds.append(f"{'at least' if setting.min_inclusive else 'above'} {_number_text(low)}")
    if high is not None:
        bounds.append(f"{'at most' if setting.max_inclusive else 'below'} {_number_text(high)}")
    return " ".join([noun, " and ".join(bounds)]).strip()


def _one_of(setting: Setting) -> str:
    return "one of " + ", ".join(str(c) for c in setting.choices)


_ACCEPTED: dict[str, Callable[[Setting], str]] = {
    FLOAT: lambda s: _range_text(s, "a number"),
    INT: lambda s: _one_of(s) if s.choices else _range_text(s, "an integer"),
    BOOL: lambda s: "true or false (also 1/0, yes/no, on/off)",
    CHOICE: lambda s: _one_of(s) + ", in any case",
    TEXT: lambda s: "one line of text, or empty",
    HOST: lambda s: "a host name or IP address",
    EMAIL: lambda s: "an e-mail address (local@domain)",
    FILE: lambda s: "empty, or the path of a readable file",
    DIR: lambda s: "the path of a directory (created when missing)",
    MODULES: lambda s: "empty, or comma-separated Python module names",
    BROKER_URL: lambda s: f"a {', '.join(f'{x}://' for x in AMQP_SCHEMES[:-1])} or {AMQP_SCHEMES[-1]}:// URL "
                          "with a host",
    SENTRY_DSN: lambda s: "empty, or a Sentry DSN: http(s)://key@host/project",
    TIMEZONE: lambda s: "an IANA time zone name such as UTC or Asia/Shanghai",
}


# -- parsing and checking one value ------------------------------------------------------


def _in_range(setting: Setting, value: float) -> bool:
    low, high = setting.minimum, setting.maximum
    if low is not None and (value < low if setting.min_inclusive else value <= low):
        return False
    return high is None or (value <= high if setting.max_inclusive else value < high)


def _parse_float(setting: Setting, raw: str) -> float:
    """Plain decimal notation only: no nan, inf, underscores or non-ASCII digits."""
    if not _FLOAT_TEXT.fullmatch(raw):
        raise _Rejected("is not a finite number" if raw.lower().lstrip("+-") in _NOT_FINITE else "is not a number")
    value = float(raw)
    if not math.isfinite(value) or not _in_range(setting, value):  # 1e999 overflows to inf
        raise _Rejected("is out of range")
    return value


def _parse_int(setting: Setting, raw: str) -> int:
    """ASCII digits only: no 1_000, 1.0 or non-ASCII digits."""
    if not _INT_TEXT.fullmatch(raw):
        raise _Rejected("is not an integer")
    try:
        value = int(raw)
    except ValueError:  # more digits than int() converts
        raise _Rejected("is out of range") from None
    if setting.choices and value not in setting.choices:
        raise _Rejected("is not one of the accepted values")
    if not _in_range(setting, value):
        raise _Rejected("is out of range")
    return value


def _parse_bool(setting: Setting, raw: str) -> bool:
    word = raw.lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise _Rejected("is not a boolean")


def _parse_choice(setting: Setting, raw: str) -> str:
    for choice in setting.choices:
        if str(choice).lower() == raw.lower():
            return str(choice)
    raise _Rejected("is not one of the accepted values")


def _parse_host(setting: Setting, raw: str) -> str:
    if not _HOST_TEXT.fullmatch(raw):
        raise _Rejected("is not a host name")
    return raw


def _parse_email(setting: Setting, raw: str) -> str:
    try:
        address = Address(addr_spec=raw)
    except (ValueError, IndexError, HeaderParseError):  # email's parser raises all three
        raise _Rejected("is not an e-mail address") from None
    if not address.username or not address.domain or address.addr_spec != raw:
        raise _Rejected("is not an e-mail address")
    return raw


def _parse_file(setting: Setting, raw: str) -> str:
    if not raw:
        return ""
    path = Path(raw)
    if not path.exists():
        raise _Rejected("does not exist")
    if not path.is_file():
        raise _Rejected("is not a file")
    if not os.access(path, os.R_OK):
        raise _Rejected("cannot be read")
    return raw


def _parse_dir(setting: Setting, raw: str) -> Path:
    if not raw:
        raise _Rejected("is empty")
    path = Path(raw)
    if path.exists() and not path.is_dir():
        raise _Rejected("is not a directory")
    return path


def _parse_modules(setting: Setting, raw: str) -> tuple[str, ...]:
    modules = tuple(m.strip() for m in raw.split(",") if m.strip())
    if not all(part.isidentifier() for module in modules for part in module.split(".")):
        raise _Rejected("holds a name that is not a Python module name")
    return modules


def _url_parts(raw: str) -> SplitResult:
    """``raw`` split as a URL whose port, if any, is a number from 0 to 65535."""
    try:
        parts = urlsplit(raw)
    except ValueError:  # e.g. an unclosed [IPv6 address
        raise _Rejected("is not a valid URL") from None
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        raise _Rejected("has a port that is not a number from 0 to 65535") from None
    return parts


def _parse_broker_url(setting: Setting, raw: str) -> str:
    parts = _url_parts(raw)
    if "://" not in raw or parts.scheme.lower() not in AMQP_SCHEMES:
        raise _Rejected("is not an AMQP URL")
    if not parts.hostname:
        raise _Rejected("names no host")
    return raw


def _parse_sentry_dsn(setting: Setting, raw: str) -> str:
    if not raw:
        return ""
    parts = _url_parts(raw)
    project = parts.path.rsplit("/", 1)[-1]
    if parts.scheme not in ("http", "https") or not parts.username or not parts.hostname \
            or not re.fullmatch(r"[0-9]+", project):
        raise _Rejected("is not a Sentry DSN")
    return raw


def _parse_timezone(raw: str) -> str:
    try:
        ZoneInfo(raw)
    except (ZoneInfoNotFoundError, ValueError):
        raise _Rejected("is not a time zone this machine knows (tzdata)") from None
    return raw


_PARSERS: dict[str, Callable[[Setting, str], Any]] = {
    FLOAT: _parse_float,
    INT: _parse_int,
    BOOL: _parse_bool,
    CHOICE: _parse_choice,
    TEXT: lambda setting, raw: raw,
    HOST: _parse_host,
    EMAIL: _parse_email,
    FILE: _parse_file,
    DIR: _parse_dir,
    MODULES: _parse_modules,
    BROKER_URL: _parse_broker_url,
    SENTRY_DSN: _parse_sentry_dsn,
    TIMEZONE: lambda setting, raw: _parse_timezone(raw),
}


def _shown(setting: Setting, raw: str) -> str:
    """The value as an error message shows it: quoted, one line, secrets hidden, not too long."""
    if setting.kind == BROKER_URL:
        raw = redact_url(raw)
    elif setting.kind == SENTRY_DSN:
        raw = redact_dsn(raw)
    if len(raw) > _SHOWN_CHARS:
        raw = raw[:_SHOWN_CHARS] + "..."
    return repr(raw)


def parse(setting: Setting, raw: str) -> Any:
    """``raw`` checked against ``setting``'s rule and converted (float, int, bool, Path, ...).

    Raises ConfigError, one line naming the variable, the value and what is accepted.
    """
    try:
        if not raw.isprintable():
            raise _Rejected("holds a line break or another unprintable character")
        return _PARSERS[setting.kind](setting, raw)
    except _Rejected as exc:
        default = f"the default is {setting.default}" if setting.default else "the default is empty"
        raise ConfigError(f"{setting.name}={_shown(setting, raw)} {exc}; accepted: {setting.accepted()} "
                          f"({default}).") from None


# -- the whole configuration --------------------------------------------------------------


def _check_time_limits(values: dict[str, Any]) -> None:
    soft, hard = values["KIT_SOFT_TIME_LIMIT"], values["KIT_HARD_TIME_LIMIT"]
    if hard <= soft:
        raise ConfigError(
            f"KIT_HARD_TIME_LIMIT ({hard:g}) must be greater than KIT_SOFT_TIME_LIMIT "
            f"({soft:g}) so a task gets the chance to clean up."
        )


def validate() -> dict[str, Any]:
    """Every setting of SETTINGS read from the environment and checked, by name; raises ConfigError."""
    values = {s.name: parse(s, _raw(s.name)) for s in SETTINGS}
    _check_time_limits(values)
    return values


def _with_password_file(url: str, path: str) -> str:
    """``url`` with the password of KIT_BROKER_PASSWORD_FILE (``path``), when one is set."""
    if not path:
        return url
    try:
        password = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"KIT_BROKER_PASSWORD_FILE={path!r} cannot be read: {exc.strerror}.") from None
    if not password:
        raise ConfigError(f"KIT_BROKER_PASSWORD_FILE={path!r} is empty; it must hold the broker password.")
    scheme, rest = url.split("://", 1)
    if "@" not in rest:
        raise ConfigError("KIT_BROKER_PASSWORD_FILE is set but KIT_BROKER_URL names no user (user@host).")
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:{quote(password, safe='')}@{host}"


def _broker_ssl(url: str, values: dict[str, Any]) -> dict[str, Any] | None:
    """TLS options for amqps:// URLs: the server's certificate and host name are verified."""
    if urlsplit(url).scheme.lower() != "amqps":
        return None
    options: dict[str, Any] = {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": urlsplit(url).hostname or ""}
    for name, key in (("KIT_BROKER_CA_FILE", "ca_certs"), ("KIT_BROKER_CLIENT_CERT_FILE", "certfile"),
                      ("KIT_BROKER_CLIENT_KEY_FILE", "keyfile")):
        if values[name]:
            options[key] = values[name]
    return options


@dataclass(frozen=True)
class Settings:
    """A snapshot of the configuration, validated when it is read."""

    broker_url: str
    broker_ssl: dict[str, Any] | None
    declare_topology: bool
    connect_timeout: float
    publish_timeout: float
    max_payload_bytes: int
    send_sent_events: bool
    soft_time_limit: float
    hard_time_limit: float
    max_retries: int
    retry_backoff_base: float
    retry_backoff_max: float
    longest_wait: int
    max_worker_lost: int
    max_replays: int
    concurrency: int
    metrics_port: int
    log_level: str
    timezone: str
    task_modules: tuple[str, ...]
    state_dir: Path
    smtp_host: str
    smtp_port: int
    smtp_timeout: float
    mail_from: str
    report_dir: Path
    report_max_age_hours: float
    cleanup_interval: float
    webhook_timeout: float
    webhook_secret_file: str
    sentry_dsn: str
    sentry_environment: str
    sentry_release: str
    sentry_traces_sample_rate: float
    sentry_send_task_args: bool


def load() -> Settings:
    """Read and validate every setting from the environment.

    Raises ConfigError (one line naming the variable, the value and what is
    accepted) when a value is unusable.
    """
    v = validate()
    url = _with_password_file(v["KIT_BROKER_URL"], v["KIT_BROKER_PASSWORD_FILE"])
    return Settings(
        broker_url=url,
        broker_ssl=_broker_ssl(url, v),
        declare_topology=v["KIT_DECLARE_TOPOLOGY"],
        connect_timeout=v["KIT_CONNECT_TIMEOUT"],
        publish_timeout=v["KIT_PUBLISH_TIMEOUT"],
        max_payload_bytes=v["KIT_MAX_PAYLOAD_BYTES"],
        send_sent_events=v["KIT_SEND_SENT_EVENTS"],
        soft_time_limit=v["KIT_SOFT_TIME_LIMIT"],
        hard_time_limit=v["KIT_HARD_TIME_LIMIT"],
        max_retries=v["KIT_MAX_RETRIES"],
        retry_backoff_base=v["KIT_RETRY_BACKOFF_BASE"],
        retry_backoff_max=v["KIT_RETRY_BACKOFF_MAX"],
        longest_wait=v["KIT_LONGEST_WAIT"],
        max_worker_lost=v["KIT_MAX_WORKER_LOST"],
        max_replays=v["KIT_MAX_REPLAYS"],
        concurrency=v["KIT_CONCURRENCY"],
        metrics_port=v["KIT_METRICS_PORT"],
        log_level=v["KIT_LOG_LEVEL"],
        timezone=v["KIT_TIMEZONE"],
        task_modules=v["KIT_TASK_MODULES"],
        state_dir=v["KIT_STATE_DIR"],
        smtp_host=v["KIT_SMTP_HOST"],
        smtp_port=v["KIT_SMTP_PORT"],
        smtp_timeout=v["KIT_SMTP_TIMEOUT"],
        mail_from=v["KIT_MAIL_FROM"],
        report_dir=v["KIT_REPORT_DIR"],
        report_max_age_hours=v["KIT_REPORT_MAX_AGE_HOURS"],
        cleanup_interval=v["KIT_CLEANUP_INTERVAL"],
        webhook_timeout=v["KIT_WEBHOOK_TIMEOUT"],
        webhook_secret_file=v["KIT_WEBHOOK_SECRET_FILE"],
        sentry_dsn=v["SENTRY_DSN"],
        sentry_environment=v["SENTRY_ENVIRONMENT"],
        sentry_release=v["SENTRY_RELEASE"],
        sentry_traces_sample_rate=v["SENTRY_TRACES_SAMPLE_RATE"],
        sentry_send_task_args=v["SENTRY_SEND_TASK_ARGS"],
    )


def redact_url(url: str) -> str:
    """Hide the password of a URL for messages and logs."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def redact_dsn(dsn: str) -> str:
    """Hide the key of a Sentry DSN for messages and logs."""
    if "://" not in dsn or "@" not in dsn:
        return dsn
    return dsn.split("://", 1)[0] + "://***@" + dsn.rsplit("@", 1)[1]
