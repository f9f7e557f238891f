"""The dead-letter console, ``python -m service console``: see, search, replay and purge in a browser.

Server-rendered pages on FastAPI (every asset served by the console itself)
over the dead-letter library (``service.deadletters``): the console runs no
operation of its own, it calls the library's ``replay``, ``purge``, ``export``
and walks, under the same per-queue lock as the CLI.

What lives here: ``app`` (``create_app``: wiring, security headers, error
pages), ``pages`` (what changes nothing: overview, list, one letter, a job,
downloads, /healthz, /metrics), ``actions`` (the POSTs: login, logout, dry runs,
confirmations, refresh), ``auth`` (sessions, a trusted proxy's user header,
roles, CSRF), ``sessions`` (logins and the failed-login limit), ``users`` (the
file of hashed passwords), ``snapshot`` (the background read of each queue that
pages show), ``jobs`` (dry-run plans and the replays and purges they start),
``query`` (the filters, as the CLI names them), ``audit`` (audit lines and
metrics), ``templating`` and ``server`` (``serve``).

May import ``service.deadletters``, ``service.queues``, ``service.topology``,
``service.settings``, ``service.errors`` and ``service.web.server`` (binding
the socket); nothing of the kit imports it but the command line.
"""

from service.console.app import create_app
from service.console.server import console_url, serve
from service.console.users import OPERATOR, ROLES, VIEWER, UsersFileError, add_user, read_users, remove_user

__all__ = ["OPERATOR", "ROLES", "VIEWER", "UsersFileError", "add_user", "console_url", "create_app", "read_users",
           "remove_user", "serve"]
