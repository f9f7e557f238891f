"""Configuration read from environment variables, validated once, at load.

Every setting has a safe default so a local broker works out of the box, and a
rule (its kind and accepted range) that ``load()`` checks generically: a bad
value is one ``ConfigError`` line naming the variable, the value and what is
accepted. The README's configuration table is generated from ``SETTINGS``
below (``python -m service config --markdown``), so the names, defaults,
accepted ranges and descriptions live in exactly one place. The kinds of value
and how each is checked are ``service.setting_rules`` (re-exported here).

Why this module is over 400 lines (about 570): ``SETTINGS`` is the table of
every setting with its description, which the README's table is generated
from; the checks that span two settings sit right below it.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from service.queues import DELIVERY_LIMIT, QUEUE_TYPES, WAIT_TIERS_S
from service.setting_rules import (
    ADDRESSES,
    AMQP_SCHEMES,
    BOOL,
    BROKER_URL,
    CHOICE,
    DIR,
    EMAIL,
    FILE,
    FLOAT,
    HEADER,
    HOST,
    HTTP_URL,
    INT,
    MODULES,
    NAME,
    OPTIONAL_HTTP_URL,
    RESULT_BACKEND_URL,
    SENTRY_DSN,
    TEXT,
    TIMEZONE,
    ConfigError,
    Setting,
    parse,
    read_secret,
    redact_dsn,
    redact_url,
    split_broker_urls,
)

__all__ = [
    "AMQP_SCHEMES", "BOOL", "BROKER_URL", "CHOICE", "CONSUMER_TIMEOUT_S", "DIR", "EMAIL", "FILE", "FLOAT", "HOST",
    "HTTP_URL", "INT", "LOG_LEVELS", "MAX_COUNT", "MAX_TIMEOUT_S", "MODULES", "NAME", "RABBITMQ_MAX_MESSAGE_BYTES",
    "RESULT_BACKEND_URL",
    "SENTRY_DSN", "SETTINGS", "TEXT", "TIMEZONE", "ConfigError", "Setting", "Settings", "load", "parse",
    "read_secret", "redact_dsn", "redact_url", "validate",
]

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
        "Broker URL, without the password when KIT_BROKER_PASSWORD_FILE is set; for a cluster, one URL "
        "per node separated by `;` (clients fail over between them). Use the "
        "`pyamqp://` (or `amqps://`) scheme: plain `amqp://` silently switches to librabbitmq "
        "where it is installed. The default is the local stack's administrator (see README).",
        BROKER_URL,
    ),
    Setting(
        "KIT_QUEUE_TYPE",
        "classic",
        "Queue type of the topology: `classic` (one broker node; priorities by x-max-priority) or "
        "`quorum` (a 3-node cluster: replicated queues, at-least-once dead-lettering, priorities by "
        "a high lane per work queue). See README, \"Running on a cluster\".",
        CHOICE,
        choices=QUEUE_TYPES,
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
    Setting(
        "KIT_ADMIN_URL",
        "http://127.0.0.1:15672",
        "RabbitMQ's management API, without credentials, for `python -m service broker provision` "
        "(its --management-url).",
        HTTP_URL,
    ),
    Setting("KIT_ADMIN_USER", "kit-admin",
            "An administrator of the broker, for `python -m service broker provision` (its --admin-user).", NAME),
    Setting(
        "KIT_ADMIN_PASSWORD_FILE",
        "",
        "File with that administrator's password, for `python -m service broker provision` (its "
        "--admin-password-file; empty: the admin role's file in --secrets-dir).",
        FILE,
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
    Setting("KIT_REPORT_DIR", "var/reports", "Where report exports write their CSV (and XLSX) files.", DIR),
    Setting(
        "KIT_REPORT_MAX_AGE_HOURS",
        "168",
        "The periodic clean-up deletes exports older than this.",
        FLOAT, 0, 87600, min_inclusive=False,
    ),
    _seconds("KIT_CLEANUP_INTERVAL", "3600", "Seconds between periodic clean-ups scheduled by beat.",
             1, 7 * 86400),
    _seconds("KIT_BEAT_LEASE_RETRY", "5",
             "Seconds between a standby beat's attempts to take the schedule lease: how long the schedule "
             "pauses at most when the active beat dies (a hung one: plus 10 to 15 s, until the broker "
             "misses the heartbeats of its lease connection). "
             "See README, \"Beat\".",
             0.1, 600),
    _seconds("KIT_WEBHOOK_TIMEOUT", "10", "Seconds a webhook delivery may take.", 0.1, MAX_TIMEOUT_S),
    Setting(
        "KIT_WEBHOOK_SECRET_FILE",
        "",
        "File holding the HMAC key used to sign webhook bodies (header "
        "`X-Signature-SHA256`); unsigned when empty.",
        FILE,
    ),
    Setting("KIT_WEB_HOST", "127.0.0.1", "Address `python -m service web` (the example web service) listens on.",
            HOST),
    _count("KIT_WEB_PORT", "8000", "Port of `python -m service web`.", 1, 65535),
    _seconds("KIT_WEB_REQUEST_TIMEOUT", "30",
             "Seconds the web service may take to answer a request before it gives up with 503 "
             "(downloads: until the file starts streaming).",
             0.5, MAX_TIMEOUT_S),
    _seconds("KIT_WEB_EXPORT_PAUSE", "0",
             "Seconds a work-log export published by the web service pauses after each chunk of rows: "
             "0 in production; a few hundredths make the progress visible in demos and tests.",
             0, 1),
    Setting("KIT_CONSOLE_HOST", "127.0.0.1", "Address `python -m service console` (the dead-letter console) "
            "listens on.", HOST),
    _count("KIT_CONSOLE_PORT", "5580", "Port of `python -m service console`.", 1, 65535),
    Setting("KIT_CONSOLE_USERS_FILE", "var/console_users",
            "The console's users: one `name:role:hash` line each (role viewer or operator, an scrypt hash), "
            "written by `python -m service console add-user`; no user exists until one is added.", TEXT),
    Setting("KIT_CONSOLE_URL", "",
            "Where people reach the console (e.g. `https://dlq.example.com`): alert annotations and Grafana "
            "link to it; empty: http://KIT_CONSOLE_HOST:KIT_CONSOLE_PORT.", OPTIONAL_HTTP_URL),
    _seconds("KIT_CONSOLE_SESSION_TTL", "28800",
             "Seconds a console login lasts without use (sessions also end when the console restarts).",
             60, 7 * 86400),
    Setting("KIT_CONSOLE_COOKIE_SECURE", "false",
            "`true` marks the console's session cookie Secure (set it when a TLS proxy serves the console).",
            BOOL),
    Setting("KIT_CONSOLE_PROXY_USER_HEADER", "",
            "Trust this request header (e.g. `X-Forwarded-User`) as the logged-in user, from "
            "KIT_CONSOLE_TRUSTED_PROXIES only; empty (the default): the console's own login. The user's "
            "role comes from KIT_CONSOLE_USERS_FILE; a user not listed there is a viewer.", HEADER),
    Setting("KIT_CONSOLE_TRUSTED_PROXIES", "127.0.0.1,::1",
            "Comma-separated addresses whose KIT_CONSOLE_PROXY_USER_HEADER is believed.", ADDRESSES),
    _seconds("KIT_CONSOLE_REFRESH", "15",
             "Seconds between the console's background reads of each dead-letter queue (overview and "
             "lists show that snapshot and its age; a queue whose count changed is read sooner).", 1, 3600),
    Setting("KIT_CONSOLE_ARCHIVE_DIR", "var/console-archives",
            "Where the console writes the archive of every purge before it deletes (JSON Lines, "
            "`dlq import` reads them).", DIR),
    Setting("KIT_FLOWER_AUTH_FILE", "",
            "File holding `user:password` for Flower's basic auth (`python -m service flower`); Flower "
            "refuses to start without it.", TEXT),
    Setting("KIT_ALERT_RELAY_HOST", "127.0.0.1", "Address `python -m service alert-relay` (the chat-bot relay "
            "Alertmanager's webhook posts to) listens on.", HOST),
    _count("KIT_ALERT_RELAY_PORT", "8060", "Port of `python -m service alert-relay` (POST /alertmanager, "
           "/healthz, /metrics).", 1, 65535),
    Setting("KIT_ALERT_RELAY_CONFIG", "deploy/alertmanager/relay.yml",
            "The relay's bots and their routing by severity and queue (no secret in it: each bot names its "
            "secret file).", NAME),
    Setting("KIT_ALERT_RELAY_SECRETS_DIR", "/run/secrets",
            "Directory of the bots' secret files named in KIT_ALERT_RELAY_CONFIG (a bot whose file is empty "
            "is skipped, with a warning).", NAME),
    Setting("KIT_ALERT_RELAY_TOKEN_FILE", "/run/secrets/alertmanager_webhook_token",
            "File holding the bearer token Alertmanager sends (the alertmanager_webhook_token secret); the "
            "relay refuses to start while it is empty.", NAME),
    Setting("KIT_ALERT_TIMEZONE", "UTC", "Time zone of the start times in chat-bot messages (e.g. "
            "`Asia/Shanghai`).", TIMEZONE),
    Setting("KIT_ALERT_GRAFANA_URL", "",
            "Grafana dashboard the relay's messages link to (e.g. "
            "`https://grafana.example.com/d/kit-celery-overview`); empty: no Grafana link.", OPTIONAL_HTTP_URL),
    _seconds("KIT_ALERT_RELAY_TIMEOUT", "5", "Seconds the relay waits for one answer of a bot.", 0.1, 60),
    _seconds("KIT_ALERT_RELAY_DEADLINE", "30",
             "Seconds the relay keeps retrying a bot (with backoff) for one notification before it answers "
             "Alertmanager 503 so that Alertmanager retries; keep it below Alertmanager's own window "
             "(group_interval, at least 10 s).", 1, 600),
    Setting(
        "KIT_RESULT_BACKEND",
        "",
        "Result backend that keeps each task's state for `task status` and `task cancel`: a Celery "
        "result backend URL, e.g. `redis://127.0.0.1:6379/0` (Redis is the supported one: cancel and "
        "the kit's own states need it; `rediss://` needs `?ssl_cert_reqs=required`). Empty: no backend; "
        "workers store no results and `task status` answers only what the dead-letter queues show.",
        RESULT_BACKEND_URL,
    ),
    _count("KIT_RESULT_EXPIRES", "86400",
           "Seconds a task's state and result are kept in the result backend; a cancel mark is kept ten "
           "years longer, and this long once a worker dead-lettered its task.", 1, 365 * 86400),
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


def _raw(name: str) -> str:
    """The variable's value (its default when unset), without surrounding whitespace."""
    return os.environ.get(name, _BY_NAME[name].default).strip()


# -- the whole configuration --------------------------------------------------------------


def _check_time_limits(values: dict[str, Any]) -> None:
    soft, hard = values["KIT_SOFT_TIME_LIMIT"], values["KIT_HARD_TIME_LIMIT"]
    if hard <= soft:
        raise ConfigError(
            f"KIT_HARD_TIME_LIMIT ({hard:g}) must be greater than KIT_SOFT_TIME_LIMIT "
            f"({soft:g}) so a task gets the chance to clean up."
        )


def _check_delivery_limit(values: dict[str, Any]) -> None:
    """On quorum queues the broker's x-delivery-limit is only a backstop: the worker's own limit comes first."""
    if values["KIT_QUEUE_TYPE"] == "quorum" and values["KIT_MAX_WORKER_LOST"] >= DELIVERY_LIMIT:
        raise ConfigError(
            f"KIT_MAX_WORKER_LOST ({values['KIT_MAX_WORKER_LOST']}) must be below the quorum work queues' "
            f"x-delivery-limit ({DELIVERY_LIMIT}) with KIT_QUEUE_TYPE=quorum, or the broker dead-letters a "
            "poison message (reason delivery_limit) before the worker can say why; lower it."
        )


def validate() -> dict[str, Any]:
    """Every setting of SETTINGS read from the environment and checked, by name; raises ConfigError."""
    values = {s.name: parse(s, _raw(s.name)) for s in SETTINGS}
    _check_time_limits(values)
    _check_delivery_limit(values)
    return values


def _with_password_file(url: str, path: str) -> str:
    """``url`` (each node's, in a ``;`` list) with the password of KIT_BROKER_PASSWORD_FILE (``path``), when set."""
    if not path:
        return url
    password = read_secret(path, unreadable=f"KIT_BROKER_PASSWORD_FILE={path!r} cannot be read: {{error}}.",
                           empty=f"KIT_BROKER_PASSWORD_FILE={path!r} is empty; it must hold the broker password.")
    with_password = []
    for node_url in split_broker_urls(url):
        scheme, rest = node_url.split("://", 1)
        if "@" not in rest:
            raise ConfigError("KIT_BROKER_PASSWORD_FILE is set but KIT_BROKER_URL names no user (user@host).")
        credentials, host = rest.rsplit("@", 1)
        user = credentials.split(":", 1)[0]
        with_password.append(f"{scheme}://{user}:{quote(password, safe='')}@{host}")
    return ";".join(with_password)


def _broker_ssl(url: str, values: dict[str, Any]) -> dict[str, Any] | None:
    """TLS options for amqps:// URLs: the server's certificate and host name are verified."""
    nodes = split_broker_urls(url)
    if urlsplit(nodes[0]).scheme.lower() != "amqps":
        return None
    # With several nodes, kombu puts the host of the node it connects to here (None); their
    # certificates must then also name that host (one certificate with every node's name).
    hostname = urlsplit(nodes[0]).hostname or "" if len(nodes) == 1 else None
    options: dict[str, Any] = {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": hostname}
    for name, key in (("KIT_BROKER_CA_FILE", "ca_certs"), ("KIT_BROKER_CLIENT_CERT_FILE", "certfile"),
                      ("KIT_BROKER_CLIENT_KEY_FILE", "keyfile")):
        if values[name]:
            options[key] = values[name]
    return options


@dataclass(frozen=True)
class Settings:
    """A snapshot of the configuration, validated when it is read."""

    broker_url: str  # every node's URL, joined by ";" (kombu's failover syntax)
    broker_ssl: dict[str, Any] | None
    queue_type: str
    declare_topology: bool
    admin_url: str
    admin_user: str
    admin_password_file: str
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
    beat_lease_retry: float
    webhook_timeout: float
    webhook_secret_file: str
    web_host: str
    web_port: int
    web_request_timeout: float
    web_export_pause: float
    console_host: str
    console_port: int
    console_users_file: str
    console_url: str
    console_session_ttl: float
    console_cookie_secure: bool
    console_proxy_user_header: str
    console_trusted_proxies: str
    console_refresh: float
    console_archive_dir: Path
    flower_auth_file: str
    alert_relay_host: str
    alert_relay_port: int
    alert_relay_config: str
    alert_relay_secrets_dir: str
    alert_relay_token_file: str
    alert_timezone: str
    alert_grafana_url: str
    alert_relay_timeout: float
    alert_relay_deadline: float
    result_backend: str
    result_expires: int
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
        queue_type=v["KIT_QUEUE_TYPE"],
        declare_topology=v["KIT_DECLARE_TOPOLOGY"],
        admin_url=v["KIT_ADMIN_URL"],
        admin_user=v["KIT_ADMIN_USER"],
        admin_password_file=v["KIT_ADMIN_PASSWORD_FILE"],
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
        beat_lease_retry=v["KIT_BEAT_LEASE_RETRY"],
        webhook_timeout=v["KIT_WEBHOOK_TIMEOUT"],
        webhook_secret_file=v["KIT_WEBHOOK_SECRET_FILE"],
        web_host=v["KIT_WEB_HOST"],
        web_port=v["KIT_WEB_PORT"],
        web_request_timeout=v["KIT_WEB_REQUEST_TIMEOUT"],
        web_export_pause=v["KIT_WEB_EXPORT_PAUSE"],
        console_host=v["KIT_CONSOLE_HOST"],
        console_port=v["KIT_CONSOLE_PORT"],
        console_users_file=v["KIT_CONSOLE_USERS_FILE"],
        console_url=v["KIT_CONSOLE_URL"],
        console_session_ttl=v["KIT_CONSOLE_SESSION_TTL"],
        console_cookie_secure=v["KIT_CONSOLE_COOKIE_SECURE"],
        console_proxy_user_header=v["KIT_CONSOLE_PROXY_USER_HEADER"],
        console_trusted_proxies=v["KIT_CONSOLE_TRUSTED_PROXIES"],
        console_refresh=v["KIT_CONSOLE_REFRESH"],
        console_archive_dir=v["KIT_CONSOLE_ARCHIVE_DIR"],
        flower_auth_file=v["KIT_FLOWER_AUTH_FILE"],
        alert_relay_host=v["KIT_ALERT_RELAY_HOST"],
        alert_relay_port=v["KIT_ALERT_RELAY_PORT"],
        alert_relay_config=v["KIT_ALERT_RELAY_CONFIG"],
        alert_relay_secrets_dir=v["KIT_ALERT_RELAY_SECRETS_DIR"],
        alert_relay_token_file=v["KIT_ALERT_RELAY_TOKEN_FILE"],
        alert_timezone=v["KIT_ALERT_TIMEZONE"],
        alert_grafana_url=v["KIT_ALERT_GRAFANA_URL"],
        alert_relay_timeout=v["KIT_ALERT_RELAY_TIMEOUT"],
        alert_relay_deadline=v["KIT_ALERT_RELAY_DEADLINE"],
        result_backend=v["KIT_RESULT_BACKEND"],
        result_expires=v["KIT_RESULT_EXPIRES"],
        sentry_dsn=v["SENTRY_DSN"],
        sentry_environment=v["SENTRY_ENVIRONMENT"],
        sentry_release=v["SENTRY_RELEASE"],
        sentry_traces_sample_rate=v["SENTRY_TRACES_SAMPLE_RATE"],
        sentry_send_task_args=v["SENTRY_SEND_TASK_ARGS"],
    )


