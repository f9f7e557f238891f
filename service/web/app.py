"""``create_app``: the example web service's FastAPI app, with its error mapping, deadline, metrics and Sentry.

Every answer that is not a success is JSON with a one-line ``detail``:

- 422: the request is invalid (the field is named: ``end_date: ...``; FastAPI's
  per-field list is in ``errors``), or the client refused the task before
  sending it (InvalidTaskInput);
- 503: the broker (BrokerUnavailable, BrokerRefused, PublishError) or the
  result backend (ResultBackendUnavailable) cannot do what was asked, or the
  request ran past KIT_WEB_REQUEST_TIMEOUT. The client and the status API
  have deadlines of their own; the request timeout is the backstop, so no
  request ever hangs;
- 400 / 404: a download name that is no export name / no such export.

One AsyncPublisher per app, opened on the first publish (the service starts,
and answers 503, while the broker is down) and closed at shutdown. Sentry is
initialised when SENTRY_DSN is set (service.monitoring.sentry; sentry-sdk's
FastAPI integration enables itself and reports unhandled errors); every 503
is reported to it too (timed-out requests at most once a minute: RequestTimeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import sentry_sdk
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.errors import BrokerRefused, BrokerUnavailable, InvalidTaskInput, PublishError, ResultBackendUnavailable
from service.monitoring import sentry
from service.settings import Settings, load
from service.web.exports import ExportNameInvalid, ExportNotFound
from service.web.metrics import CountRequests, WebMetrics
from service.web.routes import router

logger = logging.getLogger(__name__)

#: Seconds closing the publisher may take at shutdown.
CLOSE_TIMEOUT_S = 5.0

DESCRIPTION = """The integrated example on the kit: submit a work-log export, poll its status and progress,
download the file. Tasks are published to RabbitMQ with the asyncio client and confirmed before the answer;
status comes from the result backend (KIT_RESULT_BACKEND) and the broker."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def problem(status: int, detail: str, **extra: Any) -> JSONResponse:
    """A JSON error answer: ``{"detail": "<one line>", ...}``."""
    return JSONResponse(status_code=status, content={"detail": _one_line(detail), **extra})


def _field(loc: Any) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = jsonable_encoder(exc.errors())
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    # Malformed JSON: pydantic's loc is ("body", <character position>), which names no field.
    field = "body" if first.get("type") == "json_invalid" else _field(first.get("loc", ()))
    return problem(422, f"{field}: {message}", errors=errors)


async def _kit_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, InvalidTaskInput):
        return problem(422, str(exc))
    # A 503 is the operators' business: Sentry gets it (grouped by error type), when it is on.
    sentry_sdk.capture_exception(exc)
    if isinstance(exc, BrokerRefused):
        return problem(503, f"the broker refused the web service: {exc}")
    if isinstance(exc, BrokerUnavailable):
        return problem(503, f"the broker is unavailable: {exc}")
    if isinstance(exc, PublishError):
        return problem(503, f"the broker did not queue the task: {exc}")
    if isinstance(exc, ResultBackendUnavailable):
        return problem(503, f"the result backend is unavailable: {exc}")
    raise exc


async def _export_error(request: Request, exc: Exception) -> JSONResponse:
    return problem(400 if isinstance(exc, ExportNameInvalid) else 404, str(exc))


class RequestTimedOut(Exception):
    """What Sentry gets for a request that ran past KIT_WEB_REQUEST_TIMEOUT (a 503)."""


class RequestTimeout:
    """ASGI middleware: a request whose response has not started within ``seconds`` gets a 503.

    Once the response has started (a download streaming) the deadline is lifted:
    a status code cannot be taken back, and a large file may take its time. Only
    this deadline's expiry is answered so (a TimeoutError of the app's own is
    its error); it is reported to Sentry as RequestTimedOut, at most once per
    REPORT_EVERY_S, so an outage that times out every poll is one event, not one
    per request.
    """

    #: Seconds between two reports of timed-out requests to Sentry.
    REPORT_EVERY_S = 60.0

    def __init__(self, app: Any, seconds: float) -> None:
        self.app, self.seconds = app, seconds
        self._reported_at: float | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        deadline = asyncio.timeout(self.seconds)

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                deadline.reschedule(None)
            await send(message)

        try:
            async with deadline:
                await self.app(scope, receive, send_wrapper)
        except TimeoutError:
            if started or not deadline.expired():
                raise
            logger.warning("%s %s: no answer within KIT_WEB_REQUEST_TIMEOUT (%gs)", scope.get("method"),
                           scope.get("path"), self.seconds)
            self._report(scope)
            await problem(503, f"no answer within KIT_WEB_REQUEST_TIMEOUT ({self.seconds:g}s); "
                               "the broker or the result backend is too slow, try again")(scope, receive, send)

    def _report(self, scope: dict[str, Any]) -> None:
        """Send the timeout to Sentry (a no-op when it is off), unless one went less than REPORT_EVERY_S ago."""
        now = time.monotonic()
        if self._reported_at is not None and now - self._reported_at < self.REPORT_EVERY_S:
            return
        self._reported_at = now
        sentry_sdk.capture_exception(RequestTimedOut(
            f"{scope.get('method')} {scope.get('path')}: no answer within KIT_WEB_REQUEST_TIMEOUT "
            f"({self.seconds:g}s)"))


def create_app(settings: Settings | None = None) -> FastAPI:
    """The web service as an ASGI app (serve it with uvicorn: ``service.web.serve``).

    ``settings`` default to the environment's (service.settings.load).
    """
    settings = settings or load()
    sentry.init("web", settings)
    metrics = WebMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from service.async_client import AsyncPublisher

        app.state.publisher = AsyncPublisher(settings)
        try:
            yield
        finally:
            try:
                await asyncio.wait_for(app.state.publisher.close(), CLOSE_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - shutting down: log, never hang or raise
                logger.warning("could not close the publisher cleanly", exc_info=True)

    app = FastAPI(title="Celery-on-RabbitMQ kit: example web service", description=DESCRIPTION,
                  version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.include_router(router)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    for error in (InvalidTaskInput, BrokerUnavailable, PublishError, ResultBackendUnavailable):
        app.add_exception_handler(error, _kit_error)
    for error in (ExportNameInvalid, ExportNotFound):
        app.add_exception_handler(error, _export_error)
    # Outermost last: metrics count what the timeout answers too.
    app.add_middleware(RequestTimeout, seconds=settings.web_request_timeout)
    app.add_middleware(CountRequests, metrics=metrics)
    return app
