"""``serve``: the console on uvicorn, listening on KIT_CONSOLE_HOST:KIT_CONSOLE_PORT (or the given address)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from service.settings import Settings, load
from service.web.server import bind, run, url


def console_url(settings: Settings) -> str:
    """Where people reach the console: KIT_CONSOLE_URL, else its own address."""
    return settings.console_url.rstrip("/") or url(settings.console_host, settings.console_port)


def _log_to_stderr(level: str) -> None:
    """The console's own loggers (the audit trail among them) to stderr, beside uvicorn's."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("service.console", "service.deadletters"):
        logger = logging.getLogger(name)
        logger.setLevel(level.upper())
        logger.addHandler(handler)


def serve(settings: Settings | None = None, host: str | None = None, port: int | None = None,
          on_listening: Callable[[str], None] | None = None) -> None:
    """Run the console until SIGINT/SIGTERM; ``on_listening(url)`` is called once the socket is bound."""
    from service.console.app import create_app

    settings = settings or load()
    _log_to_stderr(settings.log_level)
    host = host or settings.console_host
    port = port or settings.console_port
    sock = bind(host, port, "the console", "--port / KIT_CONSOLE_PORT")
    app = create_app(settings)
    if on_listening:
        on_listening(url(host, port))
    run(app, sock, settings.log_level)
