"""Run danihodovic/celery-exporter with the kit's broker settings.

The exporter takes its broker only as ``--broker-url`` with the password in it,
which would put the password on the command line (``ps`` shows it) and in
compose files. This launcher builds that URL inside the process from the kit's
own settings, as the workers do, and passes every other argument unchanged:

    KIT_BROKER_URL            pyamqp://kit-monitor@rabbitmq:5672/kit (no password)
    KIT_BROKER_PASSWORD_FILE  /run/secrets/rabbitmq_monitor_password

It runs in the exporter's own virtual environment (deploy/exporter/requirements.txt:
the exporter pins prometheus-client<0.22 and installs a top-level package ``src``),
so it uses the standard library only and does not import the kit:

    .venv-exporter/bin/python scripts/celery_exporter.py --port 9808 --queues urgent,default,bulk
"""

from __future__ import annotations

import os
import sys
from urllib.parse import quote, unquote, urlsplit, urlunsplit


def broker_url(environ: dict[str, str]) -> str:
    """KIT_BROKER_URL with the password of KIT_BROKER_PASSWORD_FILE put in (quoted)."""
    url = environ.get("KIT_BROKER_URL", "").strip()
    if not url:
        raise SystemExit("error: set KIT_BROKER_URL (pyamqp://user@host:5672/vhost) and KIT_BROKER_PASSWORD_FILE")
    password_file = environ.get("KIT_BROKER_PASSWORD_FILE", "").strip()
    if not password_file:
        return url
    with open(password_file, encoding="utf-8") as f:
        password = f.read().strip()
    parts = urlsplit(url)
    if not parts.username:
        raise SystemExit("error: KIT_BROKER_PASSWORD_FILE is set but KIT_BROKER_URL names no user (user@host)")
    host = parts.netloc.rsplit("@", 1)[1]
    netloc = f"{quote(unquote(parts.username), safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def main(argv: list[str]) -> None:
    if any(a == "--broker-url" or a.startswith("--broker-url=") for a in argv):
        raise SystemExit("error: set KIT_BROKER_URL (and KIT_BROKER_PASSWORD_FILE) instead of --broker-url")
    try:
        url = broker_url(dict(os.environ))
    except OSError as exc:
        raise SystemExit(f"error: KIT_BROKER_PASSWORD_FILE cannot be read: {exc.strerror}") from None
    from src.cli import cli  # the exporter's click command

    cli(args=["--broker-url", url, *argv], prog_name="celery-exporter")


if __name__ == "__main__":
    main(sys.argv[1:])
