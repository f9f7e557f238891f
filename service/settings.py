"""Configuration read from environment variables.

Every setting has a safe default so a local broker works out of the box. The
README's configuration table is generated from ``SETTINGS`` below, so the
names, defaults and descriptions live in exactly one place.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit


@dataclass(frozen=True)
class Setting:
    """One environment variable: its name, default (as text) and meaning."""

    name: str
    default: str
    description: str


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "KIT_BROKER_URL",
        "pyamqp://kit-admin@127.0.0.1:5672/kit",
        "Broker URL, without the password when KIT_BROKER_PASSWORD_FILE is set. Use the "
        "`pyamqp://` (or `amqps://`) scheme: plain `amqp://` silently switches to librabbitmq "
        "where it is installed. The default is the local stack's administrator (see README).",
    ),
    Setting(
        "KIT_BROKER_PASSWORD_FILE",
        "",
        "File holding the broker password (a Docker/Kubernetes secret); it replaces the "
        "password of KIT_BROKER_URL, so the URL can be written without one.",
    ),
    Setting(
        "KIT_BROKER_CA_FILE",
        "",
        "CA bundle that signed the broker's certificate, for `amqps://` URLs (empty: the "
        "system's CAs). The certificate and its host name are always verified.",
    ),
    Setting("KIT_BROKER_CLIENT_CERT_FILE", "", "Client certificate for `amqps://` with mutual TLS (optional)."),
    Setting("KIT_BROKER_CLIENT_KEY_FILE", "", "Key of the client certificate (optional)."),
    Setting(
        "KIT_DECLARE_TOPOLOGY",
        "true",
        "Workers declare the exchanges and queues of service/queues.py at start. Least-privilege "
        "workers (the kit-worker user, `python -m service broker`) run with `false`: the topology "
        "then comes from the broker's definitions, and the worker needs no right to change it.",
    ),
    Setting("KIT_CONNECT_TIMEOUT", "5", "Seconds to wait for a TCP/AMQP connection to the broker."),
    Setting(
        "KIT_PUBLISH_TIMEOUT",
        "10",
        "Seconds a publish may take in all, reconnecting included, before it fails "
        "with BrokerUnavailable.",
    ),
    Setting(
        "KIT_MAX_PAYLOAD_BYTES",
        "1048576",
        "Largest encoded task body the client accepts. Pass a reference (a path or "
        "an id) for bigger data.",
    ),
    Setting(
        "KIT_SEND_SENT_EVENTS",
        "true",
        "The client also sends Celery's `task-sent` event (unconfirmed), so celery-exporter "
        "counts sent tasks and labels them with their queue.",
    ),
    Setting("KIT_SOFT_TIME_LIMIT", "300", "Seconds before SoftTimeLimitExceeded is raised inside a task."),
    Setting(
        "KIT_HARD_TIME_LIMIT",
        "360",
        "Seconds before the worker kills a task's process; the task is dead-lettered "
        "with reason `time-limit`.",
    ),
    Setting("KIT_MAX_RETRIES", "5", "Default retries per task (a task may set its own `max_retries`)."),
    Setting("KIT_RETRY_BACKOFF_BASE", "2", "Seconds of the first retry delay; each retry doubles it."),
    Setting("KIT_RETRY_BACKOFF_MAX", "600", "Longest retry delay in seconds (capped by the longest wait tier)."),
    Setting(
        "KIT_MAX_WORKER_LOST",
        "3",
        "Deliveries whose worker process died (kill -9, os._exit, OOM) before a "
        "message is dead-lettered as poison.",
    ),
    Setting(
        "KIT_MAX_REPLAYS",
        "3",
        "`dlq replay` refuses a dead letter replayed this many times already, unless `--force`.",
    ),
    Setting("KIT_CONCURRENCY", "2", "Worker processes per `python -m service worker`."),
    Setting(
        "KIT_METRICS_PORT",
        "9810",
        "Port of a worker's Prometheus endpoint (the kit's own metrics); 0 turns it off.",
    ),
    Setting("KIT_LOG_LEVEL", "INFO", "Log level of workers and beat."),
    Setting(
        "KIT_TASK_MODULES",
        "",
        "Extra comma-separated modules with tasks that workers import (the kit's "
        "own `service.tasks.*` are always imported).",
    ),
    Setting("KIT_STATE_DIR", "var", "Directory for beat's schedule file, pid files and logs."),
    Setting("KIT_SMTP_HOST", "127.0.0.1", "SMTP server for e-mail tasks."),
    Setting("KIT_SMTP_PORT", "25", "SMTP port."),
    Setting("KIT_SMTP_TIMEOUT", "10", "Seconds an SMTP conversation may take."),
    Setting("KIT_MAIL_FROM", "noreply@localhost", "Envelope sender of e-mail tasks."),
    Setting("KIT_REPORT_DIR", "var/reports", "Where report exports write their CSV files."),
    Setting("KIT_REPORT_MAX_AGE_HOURS", "168", "The periodic clean-up deletes exports older than this."),
    Setting("KIT_CLEANUP_INTERVAL", "3600", "Seconds between periodic clean-ups scheduled by beat."),
    Setting("KIT_WEBHOOK_TIMEOUT", "10", "Seconds a webhook delivery may take."),
    Setting(
        "KIT_WEBHOOK_SECRET_FILE",
        "",
        "File holding the HMAC key used to sign webhook bodies (header "
        "`X-Signature-SHA256`); unsigned when empty.",
    ),
    Setting("SENTRY_DSN", "", "Sentry DSN of workers, beat and the client; Sentry is off when empty."),
    Setting("SENTRY_ENVIRONMENT", "", "Sentry environment (Sentry's own default, `production`, when empty)."),
    Setting("SENTRY_RELEASE", "", "Sentry release; when empty Sentry guesses it (e.g. from git)."),
    Setting("SENTRY_TRACES_SAMPLE_RATE", "0", "Share of task runs sent to Sentry as performance traces, 0 to 1."),
    Setting(
        "SENTRY_SEND_TASK_ARGS",
        "false",
        "`true` sends task arguments and local variables to Sentry; they are scrubbed by default "
        "(they carry e-mail addresses and tokens).",
    ),
)

_DEFAULTS = {s.name: s.default for s in SETTINGS}


class ConfigError(ValueError):
    """An environment variable holds a value that cannot be used."""


def _raw(name: str) -> str:
    return os.environ.get(name, _DEFAULTS[name]).strip()


def _number(name: str, kind: type = float, minimum: float = 0) -> float:
    raw = _raw(name)
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(
            f"{name}={raw!r} is not a number; unset it to use the default "
            f"({_DEFAULTS[name]}) or set a {kind.__name__}."
        ) from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} must be at least {minimum}.")
    return value


def _with_password_file(url: str) -> str:
    path = _raw("KIT_BROKER_PASSWORD_FILE")
    if not path:
        return url
    try:
        password = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"KIT_BROKER_PASSWORD_FILE={path!r} cannot be read: {exc.strerror}.") from None
    scheme, rest = url.split("://", 1)
    if "@" in rest:
        credentials, host = rest.rsplit("@", 1)
        user = credentials.split(":", 1)[0]
    else:
        raise ConfigError("KIT_BROKER_PASSWORD_FILE is set but KIT_BROKER_URL names no user (user@host).")
    return f"{scheme}://{user}:{quote(password, safe='')}@{host}"


def _broker_ssl(url: str, scheme: str) -> dict[str, Any] | None:
    """TLS options for amqps:// URLs: the server's certificate and host name are verified."""
    if scheme != "amqps":
        return None
    host = urlsplit(url).hostname or ""
    options: dict[str, Any] = {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": host}
    for name, key in (("KIT_BROKER_CA_FILE", "ca_certs"), ("KIT_BROKER_CLIENT_CERT_FILE", "certfile"),
                      ("KIT_BROKER_CLIENT_KEY_FILE", "keyfile")):
        path = _raw(name)
        if path:
            if not Path(path).is_file():
                raise ConfigError(f"{name}={path!r} does not exist.")
            options[key] = path
    return options


def _flag(name: str) -> bool:
    raw = _raw(name).lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean; use true or false.")


@dataclass(frozen=True)
class Settings:
    """A snapshot of the configuration, validated when it is read."""

    broker_url: str
    broker_ssl: dict[str, Any] | None
    connect_timeout: float
    publish_timeout: float
    max_payload_bytes: int
    send_sent_events: bool
    soft_time_limit: float
    hard_time_limit: float
    max_retries: int
    retry_backoff_base: float
    retry_backoff_max: float
    max_worker_lost: int
    max_replays: int
    concurrency: int
    metrics_port: int
    log_level: str
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

    Raises ConfigError naming the variable when a value is unusable.
    """
    url = _raw("KIT_BROKER_URL")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in ("pyamqp", "amqps", "amqp"):
        raise ConfigError(
            f"KIT_BROKER_URL={redact_url(url)!r} is not an AMQP URL; expected "
            "pyamqp://user:password@host:5672/vhost."
        )
    soft = _number("KIT_SOFT_TIME_LIMIT", minimum=1)
    hard = _number("KIT_HARD_TIME_LIMIT", minimum=1)
    if hard <= soft:
        raise ConfigError(
            f"KIT_HARD_TIME_LIMIT ({hard:g}) must be greater than KIT_SOFT_TIME_LIMIT "
            f"({soft:g}) so a task gets the chance to clean up."
        )
    modules = tuple(m.strip() for m in _raw("KIT_TASK_MODULES").split(",") if m.strip())
    url = _with_password_file(url)
    return Settings(
        broker_url=url,
        broker_ssl=_broker_ssl(url, scheme),
        connect_timeout=_number("KIT_CONNECT_TIMEOUT", minimum=0.1),
        publish_timeout=_number("KIT_PUBLISH_TIMEOUT", minimum=0.1),
        max_payload_bytes=int(_number("KIT_MAX_PAYLOAD_BYTES", int, minimum=1)),
        send_sent_events=_flag("KIT_SEND_SENT_EVENTS"),
        soft_time_limit=soft,
        hard_time_limit=hard,
        max_retries=int(_number("KIT_MAX_RETRIES", int)),
        retry_backoff_base=_number("KIT_RETRY_BACKOFF_BASE", minimum=0.001),
        retry_backoff_max=_number("KIT_RETRY_BACKOFF_MAX", minimum=1),
        max_worker_lost=int(_number("KIT_MAX_WORKER_LOST", int, minimum=1)),
        max_replays=int(_number("KIT_MAX_REPLAYS", int)),
        concurrency=int(_number("KIT_CONCURRENCY", int, minimum=1)),
        metrics_port=int(_number("KIT_METRICS_PORT", int)),
        log_level=_raw("KIT_LOG_LEVEL").upper(),
        task_modules=modules,
        state_dir=Path(_raw("KIT_STATE_DIR")),
        smtp_host=_raw("KIT_SMTP_HOST"),
        smtp_port=int(_number("KIT_SMTP_PORT", int, minimum=1)),
        smtp_timeout=_number("KIT_SMTP_TIMEOUT", minimum=0.1),
        mail_from=_raw("KIT_MAIL_FROM"),
        report_dir=Path(_raw("KIT_REPORT_DIR")),
        report_max_age_hours=_number("KIT_REPORT_MAX_AGE_HOURS"),
        cleanup_interval=_number("KIT_CLEANUP_INTERVAL", minimum=1),
        webhook_timeout=_number("KIT_WEBHOOK_TIMEOUT", minimum=0.1),
        webhook_secret_file=_raw("KIT_WEBHOOK_SECRET_FILE"),
        sentry_dsn=_raw("SENTRY_DSN"),
        sentry_environment=_raw("SENTRY_ENVIRONMENT"),
        sentry_release=_raw("SENTRY_RELEASE"),
        sentry_traces_sample_rate=min(_number("SENTRY_TRACES_SAMPLE_RATE"), 1.0),
        sentry_send_task_args=_flag("SENTRY_SEND_TASK_ARGS"),
    )


def redact_url(url: str) -> str:
    """Hide the password of a URL for messages and logs."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"

