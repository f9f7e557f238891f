"""The example web service, ``python -m service web``: the documents' integrated example on the kit.

A FastAPI app on uvicorn that publishes with the asyncio client
(``service.async_client.AsyncPublisher``), answers task status from the status
API (``service.status.astatus`` / ``arevoke``) and serves the export files:
submit an export, return its task id at once, let the page poll
``GET /api/tasks/{task_id}`` for status and progress, then download the file.

What lives here: ``app`` (``create_app``: the app factory, its error mapping,
request timeout, Sentry), ``routes`` (the endpoints), ``schemas`` (request and
response models: what is validated, and the JSON shapes), ``task_view`` (a
TaskStatus as the page sees it), ``exports`` (the export directory: listing and
safe opening, no path traversal), ``metrics`` (its own Prometheus metrics at
/metrics) and ``server`` (``serve``: uvicorn on KIT_WEB_HOST:KIT_WEB_PORT).

May import ``service.async_client``, ``service.status``, ``service.errors``,
``service.settings``, ``service.monitoring`` and the task modules' constants;
never the operator tools (cli, stack, broker, deadletters).
"""

from service.web.app import create_app
from service.web.server import serve

__all__ = ["create_app", "serve"]
