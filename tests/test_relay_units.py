"""The relay's pure logic: signatures against the platforms' documented examples, rendering, config parsing.

The end-to-end path (real Prometheus, Alertmanager, relay and fake bots) is
tests/test_alert_relay.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from service.relay import config as relay_config
from service.relay import render, signing
from service.relay.delivery import notification_key
from tests.chatbots import dingtalk_documented_sign, feishu_documented_sign
from tests.helpers import REPO

SHANGHAI = ZoneInfo("Asia/Shanghai")
#: The secret of both platforms' documented examples ('this is secret').
DOC_SECRET = "this is secret"


# --------------------------------------------------------------------------- signatures


def test_dingtalk_sign_matches_the_documented_example_and_openssl() -> None:
    """DingTalk's documented example: HMAC-SHA256 keyed with the secret over "timestamp\\nsecret", Base64,
    URL-encoded; timestamp in milliseconds. The fixed value was computed with
    `printf '1700000000000\\nthis is secret' | openssl dgst -sha256 -hmac 'this is secret' -binary | base64`."""
    assert dingtalk_documented_sign("1700000000000", DOC_SECRET) == "sSFWELbV2YwjdDQhWZwTcWlX5BWUx5J6TPpsZmuPii0%3D"
    assert signing.dingtalk_sign(DOC_SECRET, 1700000000000) == "sSFWELbV2YwjdDQhWZwTcWlX5BWUx5J6TPpsZmuPii0%3D"
    for ts in (1, 1577262236757, 1999999999999):
        for secret in ("SEC" + "a" * 64, DOC_SECRET, "SEC+/=&?"):
            assert signing.dingtalk_sign(secret, ts) == dingtalk_documented_sign(str(ts), secret)


def test_dingtalk_url_carries_timestamp_and_sign_and_stays_unsigned_without_a_secret() -> None:
    url = "https://oapi.dingtalk.com/robot/send?access_token=T"
    signed = signing.dingtalk_url(url, DOC_SECRET, now=1700000000.0)
    assert signed == url + "&timestamp=1700000000000&sign=sSFWELbV2YwjdDQhWZwTcWlX5BWUx5J6TPpsZmuPii0%3D"
    assert signing.dingtalk_url(url, "", now=1700000000.0) == url


def test_feishu_sign_matches_the_documented_example_and_openssl() -> None:
    """Feishu's documented example: HMAC-SHA256 keyed with "timestamp\\nsecret" over an empty message, Base64;
    timestamp in seconds. Fixed value from
    `printf '' | openssl dgst -sha256 -hmac "$(printf '1700000000\\nthis is secret')" -binary | base64`."""
    assert feishu_documented_sign("1700000000", DOC_SECRET) == "OfGzRzoUICBOoc8wVra1e4A1hPfbZ9zqXozA8CWVUuY="
    assert signing.feishu_sign(DOC_SECRET, 1700000000) == "OfGzRzoUICBOoc8wVra1e4A1hPfbZ9zqXozA8CWVUuY="
    for ts in (1, 1599360473, 1999999999):
        assert signing.feishu_sign("k" * 20, ts) == feishu_documented_sign(str(ts), "k" * 20)
    assert signing.feishu_fields(DOC_SECRET, now=1700000000.9) == {
        "timestamp": "1700000000", "sign": "OfGzRzoUICBOoc8wVra1e4A1hPfbZ9zqXozA8CWVUuY="}
    assert signing.feishu_fields("", now=1.0) == {}


# --------------------------------------------------------------------------- rendering


def _alert(name: str, status: str = "firing", **extra: str) -> dict:
    labels = {"alertname": name, "severity": "warning", "queue": "bulk"}
    return {
        "status": status, "labels": labels, "fingerprint": f"fp-{name}",
        "annotations": {"summary": f"{name} summary", "description": f"{name} description",
                        "runbook_url": f"https://runbooks.example/{name}", **extra},
        "startsAt": "2026-12-01T10:00:05.123456789Z",
        "endsAt": "2026-12-01T10:30:00Z" if status == "resolved" else "0001-01-01T00:00:00Z",
    }


def _group(*alerts: dict, status: str = "firing") -> dict:
    name = alerts[0]["labels"]["alertname"]
    return {"version": "4", "status": status, "groupKey": f"{{}}:{{alertname=\"{name}\"}}", "alerts": list(alerts),
            "groupLabels": {"alertname": name, "queue": "bulk"},
            "commonLabels": {"alertname": name, "severity": "warning", "queue": "bulk"},
            "externalURL": "http://alertmanager.example"}


LINKS = render.Links(grafana_url="https://grafana.example/d/kit-celery-overview")


@pytest.mark.parametrize("kind", sorted(render.RENDERERS))
def test_every_platform_message_has_every_field(kind: str) -> None:
    console = "https://dlq.example/letters?queue=bulk.dead"
    (message,) = render.RENDERERS[kind]([_group(_alert("DeadLetterQueueGrowing", console=console))], SHANGHAI, LINKS)
    text = json.dumps(message, ensure_ascii=False)
    for expected in ("[FIRING:1] DeadLetterQueueGrowing queue=bulk (warning)", "**FIRING** DeadLetterQueueGrowing",
                     "severity **warning**", "queue **bulk**", "DeadLetterQueueGrowing summary",
                     "DeadLetterQueueGrowing description", "started 2026-12-01 18:00:05 CST",
                     "[Runbook](https://runbooks.example/DeadLetterQueueGrowing)",
                     "[Grafana](https://grafana.example/d/kit-celery-overview)", f"[Dead-letter console]({console})"):
        assert expected in text, (kind, expected, text)
    shape = {"wecom": {"msgtype", "markdown"}, "dingtalk": {"msgtype", "markdown"}, "feishu": {"msg_type", "card"}}
    assert set(message) == shape[kind]


def test_resolved_messages_say_so_with_both_times() -> None:
    (message,) = render.wecom([_group(_alert("X", "resolved"), status="resolved")], SHANGHAI)
    content = message["markdown"]["content"]
    assert content.startswith("### [RESOLVED] X queue=bulk (warning)")
    assert "**RESOLVED** X" in content and "resolved 2026-12-01 18:30:00 CST" in content
    assert "[Grafana]" not in content, "no Grafana link without KIT_ALERT_GRAFANA_URL"
    (card,) = render.feishu([_group(_alert("X", "resolved"), status="resolved")], SHANGHAI)
    assert card["card"]["header"]["template"] == "green"


@pytest.mark.parametrize(("kind", "limit"), [("wecom", 4096), ("dingtalk", render.DINGTALK_LIMIT_BYTES),
                                             ("feishu", render.FEISHU_LIMIT_BYTES)])
def test_long_groups_are_shortened_and_split_never_dropped(kind: str, limit: int) -> None:
    names = [f"Alert{i:03d}" for i in range(400)]
    alerts = [_alert(n, description="长" * 300) for n in names]
    messages = render.RENDERERS[kind]([_group(*alerts)], SHANGHAI, LINKS)
    texts = [json.dumps(m, ensure_ascii=False) for m in messages]
    bodies = [m["markdown"].get("content", m["markdown"].get("text")) if "markdown" in m
              else m["card"]["elements"][0]["content"] for m in messages]
    assert all(len(b.encode()) <= limit for b in bodies), [len(b.encode()) for b in bodies]
    assert all(f"**FIRING** {n} " in "".join(texts) or f"**FIRING** {n}\n" in "".join(bodies) for n in names)
    for body in bodies:  # an alert shortened to one line: the note says so
        assert ("· warning · bulk · started" in body) <= ("message limit" in body), body[-300:]
    assert len(bodies) > 1 and all(b.startswith("_(continued)_") for b in bodies[1:]), "split, and said so"
    if kind == "wecom":  # 4096 bytes hold three of these in full: the fourth is shortened, with the note
        assert sum("message limit" in b for b in bodies) >= len(bodies) - 1
    if kind == "feishu":
        assert all(len(t.encode()) < 20 * 1024 for t in texts)


def test_one_huge_alert_is_cut_with_a_mark() -> None:
    (message,) = render.wecom([_group(_alert("Huge", summary="x" * 10000, description="y" * 10000))], SHANGHAI)
    content = message["markdown"]["content"]
    assert len(content.encode()) <= 4096 and "**FIRING** Huge" in content


def test_batched_groups_render_as_one_message_with_a_title_for_each() -> None:
    (message,) = render.dingtalk([_group(_alert("A")), _group(_alert("B"))], SHANGHAI)
    assert message["markdown"]["title"].startswith("2 alert notifications: [FIRING:1] A")
    assert "### [FIRING:1] A" in message["markdown"]["text"] and "### [FIRING:1] B" in message["markdown"]["text"]


def test_notification_key_is_the_group_and_its_alert_states() -> None:
    firing = _group(_alert("A"))
    assert notification_key(firing) == notification_key(json.loads(json.dumps(firing)))
    assert notification_key(firing) != notification_key(_group(_alert("A", "resolved"), status="resolved"))


# --------------------------------------------------------------------------- the routing file


def test_the_committed_relay_config_parses_and_routes_by_labels() -> None:
    bots = {b.name: b for b in relay_config.parse_config((REPO / "deploy/alertmanager/relay.yml").read_text())}
    assert {b.kind for b in bots.values()} == {"wecom", "dingtalk", "feishu"}
    info, warning = {"severity": "info", "queue": "bulk"}, {"severity": "warning", "queue": "urgent"}
    assert [n for n, b in bots.items() if b.wants(info)] == ["ops-wecom"]
    assert all(b.wants(warning) for b in bots.values())
    assert [n for n, b in bots.items() if b.wants({"queue": "default"})] == ["ops-wecom", "team-feishu"]


@pytest.mark.parametrize(("text", "message"), [
    ("bots: {}", "one key, bots"),
    ("bots:\n  - {name: a, kind: slack, secret_file: f}", "kind must be one of wecom, dingtalk, feishu"),
    ("bots:\n  - {name: a, kind: wecom, secret_file: ../etc/passwd}", "secret_file must be a file name"),
    ("bots:\n  - {name: a, kind: wecom, secret_file: f, url: 'https://x'}", "unknown key(s) ['url']"),
    ("bots:\n  - {name: a, kind: wecom, secret_file: f, severities: critical}", "severities must be a non-empty list"),
    ("bots:\n  - {name: a, kind: wecom, secret_file: f}\n  - {name: a, kind: feishu, secret_file: g}", "twice"),
    ("bots: [", "not valid YAML"),
])
def test_a_bad_routing_file_is_one_line(text: str, message: str) -> None:
    with pytest.raises(relay_config.RelayConfigError) as info:
        relay_config.parse_config(text)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_secret_files_empty_ones_skipped_bad_ones_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    routing = tmp_path / "relay.yml"
    routing.write_text("bots:\n  - {name: w, kind: wecom, secret_file: w}\n  - {name: d, kind: dingtalk, "
                       "secret_file: d}\n  - {name: f, kind: feishu, secret_file: f}\n")
    (tmp_path / "w").write_text("")
    (tmp_path / "d").write_text("https://oapi.dingtalk.com/robot/send?access_token=T\nSECabc\n")
    with caplog.at_level(logging.WARNING):
        loaded = relay_config.load_config(routing, tmp_path)
    assert [b.name for b in loaded.bots] == ["d"] and loaded.skipped == ("w", "f")
    assert loaded.bots[0].secret == "SECabc" and "SECabc" not in repr(loaded.bots[0]), "never in a repr or log"
    assert "bot w skipped" in caplog.text and "bot f skipped" in caplog.text
    for kind, text, message in [("w", "https://qyapi.weixin.qq.com/cgi-bin/webhook/send\n", "key="),
                                ("d", "https://oapi.dingtalk.com/robot/send\n", "access_token="),
                                ("f", "https://open.feishu.cn/open-apis/bot/v2/other\n", "/hook/"),
                                ("w", "not a url\n", "https:// webhook URL"),
                                ("w", "https://qyapi.weixin.qq.com/x?key=K\nextra\n", "URL alone")]:
        (tmp_path / kind).write_text(text)
        with pytest.raises(relay_config.RelayConfigError, match=message.replace("?", r"\?")):
            relay_config.load_config(routing, tmp_path)
        (tmp_path / kind).write_text("")


def test_the_token_file_must_hold_a_token(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("tok\n")
    assert relay_config.read_token(tmp_path / "t") == "tok"
    (tmp_path / "t").write_text("\n")
    with pytest.raises(relay_config.RelayConfigError, match="is empty"):
        relay_config.read_token(tmp_path / "t")
    with pytest.raises(relay_config.RelayConfigError, match="cannot be read"):
        relay_config.read_token(tmp_path / "missing")


# --------------------------------------------------------------------------- rate limit and batching


def test_a_storm_is_batched_within_the_rate_limit() -> None:
    """25 notifications, 10 ms apart, for a DingTalk robot allowed 2 posts per 1.5 s window (its real limit
    is 20 a minute): a few messages hold all 25, each signed and accepted, never more than 2 per window."""
    import asyncio
    import time

    import httpx

    from service.relay.config import Bot
    from service.relay.delivery import BotSender, Metrics
    from tests.chatbots import FakeBot

    fake = FakeBot("dingtalk", "tok", "SECtest")
    try:
        bot = Bot("storm", "dingtalk", "f", fake.url, fake.secret)

        async def storm() -> list[bool]:
            async with httpx.AsyncClient(timeout=2, trust_env=False) as client:
                sender = BotSender(bot, client, SHANGHAI, render.Links(), Metrics())
                sender.per_minute, sender.window_s = 2, 1.5
                sender.start()
                deadline = time.monotonic() + 10
                futures = []
                for i in range(25):
                    futures.append(sender.submit(_group(_alert(f"Storm{i:02d}")), deadline))
                    await asyncio.sleep(0.01)
                results = await asyncio.wait_for(asyncio.gather(*futures), 10)
                await sender.stop()
                return list(results)

        assert asyncio.run(storm()) == [True] * 25
        assert len(fake.received) <= 4 and not fake.refused, len(fake.received)
        times = [m.at for m in fake.received]
        assert all(later - earlier >= 1.4 for earlier, later in zip(times, times[2:], strict=False)), times
        text = "\n".join(m.text for m in fake.received)
        assert all(f"**FIRING** Storm{i:02d}" in text for i in range(25))
    finally:
        fake.close()
