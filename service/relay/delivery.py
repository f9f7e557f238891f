"""Posting rendered messages to the bots: retries with backoff, a rate limit and batching per bot, metrics.

Each bot has one :class:`BotSender`: notifications for it queue up, and one loop
per bot sends them. While a send is under way, or the bot's rate limit
(RATE_LIMITS: DingTalk and WeCom allow 20 messages a minute per bot) holds the
next one back, the notifications that arrive meanwhile are merged into one
message: a storm of alerts becomes a few messages instead of refused ones.

A failed post (a network error, a timeout, an HTTP error status, or an answer
whose ``errcode``/``code`` is not 0, which is how the platforms refuse) is
retried with exponential backoff until the notification's deadline
(KIT_ALERT_RELAY_DEADLINE). The caller then learns whether it was delivered;
the app answers Alertmanager 503 when it was not, so Alertmanager retries.
A notification already delivered to a bot (same group, same alerts and states)
is not sent to it again: Alertmanager's retry of a half-failed notification
reaches only the bots that failed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

import httpx
from prometheus_client import CollectorRegistry, Counter, Histogram

from service.relay import render, signing
from service.relay.config import Bot

log = logging.getLogger(__name__)

#: Messages per minute each platform accepts from one bot (WeCom and DingTalk: 20; Feishu: 100, and 5 a second).
RATE_LIMITS: dict[str, tuple[int, float]] = {"wecom": (20, 0.0), "dingtalk": (20, 0.0), "feishu": (100, 0.2)}
#: First retry pause, in seconds; doubled after each failure up to BACKOFF_MAX_S.
BACKOFF_FIRST_S = 0.25
BACKOFF_MAX_S = 8.0
#: How long a delivered notification is remembered, so Alertmanager's retry does not repeat it.
REMEMBER_S = 3600.0
#: Outcomes counted in kit_alert_relay_deliveries_total.
OUTCOMES = ("delivered", "failed", "duplicate")


class Metrics:
    """The relay's own metrics, in a registry of its own (served at /metrics)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.deliveries = Counter("kit_alert_relay_deliveries_total",
                                  "Notifications the relay handed to a bot, by bot, platform and outcome "
                                  "(delivered, failed: given up at the deadline, duplicate: already delivered).",
                                  ["bot", "kind", "outcome"], registry=self.registry)
        self.attempts = Counter("kit_alert_relay_attempts_total",
                                "HTTP posts to the bots by bot and result (ok, error).",
                                ["bot", "result"], registry=self.registry)
        self.messages = Counter("kit_alert_relay_messages_total",
                                "Messages posted successfully, by bot (batches count once).",
                                ["bot"], registry=self.registry)
        self.notifications = Counter("kit_alert_relay_notifications_total",
                                     "Webhook calls from Alertmanager by result (ok, failed, unauthorized, invalid).",
                                     ["result"], registry=self.registry)
        self.latency = Histogram("kit_alert_relay_delivery_seconds",
                                 "Seconds from a notification's arrival to its delivery, by bot.",
                                 ["bot"], registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))

    def prime(self, bots: Sequence[Bot]) -> None:
        """Every bot's series at 0, so `increase()` sees the first failure."""
        for bot in bots:
            for outcome in OUTCOMES:
                self.deliveries.labels(bot.name, bot.kind, outcome)
            for result in ("ok", "error"):
                self.attempts.labels(bot.name, result)


def notification_key(payload: Mapping[str, Any]) -> str:
    """What identifies one notification: its group and each alert's fingerprint, state and times."""
    alerts = sorted((a.get("fingerprint", ""), a.get("status", ""), a.get("startsAt", ""), a.get("endsAt", ""))
                    for a in payload.get("alerts", []))
    raw = json.dumps([payload.get("groupKey", ""), payload.get("status", ""), alerts])
    return hashlib.sha256(raw.encode()).hexdigest()


def refusal(kind: str, response: httpx.Response) -> str | None:
    """Why the platform refused the post (None: accepted). They answer 200 with a non-zero code when they refuse."""
    if response.status_code >= 300:
        return f"HTTP {response.status_code}"
    try:
        body = response.json()
    except ValueError:
        return None if kind == "wecom" and not response.content else f"answer is not JSON: {response.text[:100]!r}"
    if not isinstance(body, dict):
        return f"unexpected answer {str(body)[:100]!r}"
    code = body.get("errcode", body.get("code", body.get("StatusCode", 0)))
    if code not in (0, "0", None):
        message = body.get("errmsg", body.get("msg", body.get("StatusMessage", "")))
        return f"code {code}: {str(message)[:200]}"
    return None


@dataclass
class _Pending:
    payload: Mapping[str, Any]
    key: str
    deadline: float
    arrived: float
    done: asyncio.Future[bool] = field(repr=False)


class BotSender:
    """The queue, rate limit, batching and retries of one bot."""

    #: The rate limit's window, in seconds (the platforms count per minute).
    window_s = 60.0

    def __init__(self, bot: Bot, client: httpx.AsyncClient, zone: ZoneInfo, links: render.Links,
                 metrics: Metrics) -> None:
        self.bot = bot
        self.client = client
        self.zone = zone
        self.links = links
        self.metrics = metrics
        self.per_minute, self.spacing = RATE_LIMITS[bot.kind]
        self._sent: deque[float] = deque()  # monotonic times of the posts of the last minute
        self._pending: list[_Pending] = []
        self._inflight: dict[str, _Pending] = {}
        self._delivered: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"relay-{self.bot.name}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def submit(self, payload: Mapping[str, Any], deadline: float) -> asyncio.Future[bool] | None:
        """Queue a notification; its future says whether it was delivered. None: already delivered before."""
        key = notification_key(payload)
        now = time.monotonic()
        self._delivered = {k: t for k, t in self._delivered.items() if now - t < REMEMBER_S}
        if key in self._delivered:
            self.metrics.deliveries.labels(self.bot.name, self.bot.kind, "duplicate").inc()
            return None
        if key in self._inflight:  # Alertmanager retried while the first attempt is still being sent
            self._inflight[key].deadline = max(self._inflight[key].deadline, deadline)
            return self._inflight[key].done
        pending = _Pending(payload, key, deadline, now, asyncio.get_running_loop().create_future())
        self._inflight[key] = pending
        self._pending.append(pending)
        self._wake.set()
        return pending.done

    async def _slot(self) -> None:
        """Wait until the rate limit allows one more post."""
        while True:
            now = time.monotonic()
            while self._sent and now - self._sent[0] >= self.window_s:
                self._sent.popleft()
            waits = []
            if len(self._sent) >= self.per_minute:
                waits.append(self.window_s - (now - self._sent[0]))
            if self._sent and self.spacing:
                waits.append(self.spacing - (now - self._sent[-1]))
            wait = max([0.0, *waits])
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                await self._slot()
                batch, self._pending = self._pending, []
                try:
                    ok = await self._deliver(batch)
                except Exception:  # noqa: BLE001 - a bug must not stop the bot's loop
                    log.exception("alert relay: bot %s: delivery failed", self.bot.name)
                    ok = False
                self._finish(batch, ok)

    def _finish(self, batch: Sequence[_Pending], ok: bool) -> None:
        now = time.monotonic()
        for pending in batch:
            self._inflight.pop(pending.key, None)
            outcome = "delivered" if ok else "failed"
            self.metrics.deliveries.labels(self.bot.name, self.bot.kind, outcome).inc()
            if ok:
                self._delivered[pending.key] = now
                self.metrics.latency.labels(self.bot.name).observe(now - pending.arrived)
            if not pending.done.done():
                pending.done.set_result(ok)

    async def _deliver(self, batch: Sequence[_Pending]) -> bool:
        """Render the batch and post each message, retrying until the latest deadline of the batch."""
        messages = render.RENDERERS[self.bot.kind]([p.payload for p in batch], self.zone, self.links)
        deadline = max(p.deadline for p in batch)
        for i, message in enumerate(messages):
            if i:
                await self._slot()
            if not await self._post_with_retries(message, deadline):
                return False
        if len(batch) > 1:
            log.info("alert relay: bot %s: %d notifications sent as %d message(s)", self.bot.name, len(batch),
                     len(messages))
        return True

    async def _post_with_retries(self, message: dict[str, Any], deadline: float) -> bool:
        pause = BACKOFF_FIRST_S
        while True:
            self._sent.append(time.monotonic())
            why = await self._post(message)
            if why is None:
                self.metrics.attempts.labels(self.bot.name, "ok").inc()
                self.metrics.messages.labels(self.bot.name).inc()
                return True
            self.metrics.attempts.labels(self.bot.name, "error").inc()
            left = deadline - time.monotonic()
            if left <= pause:
                log.warning("alert relay: bot %s (%s): giving up: %s", self.bot.name, self.bot.kind, why)
                return False
            log.warning("alert relay: bot %s (%s): %s; retrying in %.2fs", self.bot.name, self.bot.kind, why, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, BACKOFF_MAX_S)

    async def _post(self, message: dict[str, Any]) -> str | None:
        """One signed post; None when the platform accepted it, else why not (never the URL: it holds the key)."""
        url, body = self.bot.url, dict(message)
        if self.bot.kind == "dingtalk":
            url = signing.dingtalk_url(url, self.bot.secret)
        elif self.bot.kind == "feishu":
            body.update(signing.feishu_fields(self.bot.secret))
        data = json.dumps(body, ensure_ascii=False).encode()
        try:
            response = await self.client.post(url, content=data,
                                              headers={"Content-Type": "application/json; charset=utf-8"})
        except httpx.TimeoutException:
            return "no answer in time"
        except httpx.HTTPError as exc:
            return f"cannot connect ({type(exc).__name__})"
        return refusal(self.bot.kind, response)
