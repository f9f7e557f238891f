"""Alertmanager notification groups -> each platform's message JSON, within the platform's length limit.

One function per platform (:func:`wecom`, :func:`dingtalk`, :func:`feishu`) takes
one or more notification groups (Alertmanager's webhook payloads, version 4;
several when the rate limiter batched them) and returns a list of message bodies,
usually one. Every alert appears in them with its name, severity, queue, firing
or resolved, summary, description, start time in the team's time zone, and links
to its runbook, Grafana and (dead-letter alerts) the dead-letter console. When
the text would pass the platform's limit, later alerts are shortened to one line
and a note says so; if even that does not fit, the rest go into a further
message: an alert is never dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

#: WeCom group bot: markdown.content is at most 4096 bytes of UTF-8 (WeCom's documented limit).
WECOM_LIMIT_BYTES = 4096
#: DingTalk custom robot: no firm markdown limit is documented (about 20,000 bytes is refused); keep well under.
DINGTALK_LIMIT_BYTES = 15000
#: Feishu custom bot: the request body is at most 20 KB; the card text keeps room for the JSON around it.
FEISHU_LIMIT_BYTES = 18000

Payload = Mapping[str, Any]


@dataclass(frozen=True)
class Links:
    """Where messages link besides each alert's own annotations."""

    grafana_url: str = ""


@dataclass(frozen=True)
class _Section:
    full: str
    short: str


def _local_time(stamp: str, zone: ZoneInfo) -> str:
    """An Alertmanager RFC 3339 time (nanoseconds allowed) in ``zone``, e.g. ``2026-12-01 18:40:05 CST``."""
    text = re.sub(r"(\.\d{6})\d+", r"\1", stamp or "").replace("Z", "+00:00")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return stamp or "unknown"
    return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S %Z")


def title(payload: Payload) -> str:
    """``[FIRING:2] CeleryQueueBacklogHigh queue=bulk (warning)``, as kit.title in templates/kit.tmpl."""
    common = payload.get("commonLabels") or {}
    status = str(payload.get("status", "firing")).upper()
    firing = sum(1 for a in payload.get("alerts", []) if a.get("status") == "firing")
    text = f"[{status}{f':{firing}' if status == 'FIRING' else ''}] {common.get('alertname', 'alerts')}"
    if common.get("queue"):
        text += f" queue={common['queue']}"
    if common.get("hostname"):
        text += f" host={common['hostname']}"
    if common.get("severity"):
        text += f" ({common['severity']})"
    return text


def _links(alert: Mapping[str, Any], links: Links) -> str:
    notes = alert.get("annotations") or {}
    found = []
    if notes.get("runbook_url"):
        found.append(f"[Runbook]({notes['runbook_url']})")
    if links.grafana_url:
        found.append(f"[Grafana]({links.grafana_url})")
    if notes.get("console"):
        found.append(f"[Dead-letter console]({notes['console']})")
    return " | ".join(found)


def _sections(payloads: Sequence[Payload], zone: ZoneInfo, links: Links, newline: str = "\n") -> list[_Section]:
    """A heading per group and a section per alert; ``newline`` between an alert's lines (DingTalk's
    markdown joins single-newline lines into one paragraph, so it gets blank lines)."""
    sections: list[_Section] = []
    for payload in payloads:
        head = f"### {title(payload)}"
        sections.append(_Section(head, head))
        for alert in payload.get("alerts", []):
            labels, notes = alert.get("labels") or {}, alert.get("annotations") or {}
            status = "RESOLVED" if alert.get("status") == "resolved" else "FIRING"
            name = labels.get("alertname", "alert")
            facts = f"severity **{labels.get('severity', 'none')}** · queue **{labels.get('queue', '-')}**"
            if labels.get("hostname"):
                facts += f" · host **{labels['hostname']}**"
            started = f"started {_local_time(alert.get('startsAt', ''), zone)}"
            if status == "RESOLVED":
                started += f", resolved {_local_time(alert.get('endsAt', ''), zone)}"
            link_line = _links(alert, links)
            lines = [f"**{status}** {name}", facts]
            if notes.get("summary"):
                lines.append(f"> {notes['summary']}")
            if notes.get("description"):
                lines.append(str(notes["description"]))
            lines.append(started)
            if link_line:
                lines.append(link_line)
            short = f"**{status}** {name} · {labels.get('severity', 'none')} · {labels.get('queue', '-')} · {started}"
            if notes.get("runbook_url"):
                short += f" · [Runbook]({notes['runbook_url']})"
            sections.append(_Section(newline.join(lines), short))
    return sections


def _size(text: str) -> int:
    return len(text.encode())


def _cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8, ending in a truncation mark."""
    mark = " …(truncated)"
    if _size(text) <= limit:
        return text
    return text.encode()[: max(0, limit - _size(mark))].decode(errors="ignore") + mark


def fit(sections: Sequence[_Section], limit: int, platform: str) -> list[str]:
    """The sections as texts of at most ``limit`` bytes each: full where they fit, else shortened with a note."""
    note = f"\n\n_(Some alerts are shortened to one line: {platform}'s message limit. Alertmanager has them in full.)_"
    continued = "_(continued)_"
    budget = limit - _size(note) - 2
    texts: list[str] = []
    current: list[str] = []
    shortened = False

    def flush() -> None:
        nonlocal current, shortened
        if current:
            texts.append("\n\n".join(current) + (note if shortened else ""))
        current, shortened = [continued], False

    for section in sections:
        used = _size("\n\n".join(current))
        for candidate, is_short in ((section.full, False), (section.short, True)):
            if used + 2 + _size(candidate) <= budget:
                current.append(candidate)
                shortened = shortened or (is_short and section.short != section.full)
                break
        else:
            if current and current != [continued]:
                flush()
            room = budget - _size("\n\n".join(current)) - 2
            piece = section.full if _size(section.full) <= room else _cut(section.short, room)
            current.append(piece)
            shortened = shortened or piece != section.full
    if current and current != [continued]:
        texts.append("\n\n".join(current) + (note if shortened else ""))
    return texts


def _overall_title(payloads: Sequence[Payload]) -> str:
    if len(payloads) == 1:
        return title(payloads[0])
    return f"{len(payloads)} alert notifications: " + ", ".join(title(p) for p in payloads)


def wecom(payloads: Sequence[Payload], zone: ZoneInfo, links: Links = Links()) -> list[dict[str, Any]]:
    """WeCom group-bot markdown messages (``msgtype: markdown``), each content at most WECOM_LIMIT_BYTES."""
    texts = fit(_sections(payloads, zone, links), WECOM_LIMIT_BYTES, "WeCom")
    return [{"msgtype": "markdown", "markdown": {"content": text}} for text in texts]


def dingtalk(payloads: Sequence[Payload], zone: ZoneInfo, links: Links = Links()) -> list[dict[str, Any]]:
    """DingTalk custom-robot markdown messages (the title is what the notification preview shows)."""
    head = _cut(_overall_title(payloads), 200)
    texts = fit(_sections(payloads, zone, links, newline="\n\n"), DINGTALK_LIMIT_BYTES, "DingTalk")
    return [{"msgtype": "markdown", "markdown": {"title": head, "text": text}} for text in texts]


def feishu(payloads: Sequence[Payload], zone: ZoneInfo, links: Links = Links()) -> list[dict[str, Any]]:
    """Feishu/Lark interactive cards: a red (firing) or green (resolved) header and a markdown body."""
    head = _cut(_overall_title(payloads), 300)
    firing = any(p.get("status") == "firing" for p in payloads)
    sections = _sections(payloads, zone, links)
    if len(payloads) == 1:
        sections = sections[1:]  # the card's header is the group's title already
    texts = fit(sections, FEISHU_LIMIT_BYTES, "Feishu")
    return [{
        "msg_type": "interactive",
        "card": {
            "config": {"wide_screen_mode": True},
            "header": {"title": {"tag": "plain_text", "content": head}, "template": "red" if firing else "green"},
            "elements": [{"tag": "markdown", "content": text}],
        },
    } for text in texts]


#: kind -> renderer.
RENDERERS = {"wecom": wecom, "dingtalk": dingtalk, "feishu": feishu}
