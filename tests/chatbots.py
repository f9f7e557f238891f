"""Loopback fakes of WeCom group bots, DingTalk custom robots and Feishu custom bots.

Each fake is a stdlib HTTP server in a thread that checks a post the way its
platform does (the key or access token in the URL, the signature, the message
type and its length limit) and answers in the platform's own way: 200 with
``errcode``/``code`` 0 when accepted, 200 with the platform's error code when
refused. Accepted messages are recorded with their arrival time; ``fail(n)``
makes the next n posts fail (HTTP 500), ``fail_for(seconds)`` fails every post
for a while (both only posts containing a given text, when one is given).
The signatures are checked with the platforms' documented example code
(tests/test_relay_units.py pins it to fixed values), not with the relay's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def dingtalk_documented_sign(timestamp: str, secret: str) -> str:
    """DingTalk's documented Python example ("加签"), as published."""
    secret_enc = secret.encode("utf-8")
    string_to_sign = "{}\n{}".format(timestamp, secret)  # noqa: UP032 - as the documentation writes it
    string_to_sign_enc = string_to_sign.encode("utf-8")
    hmac_code = hmac.new(secret_enc, string_to_sign_enc, digestmod=hashlib.sha256).digest()
    return urllib.parse.quote_plus(base64.b64encode(hmac_code))


def feishu_documented_sign(timestamp: str, secret: str) -> str:
    """Feishu's documented Python example (签名校验), as published."""
    key = f"{timestamp}\n{secret}"
    key_enc = key.encode("utf-8")
    msg = ""
    msg_enc = msg.encode("utf-8")
    hmac_code = hmac.new(key_enc, msg_enc, digestmod=hashlib.sha256).digest()
    return base64.b64encode(hmac_code).decode("utf-8")


@dataclass
class Received:
    """One accepted message."""

    at: float  # time.monotonic()
    body: dict[str, Any]

    @property
    def text(self) -> str:
        """The message's text, whatever the platform."""
        markdown = self.body.get("markdown")
        if markdown is not None:  # WeCom bot and app: content; DingTalk: title and text
            return "\n".join(str(markdown.get(k, "")) for k in ("title", "content", "text"))
        card = self.body.get("card", {})  # Feishu: an interactive card
        parts = [card.get("header", {}).get("title", {}).get("content", "")]
        return "\n".join(parts + [e.get("content", "") for e in card.get("elements", [])])


class FakeBot:
    """One fake bot of ``kind`` (wecom, dingtalk, feishu) with its token and, for DingTalk/Feishu, its secret."""

    LIMITS = {"wecom": 4096}

    def __init__(self, kind: str, token: str, secret: str = "") -> None:
        self.kind, self.token, self.secret = kind, token, secret
        self.received: list[Received] = []
        self.refused: list[str] = []
        self.posts = 0
        self.failed_posts = 0
        self._fail_next = 0
        self._fail_until = 0.0
        self._fail_match = ""
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, answer = fake.handle(self.path, raw)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.url = {
            "wecom": f"{base}/cgi-bin/webhook/send?key={token}",
            "dingtalk": f"{base}/robot/send?access_token={token}",
            "feishu": f"{base}/open-apis/bot/v2/hook/{token}",
        }[kind]
        self.thread = threading.Thread(target=self.server.serve_forever, name=f"fake-{kind}", daemon=True)
        self.thread.start()

    # -- failure injection --------------------------------------------------

    def fail(self, times: int, containing: str = "") -> None:
        """Answer HTTP 500 to the next ``times`` posts (whose body contains ``containing``)."""
        with self._lock:
            self._fail_next, self._fail_match = times, containing

    def fail_for(self, seconds: float, containing: str = "") -> None:
        """Answer HTTP 500 to every post (whose body contains ``containing``) for ``seconds``."""
        with self._lock:
            self._fail_until, self._fail_match = time.monotonic() + seconds, containing

    # -- what it got ----------------------------------------------------------

    def messages(self, containing: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if containing in r.text]

    def secret_file_text(self) -> str:
        """What the operator writes into the bot's secret file."""
        return self.url + "\n" + (self.secret + "\n" if self.secret else "")

    # -- the platform's checks -------------------------------------------------

    def _refuse(self, why: str, answer: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.refused.append(why)
        return 200, answer

    def handle(self, path: str, raw: bytes) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.posts += 1
            targeted = self._fail_match.encode() in raw
            if targeted and (self._fail_next > 0 or time.monotonic() < self._fail_until):
                self._fail_next = max(0, self._fail_next - 1)
                self.failed_posts += 1
                return 500, {"error": "injected failure"}
        parts = urllib.parse.urlsplit(path)
        query = dict(urllib.parse.parse_qsl(parts.query))
        try:
            body = json.loads(raw.decode("utf-8"))
        except ValueError:
            return 400, {"errcode": 40001, "errmsg": "invalid json"}
        check = getattr(self, f"_check_{self.kind}")
        result = check(parts.path, query, body)
        if result is not None:
            return result
        with self._lock:
            self.received.append(Received(time.monotonic(), body))
        return 200, ({"code": 0, "msg": "success", "data": {}} if self.kind == "feishu"
                     else {"errcode": 0, "errmsg": "ok"})

    def _check_wecom(self, path: str, query: dict[str, str], body: dict[str, Any]) -> tuple[int, dict] | None:
        if path != "/cgi-bin/webhook/send" or query.get("key") != self.token:
            return self._refuse("key", {"errcode": 93000, "errmsg": "invalid webhook url"})
        content = (body.get("markdown") or {}).get("content")
        if body.get("msgtype") != "markdown" or not isinstance(content, str):
            return self._refuse("format", {"errcode": 40008, "errmsg": "invalid message type"})
        if len(content.encode()) > 4096:
            return self._refuse("length", {"errcode": 40058, "errmsg": "markdown.content exceed max length 4096"})
        return None

    def _check_dingtalk(self, path: str, query: dict[str, str], body: dict[str, Any]) -> tuple[int, dict] | None:
        if path != "/robot/send" or query.get("access_token") != self.token:
            return self._refuse("token", {"errcode": 300001, "errmsg": "token is not exist"})
        timestamp, sign = query.get("timestamp", ""), query.get("sign", "")
        # parse_qsl decoded the sign once; the documented example gives it URL-encoded.
        if (not timestamp.isdigit() or abs(int(timestamp) / 1000 - time.time()) > 3600
                or urllib.parse.quote_plus(sign) != dingtalk_documented_sign(timestamp, self.secret)):
            return self._refuse("sign", {"errcode": 310000, "errmsg": "sign not match"})
        markdown = body.get("markdown") or {}
        if body.get("msgtype") != "markdown" or not markdown.get("title") or not markdown.get("text"):
            return self._refuse("format", {"errcode": 40035, "errmsg": "missing markdown title or text"})
        return None

    def _check_feishu(self, path: str, query: dict[str, str], body: dict[str, Any]) -> tuple[int, dict] | None:
        if path != f"/open-apis/bot/v2/hook/{self.token}":
            return self._refuse("token", {"code": 19001, "msg": "param invalid: incoming webhook access token invalid"})
        timestamp, sign = str(body.get("timestamp", "")), body.get("sign", "")
        if (not timestamp.isdigit() or abs(int(timestamp) - time.time()) > 3600
                or sign != feishu_documented_sign(timestamp, self.secret)):
            return self._refuse("sign", {"code": 19021, "msg": "sign match fail or timestamp is not within one hour"})
        card = body.get("card") or {}
        if body.get("msg_type") != "interactive" or not card.get("elements"):
            return self._refuse("format", {"code": 9499, "msg": "Bad Request"})
        if len(json.dumps(body, ensure_ascii=False).encode()) > 20 * 1024:
            return self._refuse("length", {"code": 9499, "msg": "request body too large"})
        return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class FakeWecomApp:
    """WeCom's application-message API as Alertmanager's wechat_configs use it.

    ``GET /cgi-bin/gettoken?corpid=&corpsecret=`` gives an access token for the
    right corp id and secret only; ``POST /cgi-bin/message/send?access_token=``
    takes the message for the right token and records it.
    """

    def __init__(self, corp_id: str, secret: str) -> None:
        self.corp_id, self.secret = corp_id, secret
        self.access_token = "tok-" + base64.b32encode(secret.encode()).decode()[:16]
        self.received: list[Received] = []
        self.refused: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, answer: dict[str, Any]) -> None:
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                parts = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(parts.query))
                if (parts.path != "/cgi-bin/gettoken" or query.get("corpid") != fake.corp_id
                        or query.get("corpsecret") != fake.secret):
                    fake.refused.append("gettoken")
                    self._answer({"errcode": 40001, "errmsg": "invalid credential"})
                    return
                self._answer({"errcode": 0, "errmsg": "ok", "access_token": fake.access_token, "expires_in": 7200})

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                parts = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(parts.query))
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                if parts.path != "/cgi-bin/message/send" or query.get("access_token") != fake.access_token:
                    fake.refused.append("send")
                    self._answer({"errcode": 40014, "errmsg": "invalid access_token"})
                    return
                fake.received.append(Received(time.monotonic(), body))
                self._answer({"errcode": 0, "errmsg": "ok", "invaliduser": ""})

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.api_url = f"http://127.0.0.1:{self.server.server_address[1]}/cgi-bin/"
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-wecom-app", daemon=True)
        self.thread.start()

    def messages(self, containing: str) -> list[Received]:
        return [r for r in self.received if containing in r.text]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
