"""``serve``: the relay on uvicorn at KIT_ALERT_RELAY_HOST:KIT_ALERT_RELAY_PORT (or the given address).

Everything is checked before the socket opens: the routing file, each bot's
secret file (empty ones skipped with a warning), the token file (must not be
empty). A problem is one RelayConfigError (or WebError) line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from zoneinfo import ZoneInfo

from service.relay.config import RelayConfig, load_config, read_token
from service.settings import Settings, load
from service.web.server import bind, run, url

log = logging.getLogger("service.relay")


def _log_to_stderr(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.setLevel(level.upper())
    log.addHandler(handler)


def serve(settings: Settings | None = None, host: str | None = None, port: int | None = None,
          on_listening: Callable[[str, RelayConfig], None] | None = None) -> None:
    """Run the relay until SIGINT/SIGTERM; ``on_listening(url, config)`` once the socket is bound."""
    from service.relay.app import RelayOptions, create_app
    from service.relay.render import Links

    settings = settings or load()
    _log_to_stderr(settings.log_level)
    config = load_config(settings.alert_relay_config, settings.alert_relay_secrets_dir)
    options = RelayOptions(token=read_token(settings.alert_relay_token_file),
                           zone=ZoneInfo(settings.alert_timezone),
                           links=Links(grafana_url=settings.alert_grafana_url),
                           timeout=settings.alert_relay_timeout, deadline=settings.alert_relay_deadline)
    host = host or settings.alert_relay_host
    port = port or settings.alert_relay_port
    sock = bind(host, port, "the alert relay", "--port / KIT_ALERT_RELAY_PORT")
    app = create_app(config, options)
    if on_listening:
        on_listening(url(host, port), config)
    run(app, sock, settings.log_level)
