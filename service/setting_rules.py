"""The rules of settings: the kinds of value, what each accepts, and how a raw value is checked.

``Setting`` describes one environment variable (name, default, description,
kind and range); ``parse`` checks a raw value against its rule and converts it,
or raises ``ConfigError``, one line naming the variable, the value and what is
accepted. ``read_secret`` reads a password file (every password file of the kit
is read through it). The table of settings is ``service.settings.SETTINGS``;
this module imports nothing of the kit.

Why this module is over 400 lines (about 460): each kind of value (URLs of the
broker, the result backend and Sentry, hosts, files, addresses, time zones)
is one small checker, and they are kept side by side so every kind answers a
bad value with the same one-line shape.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.headerregistry import Address
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

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
HTTP_URL = "http-url"  #: an http:// or https:// URL with a host and no credentials
NAME = "name"  #: one line of text, not empty
RESULT_BACKEND_URL = "result-backend-url"  #: empty, or a Celery result backend URL (redis:// checked whole)
OPTIONAL_HTTP_URL = "optional-http-url"  #: empty, or what HTTP_URL accepts
HEADER = "header"  #: empty, or an HTTP header name (an RFC 9110 token)
ADDRESSES = "addresses"  #: comma-separated IP addresses, may be empty

#: Broker URL schemes the kit accepts.
AMQP_SCHEMES = ("pyamqp", "amqps", "amqp")
#: The URL schemes of Celery's result backends (celery.app.backends.BACKEND_ALIASES, Celery 5.7);
#: ``db+postgresql://`` style URLs name the backend before the ``+``.
RESULT_BACKEND_SCHEMES = (
    "rpc", "cache", "redis", "rediss", "sentinel", "mongodb", "db", "database", "elasticsearch", "cassandra",
    "couchbase", "couchdb", "cosmosdbsql", "riak", "file", "consul", "dynamodb", "azureblockblob", "arangodb",
    "s3", "gs",
)
#: Result backends that answer only the process that stored the result (``rpc://`` replies to the publisher's
#: own queue, ``cache+memory://`` is one process's memory): ``task status`` asks from another process.
_PRIVATE_RESULT_BACKENDS = {
    "rpc": "is the rpc:// backend, which sends each result to the publishing process only",
    "cache+memory": "is an in-memory cache, which only its own process can read",
}
#: What ``ssl_cert_reqs`` of a ``rediss://`` URL may be (Celery refuses the URL without it).
_REDIS_CERT_REQS = ("required", "optional", "none", "cert_required", "cert_optional", "cert_none")
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


class ConfigError(ValueError):
    """An environment variable holds a value that cannot be used."""


class _Rejected(Exception):
    """A value breaks its setting's rule; the message says how ("is out of range")."""


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
                          "with a host, or several (one per cluster node) separated by ';'",
    SENTRY_DSN: lambda s: "empty, or a Sentry DSN: http(s)://key@host/project",
    TIMEZONE: lambda s: "an IANA time zone name such as UTC or Asia/Shanghai",
    HTTP_URL: lambda s: "an http:// or https:// URL with a host and no credentials",
    NAME: lambda s: "one line of text, not empty",
    RESULT_BACKEND_URL: lambda s: "empty, or a Celery result backend URL such as redis://host:6379/0 "
                                  "(rediss:// with ?ssl_cert_reqs=required)",
    OPTIONAL_HTTP_URL: lambda s: "empty, or an http:// or https:// URL with a host and no credentials",
    HEADER: lambda s: "empty, or an HTTP header name such as X-Forwarded-User",
    ADDRESSES: lambda s: "empty, or comma-separated IP addresses",
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


def split_broker_urls(raw: str) -> list[str]:
    """The node URLs of a broker URL: one, or several separated by ``;`` (kombu's failover syntax)."""
    return [part.strip() for part in raw.split(";")]


def _parse_broker_url(setting: Setting, raw: str) -> str:
    urls = split_broker_urls(raw)
    if len(urls) > 1 and any(not url for url in urls):
        raise _Rejected("has an empty node between two ';' (write node URLs as url1;url2;url3)")
    seen: tuple[str, str, str] | None = None
    for number, url in enumerate(urls, start=1):
        which = f"node {number} of {len(urls)} " if len(urls) > 1 else ""
        parts = _url_parts(url)
        if "://" not in url or parts.scheme.lower() not in AMQP_SCHEMES:
            raise _Rejected(f"{which}is not an AMQP URL".strip() if which else "is not an AMQP URL")
        if not parts.hostname:
            raise _Rejected(f"{which}names no host".strip() if which else "names no host")
        # One cluster: every node is reached the same way, as the same user, into the same vhost.
        same = (parts.scheme.lower(), parts.username or "", parts.path)
        if seen is not None and same != seen:
            raise _Rejected(f"{which}differs from node 1 in its scheme, user or vhost; the nodes of one cluster "
                            "share them (only host and port differ)")
        seen = same
    return ";".join(urls)


def _parse_http_url(setting: Setting, raw: str) -> str:
    parts = _url_parts(raw)
    if "://" not in raw or parts.scheme.lower() not in ("http", "https"):
        raise _Rejected("is not an http:// or https:// URL")
    if not parts.hostname:
        raise _Rejected("names no host")
    if "@" in parts.netloc:
        raise _Rejected("holds credentials; give the password in a file")
    return raw


def _parse_name(setting: Setting, raw: str) -> str:
    if not raw:
        raise _Rejected("is empty")
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


def _parse_result_backend(setting: Setting, raw: str) -> str:
    """Empty, or a URL of a result backend Celery knows; a Redis URL is checked whole."""
    if not raw:
        return ""
    scheme = raw.split("://", 1)[0].lower() if "://" in raw else ""
    if scheme.split("+", 1)[0] not in RESULT_BACKEND_SCHEMES:
        raise _Rejected("is not a result backend URL Celery knows")
    if scheme in _PRIVATE_RESULT_BACKENDS:
        raise _Rejected(f"{_PRIVATE_RESULT_BACKENDS[scheme]}, while `task status` and the web service read "
                        "from other processes")
    if scheme not in ("redis", "rediss"):
        return raw
    parts = _url_parts(raw)
    if not parts.hostname:
        raise _Rejected("names no host")
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise _Rejected(f"names database {database!r}; the path is a database number (/0)")
    if scheme == "rediss":
        query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
        if query.get("ssl_cert_reqs", "").lower() not in _REDIS_CERT_REQS:
            raise _Rejected("is a rediss:// URL without ?ssl_cert_reqs=required (or optional, none), "
                            "which Celery requires")
    return raw


def _parse_timezone(raw: str) -> str:
    try:
        ZoneInfo(raw)
    except (ZoneInfoNotFoundError, ValueError):
        raise _Rejected("is not a time zone this machine knows (tzdata)") from None
    return raw


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _parse_header(setting: Setting, raw: str) -> str:
    if raw and not _HEADER_NAME.match(raw):
        raise _Rejected("is not an HTTP header name")
    return raw


def _parse_addresses(setting: Setting, raw: str) -> str:
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        try:
            ipaddress.ip_address(item)
        except ValueError:
            raise _Rejected(f"holds {item!r}, which is no IP address") from None
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
    HTTP_URL: _parse_http_url,
    NAME: _parse_name,
    RESULT_BACKEND_URL: _parse_result_backend,
    OPTIONAL_HTTP_URL: lambda setting, raw: _parse_http_url(setting, raw) if raw else raw,
    HEADER: _parse_header,
    ADDRESSES: _parse_addresses,
}


def _shown(setting: Setting, raw: str) -> str:
    """The value as an error message shows it: quoted, one line, secrets hidden, not too long."""
    if setting.kind in (BROKER_URL, RESULT_BACKEND_URL):
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


def read_secret(path: str | Path, *, unreadable: str, empty: str, missing: str | None = None) -> str:
    """The text of a password file without surrounding whitespace (a trailing newline).

    Raises ConfigError with ``unreadable`` (its ``{error}`` replaced by why), with
    ``missing`` (when given) for a file that does not exist, or with ``empty``.
    """
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError as exc:
        if missing is not None:
            raise ConfigError(missing) from None
        raise ConfigError(unreadable.replace("{error}", str(exc.strerror))) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(unreadable.replace("{error}", str(getattr(exc, "strerror", None) or exc))) from None
    if not text:
        raise ConfigError(empty)
    return text


def redact_url(url: str) -> str:
    """Hide the password of a URL (of each node's, in a ``;`` list) for messages and logs."""
    if ";" in url:
        return ";".join(redact_url(part) for part in url.split(";"))
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user, has_password, _ = creds.partition(":")
    return f"{scheme}://{user}:***@{host}" if has_password else url


def redact_dsn(dsn: str) -> str:
    """Hide the key of a Sentry DSN for messages and logs."""
    if "://" not in dsn or "@" not in dsn:
        return dsn
    return dsn.split("://", 1)[0] + "://***@" + dsn.rsplit("@", 1)[1]
