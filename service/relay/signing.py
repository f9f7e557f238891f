"""The signatures of DingTalk's and Feishu's custom bots ("加签" / signature verification).

Both are HMAC-SHA256 over ``timestamp + "\\n" + secret``, but differently:

- DingTalk: key = the secret (``SEC…``), message = ``f"{timestamp}\\n{secret}"``,
  timestamp in MILLISECONDS; the Base64 digest is URL-encoded and sent as the
  ``timestamp`` and ``sign`` query parameters. DingTalk refuses a timestamp more
  than an hour off.
- Feishu/Lark: key = ``f"{timestamp}\\n{secret}"``, message = empty, timestamp in
  SECONDS; the Base64 digest goes in the JSON body as ``timestamp`` (a string)
  and ``sign``. Also one hour of tolerance.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from urllib.parse import quote_plus


def dingtalk_sign(secret: str, timestamp_ms: int) -> str:
    """DingTalk's ``sign`` for ``timestamp_ms``, URL-encoded as the query parameter wants it."""
    digest = hmac.new(secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256).digest()
    return quote_plus(base64.b64encode(digest))


def dingtalk_url(url: str, secret: str, now: float | None = None) -> str:
    """``url`` with ``timestamp`` and ``sign`` appended (unchanged when ``secret`` is empty: signing off)."""
    if not secret:
        return url
    timestamp_ms = int((time.time() if now is None else now) * 1000)
    return f"{url}{'&' if '?' in url else '?'}timestamp={timestamp_ms}&sign={dingtalk_sign(secret, timestamp_ms)}"


def feishu_sign(secret: str, timestamp_s: int) -> str:
    """Feishu's ``sign`` for ``timestamp_s``: HMAC-SHA256 keyed with ``timestamp\\nsecret`` over nothing, Base64."""
    digest = hmac.new(f"{timestamp_s}\n{secret}".encode(), b"", hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def feishu_fields(secret: str, now: float | None = None) -> dict[str, str]:
    """The ``timestamp`` and ``sign`` body fields (empty when ``secret`` is empty: signing off)."""
    if not secret:
        return {}
    timestamp_s = int(time.time() if now is None else now)
    return {"timestamp": str(timestamp_s), "sign": feishu_sign(secret, timestamp_s)}
