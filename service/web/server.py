"""``serve``: the web service on uvicorn, listening on KIT_WEB_HOST:KIT_WEB_PORT (or the given address).

The socket is bound before uvicorn starts, so an address in use or not
assignable is one WebError line, not uvicorn's log and exit.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from service.errors import KitError
from service.settings import Settings, load

#: Seconds uvicorn lets running requests finish at shutdown (SIGTERM).
GRACEFUL_SHUTDOWN_S = 10


class WebError(KitError):
    """The web service cannot start: its address cannot be bound."""


def bind(host: str, port: int, service: str = "the web service", option: str = "--port / KIT_WEB_PORT"
         ) -> socket.socket:
    """A listening TCP socket on ``host``:``port``; WebError saying why not (naming ``service`` and ``option``)."""
    host = host.strip("[]")  # "[::1]" is the address ::1
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise WebError(f"{service} cannot listen on {host}:{port} ({exc.strerror}); choose another "
                       f"{option}, or stop what uses it") from None
    return sock


def url(host: str, port: int) -> str:
    """The service's URL for a person (an IPv6 address in brackets)."""
    host = host.strip("[]")
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(settings: Settings | None = None, host: str | None = None, port: int | None = None,
          on_listening: Callable[[str], None] | None = None) -> None:
    """Run the web service until SIGINT/SIGTERM; ``on_listening(url)`` is called once the socket is bound."""
    from service.web.app import create_app

    settings = settings or load()
    host = host or settings.web_host
    port = port or settings.web_port
    sock = bind(host, port)
    app = create_app(settings)
    if on_listening:
        on_listening(url(host, port))
    run(app, sock, settings.log_level)


def run(app: Any, sock: socket.socket, log_level: str) -> None:
    """Serve ``app`` on the bound ``sock`` with uvicorn until SIGINT/SIGTERM (no proxy headers, no server header;
    running requests get GRACEFUL_SHUTDOWN_S to finish)."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level.lower(), lifespan="on", proxy_headers=False,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, server_header=False)
    uvicorn.Server(config).run(sockets=[sock])
