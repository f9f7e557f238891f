"""Render deploy/alertmanager/alertmanager.yml with a few documented values replaced.

Alertmanager 0.25 reads secrets from files but has no environment expansion and
no ``url_file`` for webhooks, so the values that differ between deployments are
placeholders in the committed file. This module writes a copy of that exact file
with only these values replaced (everything else, routing and inhibition
included, is byte for byte the committed text):

- ``secrets_dir``: the directory of the four secret files (``/run/secrets`` in
  the committed file); file names stay as in :data:`SECRET_FILES`.
- ``smtp_smarthost``, ``smtp_require_tls``: the mail relay (global section).
- ``pagerduty_url``: PagerDuty's Events API v2 endpoint (global section).
- ``webhook_url``: the chat-bot relay the generic webhook posts to.
- ``group_wait``, ``group_interval``: every occurrence, so tests run in seconds.
- ``wecom_app`` (:class:`WecomApp`): adds WeCom APPLICATION messages (Alertmanager's
  native ``wechat_configs``, for teams with a WeCom app instead of a group bot):
  a ``wecom-app`` receiver and a route sending it everything but ``info``.
  Alertmanager 0.25 has no ``api_secret_file`` (it rejects the field), so the
  app's secret is read from its file here and written INTO the output, which is
  then created 0600: treat the rendered file as a secret. The committed file
  never holds it.

Relative template globs are made absolute against the committed file's folder,
so the copy works from any directory. No secret value ever passes through here:
the output names secret files, never their contents (except the WeCom app
secret, above, when asked for).

From a shell::

    python -m service.monitoring.alertmanager_config --secrets-dir /etc/alertmanager/secrets \\
        --smtp-smarthost mail.internal:587 --webhook-url http://relay:8060/am -o /etc/alertmanager/alertmanager.yml
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: The committed production configuration.
PRODUCTION_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "alertmanager" / "alertmanager.yml"

#: Where the committed configuration expects its secret files (compose/k8s secrets mount here).
PRODUCTION_SECRETS_DIR = "/run/secrets"

#: Secret file name -> what it holds (the value alone; 0.25 trims a trailing newline except from the SMTP password).
SECRET_FILES: dict[str, str] = {
    "alertmanager_slack_api_url": "Slack incoming-webhook URL (global.slack_api_url_file)",
    "alertmanager_smtp_password": "password of smtp_auth_username, NO trailing newline (smtp_auth_password_file)",
    "alertmanager_pagerduty_routing_key": "PagerDuty Events API v2 integration key (routing_key_file)",
    "alertmanager_webhook_token": "bearer token for the chat-bot relay (http_config.authorization.credentials_file)",
}

# A Prometheus-style duration, composite allowed ("1s", "500ms", "1h30m").
_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")

# `key: value` on a non-comment line, optionally as a list item ("- url: ...").
_KEY_LINE = r"^(?P<lead>[ \t]*(?:-[ \t]+)?{key}:[ \t]*)(?P<value>[^#\n]*?)(?P<trail>[ \t]*(?:#.*)?)$"


#: WeCom's API base, Alertmanager's default wechat api_url (it must end with a slash).
WECOM_API_URL = "https://qyapi.weixin.qq.com/cgi-bin/"

# Where the wecom-app route goes: right after the chat-bot relay's catch-all route.
_ROUTE_ANCHOR = "    - receiver: chatbot-webhook\n      continue: true\n"


@dataclass(frozen=True)
class WecomApp:
    """A WeCom (企业微信) application that Alertmanager's wechat_configs sends to.

    ``corp_id`` (企业ID, "My company" page), ``agent_id`` (the app's AgentId),
    ``secret_file`` (a file holding the app's Secret), and whom it tells:
    ``to_party`` (department ids, ``1|2``) and/or ``to_user`` (``@all`` or
    ``zhangsan|lisi``). ``api_url`` is WeCom's API base (a test server in tests).
    """

    corp_id: str
    agent_id: str
    secret_file: str
    to_party: str = ""
    to_user: str = ""
    api_url: str = WECOM_API_URL


def _wecom_app(text: str, app: WecomApp) -> str:
    """``text`` with the wecom-app route and receiver added (the secret read from its file)."""
    if not app.corp_id or not app.agent_id.isdigit() or not (app.to_party or app.to_user):
        raise ValueError("wecom_app needs corp_id, a numeric agent_id, and to_party or to_user")
    if not app.api_url.endswith("/"):
        raise ValueError(f"wecom_app api_url {app.api_url!r} must end with '/' (Alertmanager appends gettoken)")
    try:
        secret = Path(app.secret_file).read_text().strip()
    except OSError as exc:
        raise ValueError(f"wecom_app secret file {app.secret_file} cannot be read ({exc.strerror})") from None
    if not secret:
        raise ValueError(f"wecom_app secret file {app.secret_file} is empty: write the app's Secret into it")
    if text.count(_ROUTE_ANCHOR) != 1:
        raise ValueError("expected one chatbot-webhook catch-all route to put the wecom-app route after")
    route = ("    # WeCom application messages (alertmanager_config --wecom-app-*): everything but info.\n"
             "    - receiver: wecom-app\n      matchers: ['severity!=\"info\"']\n      continue: true\n")
    receiver = "\n".join([
        "",
        "  # WeCom application messages. The secret is inline: Alertmanager 0.25 has no api_secret_file.",
        "  - name: wecom-app",
        "    wechat_configs:",
        "      - send_resolved: true",
        f"        api_url: {_quote(app.api_url)}",
        f"        api_secret: {_quote(secret)}",
        f"        corp_id: {_quote(app.corp_id)}",
        f"        agent_id: {_quote(app.agent_id)}",
        f"        to_party: {_quote(app.to_party)}",
        f"        to_user: {_quote(app.to_user)}",
        "        message_type: markdown",
        "        message: '{{ template \"kit.wechat.message\" . }}'",
        "",
    ])
    return text.replace(_ROUTE_ANCHOR, _ROUTE_ANCHOR + route).rstrip("\n") + "\n" + receiver


def _quote(value: str) -> str:
    """A YAML single-quoted scalar."""
    return "'" + value.replace("'", "''") + "'"


def _replace_key(text: str, key: str, value: str, expected: int | None = 1) -> str:
    """Set every ``key:`` line's value; fail if the key occurs other than ``expected`` times (None: at least once)."""
    pattern = re.compile(_KEY_LINE.format(key=re.escape(key)), re.MULTILINE)
    new, count = pattern.subn(lambda m: m["lead"] + value + m["trail"], text)
    if (expected is None and count == 0) or (expected is not None and count != expected):
        raise ValueError(f"expected {expected or 'at least one'} `{key}:` line(s) in the config, found {count}")
    return new


def _replace_secrets_dir(text: str, secrets_dir: str) -> str:
    """Point every ``*_file: /run/secrets/NAME`` line at ``secrets_dir/NAME``."""
    pattern = re.compile(
        r"^(?P<lead>[ \t]*(?:-[ \t]+)?[a-z_]+_file:[ \t]*)['\"]?"
        + re.escape(PRODUCTION_SECRETS_DIR)
        + r"/(?P<name>[^'\"\s#]+)['\"]?(?P<trail>[ \t]*(?:#.*)?)$",
        re.MULTILINE,
    )
    names: list[str] = []

    def repl(m: re.Match[str]) -> str:
        names.append(m["name"])
        return m["lead"] + _quote(str(Path(secrets_dir) / m["name"])) + m["trail"]

    new = pattern.sub(repl, text)
    if sorted(names) != sorted(SECRET_FILES):
        documented = sorted(SECRET_FILES)
        raise ValueError(f"secret files in the config {sorted(names)} differ from the documented {documented}")
    return new


def _absolute_templates(text: str, base: Path) -> str:
    """Make the relative globs of the top-level ``templates:`` list absolute against ``base``."""
    lines = text.split("\n")
    inside = False
    for i, line in enumerate(lines):
        if re.match(r"^templates:\s*$", line):
            inside = True
            continue
        if not inside:
            continue
        item = re.match(r"^(\s+-\s+)(['\"]?)([^'\"#]+?)\2(\s*(?:#.*)?)$", line)
        if item:
            glob = item.group(3)
            if not glob.startswith("/"):
                lines[i] = item.group(1) + _quote(str(base / glob)) + item.group(4)
        elif line.strip() and not line.lstrip().startswith("#"):
            inside = False
    return "\n".join(lines)


def render(
    source: Path = PRODUCTION_CONFIG,
    *,
    secrets_dir: str | Path | None = None,
    smtp_smarthost: str | None = None,
    smtp_require_tls: bool | None = None,
    pagerduty_url: str | None = None,
    webhook_url: str | None = None,
    group_wait: str | None = None,
    group_interval: str | None = None,
    wecom_app: WecomApp | None = None,
) -> str:
    """The text of ``source`` with the given values replaced (None: keep the committed value)."""
    source = Path(source).resolve()
    text = source.read_text()
    if secrets_dir is not None:
        text = _replace_secrets_dir(text, str(Path(secrets_dir).resolve()))
    if smtp_smarthost is not None:
        text = _replace_key(text, "smtp_smarthost", _quote(smtp_smarthost))
    if smtp_require_tls is not None:
        text = _replace_key(text, "smtp_require_tls", "true" if smtp_require_tls else "false")
    if pagerduty_url is not None:
        text = _replace_key(text, "pagerduty_url", _quote(pagerduty_url))
    if webhook_url is not None:
        text = _replace_key(text, "url", _quote(webhook_url))
    for key, duration in (("group_wait", group_wait), ("group_interval", group_interval)):
        if duration is not None:
            if not _DURATION.match(duration):
                raise ValueError(f"{key}: {duration!r} is not a duration like 1s or 5m")
            text = _replace_key(text, key, duration, expected=None)
    if wecom_app is not None:
        text = _wecom_app(text, wecom_app)
    return _absolute_templates(text, source.parent)


def write(path: str | Path, source: Path = PRODUCTION_CONFIG, **overrides: object) -> Path:
    """Render (see :func:`render`) into ``path`` and return it (0600 when it holds the WeCom app secret)."""
    path = Path(path)
    text = render(source, **overrides)  # type: ignore[arg-type]
    _write(path, text, secret=overrides.get("wecom_app") is not None)
    return path


def _write(path: Path, text: str, secret: bool) -> None:
    if not secret:
        path.write_text(text)
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.monitoring.alertmanager_config",
        description="Write deploy/alertmanager/alertmanager.yml with deployment values replaced.",
    )
    parser.add_argument("--source", type=Path, default=PRODUCTION_CONFIG, help="config to start from")
    parser.add_argument("--secrets-dir", help=f"directory of {', '.join(SECRET_FILES)}")
    parser.add_argument("--smtp-smarthost", help="host:port of the mail relay")
    parser.add_argument("--smtp-require-tls", choices=["true", "false"], help="STARTTLS before AUTH (default true)")
    parser.add_argument("--pagerduty-url", help="PagerDuty Events API v2 endpoint")
    parser.add_argument("--webhook-url", help="URL of the chat-bot relay")
    parser.add_argument("--group-wait", help="e.g. 30s")
    parser.add_argument("--group-interval", help="e.g. 5m")
    parser.add_argument("--wecom-app-corp-id", help="WeCom application messages: the corp id (企业ID)")
    parser.add_argument("--wecom-app-agent-id", help="... the app's AgentId")
    parser.add_argument("--wecom-app-secret-file", help="... a file holding the app's Secret (written inline!)")
    parser.add_argument("--wecom-app-to-party", default="", help="... department ids, e.g. 1|2")
    parser.add_argument("--wecom-app-to-user", default="", help="... @all or user ids, e.g. zhangsan|lisi")
    parser.add_argument("--wecom-app-api-url", default=WECOM_API_URL, help="... WeCom's API base")
    parser.add_argument("-o", "--output", help="file to write (default: standard output)")
    args = parser.parse_args(argv)
    app = None
    if args.wecom_app_corp_id or args.wecom_app_secret_file:
        app = WecomApp(args.wecom_app_corp_id or "", args.wecom_app_agent_id or "", args.wecom_app_secret_file or "",
                       args.wecom_app_to_party, args.wecom_app_to_user, args.wecom_app_api_url)
    text = render(
        args.source,
        secrets_dir=args.secrets_dir,
        smtp_smarthost=args.smtp_smarthost,
        smtp_require_tls=None if args.smtp_require_tls is None else args.smtp_require_tls == "true",
        pagerduty_url=args.pagerduty_url,
        webhook_url=args.webhook_url,
        group_wait=args.group_wait,
        group_interval=args.group_interval,
        wecom_app=app,
    )
    if args.output:
        _write(Path(args.output), text, secret=app is not None)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
