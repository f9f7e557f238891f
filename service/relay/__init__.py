"""The chat-bot relay: Alertmanager's webhook in, WeCom, DingTalk and Feishu group-bot messages out.

Alertmanager 0.25 has no DingTalk or Feishu receiver and its ``wechat_configs``
speak to WeCom's application API, not to group bots; and it has no ``url_file``
for webhooks, so a bot's secret URL cannot live in alertmanager.yml. The relay
(``python -m service alert-relay``) takes Alertmanager's webhook (bearer token
checked in constant time), renders each notification group in the chat's own
format and posts it to every bot whose route matches, signed where the platform
signs, with retries, a per-bot rate limit and batching.

What lives here: ``config`` (deploy/alertmanager/relay.yml and each bot's secret
file), ``signing`` (DingTalk's and Feishu's signatures), ``render`` (one function
per platform: notification groups -> that platform's JSON, within its length
limit), ``delivery`` (posting with retries and backoff; per-bot rate limiter
and batcher; the relay's metrics), ``app`` (the FastAPI application) and
``server`` (``serve``).

May import: ``service.settings``, ``service.errors`` and ``service.web.server``
(its ``bind``/``run``/``url``); never the worker, the client or the broker code.
"""

from __future__ import annotations

from service.relay.config import Bot, RelayConfig, RelayConfigError, load_config
from service.relay.server import serve

__all__ = ["Bot", "RelayConfig", "RelayConfigError", "load_config", "serve"]
