"""The relay's FastAPI application: POST /alertmanager, GET /healthz, GET /metrics.

``POST /alertmanager`` takes Alertmanager's webhook payload (version 4) with
``Authorization: Bearer <token>``, compared in constant time with the token
file's; a wrong or missing token is 401, a body that is not a notification 400.
It hands the group to every bot that wants at least one of its alerts (only
those alerts), waits for each delivery up to KIT_ALERT_RELAY_DEADLINE, and
answers 200 when every bot got it, 503 (naming the bots) when one did not:
Alertmanager then retries, and the bots that already have it are not sent it
again. ``/healthz`` and ``/metrics`` need no token.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.relay.config import Bot, RelayConfig
from service.relay.delivery import BotSender, Metrics
from service.relay.render import Links

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelayOptions:
    """What the app needs besides its bots."""

    token: str
    zone: ZoneInfo
    links: Links
    timeout: float  # seconds per post
    deadline: float  # seconds per notification


def _valid(payload: Any) -> bool:
    return (isinstance(payload, dict) and isinstance(payload.get("alerts"), list)
            and all(isinstance(a, dict) and isinstance(a.get("labels", {}), dict) for a in payload["alerts"]))


def _only(payload: Mapping[str, Any], bot: Bot) -> dict[str, Any] | None:
    """The payload with only the alerts ``bot`` wants (None when it wants none)."""
    alerts = [a for a in payload["alerts"] if bot.wants(a.get("labels") or {})]
    if not alerts:
        return None
    if len(alerts) == len(payload["alerts"]):
        return dict(payload)
    return {**payload, "alerts": alerts,
            "status": "firing" if any(a.get("status") == "firing" for a in alerts) else "resolved"}


def create_app(config: RelayConfig, options: RelayOptions) -> FastAPI:
    """The relay for ``config``'s bots."""
    metrics = Metrics()
    metrics.prime(config.bots)
    senders: dict[str, BotSender] = {}
    expected = f"Bearer {options.token}".encode()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # trust_env: HTTPS_PROXY and NO_PROXY of the environment apply (the platforms are outside; proxies are common).
        async with httpx.AsyncClient(timeout=options.timeout, follow_redirects=False, trust_env=True) as client:
            for bot in config.bots:
                senders[bot.name] = BotSender(bot, client, options.zone, options.links, metrics)
                senders[bot.name].start()
            yield
            for sender in senders.values():
                await sender.stop()

    app = FastAPI(title="Kit alert relay", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.post("/alertmanager")
    async def alertmanager(request: Request) -> Response:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            metrics.notifications.labels("unauthorized").inc()
            return JSONResponse({"error": "wrong or missing bearer token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        try:
            payload = await request.json()
        except ValueError:
            payload = None
        if not _valid(payload):
            metrics.notifications.labels("invalid").inc()
            return JSONResponse({"error": "not an Alertmanager webhook payload (version 4)"}, status_code=400)
        deadline = time.monotonic() + options.deadline
        waiting: dict[str, asyncio.Future[bool]] = {}
        duplicates = []
        for bot in config.bots:
            part = _only(payload, bot)
            if part is None:
                continue
            future = senders[bot.name].submit(part, deadline)
            if future is None:
                duplicates.append(bot.name)
            else:
                waiting[bot.name] = future
        results = {}
        for name, future in waiting.items():
            try:
                results[name] = await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                results[name] = False
        failed = sorted(name for name, ok in results.items() if not ok)
        delivered = sorted(name for name, ok in results.items() if ok)
        if failed:
            metrics.notifications.labels("failed").inc()
            log.warning("alert relay: %s not delivered to %s; Alertmanager will retry",
                        payload.get("groupKey", "a group"), ", ".join(failed))
            return JSONResponse({"failed": failed, "delivered": delivered, "already": duplicates}, status_code=503)
        metrics.notifications.labels("ok").inc()
        return JSONResponse({"delivered": delivered, "already": duplicates})

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"status": "ok", "bots": [b.name for b in config.bots], "skipped": list(config.skipped)})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
