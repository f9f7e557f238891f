"""POST a JSON event to a webhook URL (stdlib urllib, timeout KIT_WEBHOOK_TIMEOUT).

Each delivery carries ``X-Webhook-Id`` (the task id, the same on every attempt)
so receivers can drop duplicates, and, when KIT_WEBHOOK_SECRET_FILE names a
readable file, ``X-Signature-SHA256``: the hex HMAC-SHA256 of the body keyed
with that file's content (surrounding whitespace stripped).

2xx is success. 408, 429, 5xx, timeouts and connection errors are retried;
a Retry-After on 429/503 sets the delay. Any other answer (4xx, and 3xx:
redirects are not followed, since urllib would turn the POST into a GET) and
a URL that is not http(s) raise PermanentError.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import urllib.error
import urllib.request
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

from celery import Task

from service.app import app
from service.errors import PermanentError
from service.settings import load

logger = logging.getLogger(__name__)

USER_AGENT = "celery-rabbitmq-kit-webhooks/0.1"
#: Statuses worth another attempt, besides every 5xx.
RETRYABLE_STATUSES = frozenset({408, 429})
#: Statuses whose Retry-After header is honoured.
RETRY_AFTER_STATUSES = frozenset({429, 503})
_MAX_ERROR_BODY = 200


class WebhookUnavailable(Exception):
    """The receiver answered with a status worth retrying (5xx, 408, 429).

    Raised instead of urllib's HTTPError, which cannot be pickled from the
    worker's pool process (Celery would report it as a bare ``OSError()``).
    """


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201 - urllib's signature
        return None  # 3xx then surfaces as an HTTPError


_OPENER = urllib.request.build_opener(_NoRedirect)


def _check_url(url: Any) -> str:
    if not isinstance(url, str):
        raise PermanentError(f"webhook url must be a string, got {type(url).__name__}")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise PermanentError(f"webhook url {url!r} is not an http:// or https:// URL")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise PermanentError(f"webhook url {url!r} has an invalid port: {exc}") from None
    if any(c in url for c in "\r\n\t "):
        raise PermanentError(f"webhook url {url!r} contains whitespace")
    return url


def _secret(path: str) -> bytes | None:
    """The signing key, or None when no secret file is configured or it cannot be read."""
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
    except OSError as exc:
        logger.warning("KIT_WEBHOOK_SECRET_FILE=%s cannot be read (%s): sending unsigned", path, exc)
        return None
    if not key:
        logger.warning("KIT_WEBHOOK_SECRET_FILE=%s is empty: sending unsigned", path)
        return None
    return key


def sign(key: bytes, body: bytes) -> str:
    """The ``X-Signature-SHA256`` value of ``body``: hex HMAC-SHA256."""
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def _retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), None if absent or unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return seconds if seconds > 0 else None


def _error_body(exc: urllib.error.HTTPError) -> str:
    try:
        raw = exc.read(_MAX_ERROR_BODY)
    except Exception:  # noqa: BLE001 - the body is only decoration for the message
        return ""
    text = " ".join(raw.decode("utf-8", "replace").split())
    return f": {text}" if text else ""


@app.task(name="webhooks.deliver", bind=True)
def deliver(self: Task, url: str, payload: dict[str, Any], event: str = "") -> int:
    """POST ``payload`` as JSON to ``url`` and return the receiver's 2xx status.

    Promises: headers Content-Type, User-Agent, X-Webhook-Id (the task id, the
    same on every attempt), X-Webhook-Event (when ``event`` is given) and, if a
    secret is configured, X-Signature-SHA256. Retried: 5xx, 408, 429, timeouts,
    connection errors (Retry-After on 429/503 sets the delay). PermanentError:
    any other status, a non-http(s) URL, a payload that is not a JSON object.
    """
    settings = load()
    url = _check_url(url)
    if not isinstance(payload, dict):
        raise PermanentError(f"webhook payload must be a JSON object (dict), got {type(payload).__name__}")
    if not isinstance(event, str) or any(c in event for c in "\r\n"):
        raise PermanentError(f"webhook event must be a one-line string, got {event!r}")
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    headers = {
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": USER_AGENT,
        "X-Webhook-Id": self.request.id or "",
    }
    if event:
        headers["X-Webhook-Event"] = event
    key = _secret(settings.webhook_secret_file)
    if key is not None:
        headers["X-Signature-SHA256"] = sign(key, body)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=settings.webhook_timeout) as response:
            response.read(64 * 1024)  # let the receiver finish its answer; the body is not used
            return int(response.status)
    except urllib.error.HTTPError as exc:
        status = exc.code
        detail = f"webhook {url} answered HTTP {status} {exc.reason}{_error_body(exc)}"
        exc.close()
        if status >= 500 or status in RETRYABLE_STATUSES:
            error = WebhookUnavailable(detail)
            delay = _retry_after_seconds(exc.headers.get("Retry-After")) if status in RETRY_AFTER_STATUSES else None
            if delay is not None:
                raise self.retry(countdown=delay, exc=error) from None
            raise error from None
        raise PermanentError(detail) from None
    except urllib.error.URLError as exc:
        # Connection refused/reset, DNS failure, connect timeout: retried.
        if isinstance(exc.reason, TimeoutError):
            raise TimeoutError(f"webhook {url} did not answer within {settings.webhook_timeout:g}s") from None
        raise ConnectionError(f"webhook {url} unreachable: {exc.reason}") from None
    except TimeoutError:
        raise TimeoutError(f"webhook {url} did not answer within {settings.webhook_timeout:g}s") from None
