"""The relay's routing file (deploy/alertmanager/relay.yml) and each bot's secret file.

The routing file holds no secret: it lists bots, each with its platform
(``kind``), the name of its secret file in KIT_ALERT_RELAY_SECRETS_DIR, and which
alerts it gets (``severities`` and ``queues``, fnmatch patterns; an alert without
the label counts as ``none``; a list left out means every value). A secret file
holds the bot's webhook URL on its first line (its ``key=`` / ``access_token=`` /
hook token is the secret) and, for DingTalk and Feishu bots with signing on, the
signing secret on its second. A bot whose file is empty or missing is skipped
with a warning (scripts/make-secrets.sh creates the files empty); anything else
wrong is one RelayConfigError line naming the file and the fix.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from service.errors import KitError

log = logging.getLogger(__name__)

#: Platforms the relay speaks to, with what their webhook URL must carry.
KINDS = ("wecom", "dingtalk", "feishu")
#: Label value an alert without the label is matched as.
MISSING = "none"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_BOT_KEYS = {"name", "kind", "secret_file", "severities", "queues"}


class RelayConfigError(KitError):
    """The relay's routing file or a bot's secret file is unusable (the message says which and why)."""


@dataclass(frozen=True)
class Bot:
    """One group-chat bot: where it posts, how it signs, and which alerts it gets."""

    name: str
    kind: str
    secret_file: str
    url: str = field(default="", repr=False)  # holds the bot's key: never logged
    secret: str = field(default="", repr=False)  # DingTalk/Feishu signing secret; empty: unsigned
    severities: tuple[str, ...] = ()  # empty: every severity
    queues: tuple[str, ...] = ()  # empty: every queue

    def wants(self, labels: Mapping[str, str]) -> bool:
        """Whether an alert with these labels goes to this bot."""
        return (_matches(self.severities, labels.get("severity") or MISSING)
                and _matches(self.queues, labels.get("queue") or MISSING))


def _matches(patterns: Sequence[str], value: str) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(value, p) for p in patterns)


@dataclass(frozen=True)
class RelayConfig:
    """The bots that have a secret (``bots``) and those skipped because their file is empty (``skipped``)."""

    bots: tuple[Bot, ...]
    skipped: tuple[str, ...] = ()


def _patterns(where: str, key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise RelayConfigError(f"{where}: {key} must be a non-empty list of names or patterns, e.g. [critical]")
    return tuple(value)


def _check_url(where: str, kind: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RelayConfigError(f"{where}: the first line must be the bot's https:// webhook URL")
    query = parse_qs(parts.query)
    if kind == "wecom" and not query.get("key"):
        raise RelayConfigError(f"{where}: a WeCom bot URL carries key=... (…/cgi-bin/webhook/send?key=KEY)")
    if kind == "dingtalk" and not query.get("access_token"):
        raise RelayConfigError(f"{where}: a DingTalk robot URL carries access_token=... (…/robot/send?access_token=T)")
    if kind == "feishu" and "/hook/" not in parts.path:
        raise RelayConfigError(f"{where}: a Feishu bot URL ends in /open-apis/bot/v2/hook/TOKEN")


def read_bot_secret(bot: Bot, secrets_dir: Path) -> Bot | None:
    """``bot`` with its URL and signing secret from its file; None (a warning logged) when the file is empty."""
    path = secrets_dir / bot.secret_file
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        log.warning("alert relay: bot %s skipped: its secret file %s does not exist", bot.name, path)
        return None
    except OSError as exc:
        raise RelayConfigError(f"bot {bot.name}: its secret file {path} cannot be read ({exc.strerror})") from None
    if not lines:
        log.warning("alert relay: bot %s skipped: its secret file %s is empty", bot.name, path)
        return None
    where = f"bot {bot.name} ({path})"
    if len(lines) > 2 or (bot.kind == "wecom" and len(lines) > 1):
        wanted = "the webhook URL alone" if bot.kind == "wecom" else "the webhook URL and the signing secret"
        raise RelayConfigError(f"{where}: expected {wanted}, one per line")
    _check_url(where, bot.kind, lines[0])
    return Bot(bot.name, bot.kind, bot.secret_file, lines[0], lines[1] if len(lines) > 1 else "",
               bot.severities, bot.queues)


def parse_config(text: str, source: str = "relay.yml") -> list[Bot]:
    """The bots of a routing file's text (without their secrets); RelayConfigError on anything unexpected."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RelayConfigError(f"{source} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or set(data) != {"bots"} or not isinstance(data["bots"], list):
        raise RelayConfigError(f"{source} must hold one key, bots: a list of bots")
    bots: list[Bot] = []
    for i, entry in enumerate(data["bots"], 1):
        where = f"{source}: bot {i}"
        if not isinstance(entry, dict):
            raise RelayConfigError(f"{where} must be a mapping with name, kind and secret_file")
        unknown = set(entry) - _BOT_KEYS
        if unknown:
            raise RelayConfigError(f"{where} has unknown key(s) {sorted(unknown)}; allowed: {sorted(_BOT_KEYS)}")
        name, kind, secret_file = entry.get("name"), entry.get("kind"), entry.get("secret_file")
        if not isinstance(name, str) or not _NAME.match(name):
            raise RelayConfigError(f"{where}: name must be letters, digits, '.', '_' or '-' (got {name!r})")
        where = f"{source}: bot {name}"
        if kind not in KINDS:
            raise RelayConfigError(f"{where}: kind must be one of {', '.join(KINDS)} (got {kind!r})")
        if not isinstance(secret_file, str) or not _NAME.match(secret_file):
            raise RelayConfigError(f"{where}: secret_file must be a file name in KIT_ALERT_RELAY_SECRETS_DIR "
                                   f"(got {secret_file!r}); the URL and secret never go in this file")
        if any(b.name == name for b in bots):
            raise RelayConfigError(f"{where} is listed twice")
        bots.append(Bot(name, kind, secret_file, severities=_patterns(where, "severities", entry.get("severities")),
                        queues=_patterns(where, "queues", entry.get("queues"))))
    return bots


def load_config(path: str | Path, secrets_dir: str | Path) -> RelayConfig:
    """The routing file at ``path`` with each bot's secret read from ``secrets_dir``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RelayConfigError(f"KIT_ALERT_RELAY_CONFIG={str(path)!r} cannot be read ({exc.strerror})") from None
    bots, skipped = [], []
    for bot in parse_config(text, str(path)):
        ready = read_bot_secret(bot, Path(secrets_dir))
        if ready is None:
            skipped.append(bot.name)
        else:
            bots.append(ready)
    return RelayConfig(tuple(bots), tuple(skipped))


def read_token(path: str | Path) -> str:
    """The bearer token Alertmanager sends (alertmanager_webhook_token); RelayConfigError when missing or empty."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise RelayConfigError(f"KIT_ALERT_RELAY_TOKEN_FILE={str(path)!r} cannot be read ({exc.strerror}); "
                               "write the token Alertmanager sends into it") from None
    if not token:
        raise RelayConfigError(f"KIT_ALERT_RELAY_TOKEN_FILE={str(path)!r} is empty; write the bearer token of "
                               "alertmanager_webhook_token into it (the same file Alertmanager reads)")
    return token
