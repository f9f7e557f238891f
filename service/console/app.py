"""``create_app``: the dead-letter console's FastAPI app (pages, guard rails, metrics).

Every page is rendered on the server (Jinja2 templates of ``templates/``);
the one script and the one style sheet are served by the console itself
(``static/``), and the Content-Security-Policy allows nothing else. Every
answer carries the security headers of ``SECURITY_HEADERS``; pages are never
cached. An unknown session goes to /login; a refused request (role, CSRF) is
403 with the reason, and an audit line.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from service.console.audit import Audit
from service.console.auth import Authenticator, Forbidden, NotLoggedIn, set_session_cookie
from service.console.jobs import Jobs
from service.console.sessions import LoginLimiter, Sessions
from service.console.snapshot import Refresher
from service.settings import Settings, load

logger = logging.getLogger(__name__)
HERE = Path(__file__).parent

SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


@dataclass
class Console:
    """Everything one console holds: settings, logins, the snapshot, the jobs, the audit trail."""

    settings: Settings
    sessions: Sessions
    limiter: LoginLimiter
    auth: Authenticator
    refresher: Refresher
    jobs: Jobs
    audit: Audit
    templates: Jinja2Templates

    def render(self, request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        """Render template ``name`` with the request's identity, CSRF token and ``context``."""
        identity = getattr(request.state, "identity", None)
        context.setdefault("identity", identity)
        context.setdefault("csrf_token", identity.session.csrf if identity else "")
        context.setdefault("refresher", self.refresher)
        return self.templates.TemplateResponse(request, name, context, status_code=status_code)


def create_app(settings: Settings | None = None, start_refresher: bool = True) -> FastAPI:
    """The console's app; its refresher starts with the app (``start_refresher``)."""
    from service.console import actions, pages, templating

    settings = settings or load()
    sessions = Sessions(settings.console_session_ttl)
    refresher = Refresher(settings)
    audit = Audit(lambda: {name: s.taken_at for name, s in refresher.snapshots.items()})
    console = Console(settings, sessions, LoginLimiter(), Authenticator(settings, sessions), refresher,
                      Jobs(settings, refresher, audit), audit, templating.templates(HERE / "templates"))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if start_refresher:
            refresher.start()
        yield
        refresher.stop()

    app = FastAPI(title="Dead-letter console", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.console = console
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(pages.router)
    app.include_router(actions.router)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        for header, value in SECURITY_HEADERS.items():
            response.headers.setdefault(header, value)
        if not request.url.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
        new_session = getattr(request.state, "new_session", None)
        if new_session:
            set_session_cookie(response, new_session, settings.console_cookie_secure)
        return response

    @app.exception_handler(NotLoggedIn)
    async def to_login(request: Request, exc: NotLoggedIn) -> Response:
        if request.method == "GET" and not request.url.path.endswith(".json"):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            from urllib.parse import quote

            return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
        return Response("log in first\n", status_code=401, media_type="text/plain")

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}"
                             for e in exc.errors())
        return console.render(request, "error.html", 400, title="Bad request", message=problems)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> Response:
        logger.exception("console: %s %s failed", request.method, request.url.path)
        return console.render(request, "error.html", 500, title="The console failed",
                              message=f"{exc.__class__.__name__}: {exc}; the console's log has the details")

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, exc: Forbidden) -> Response:
        identity = getattr(request.state, "identity", None)
        audit(identity.user if identity else "-", "refused", {"path": request.url.path}, outcome="forbidden",
              detail=exc.reason, role=identity.role if identity else None)
        return console.render(request, "error.html", 403, title="Not allowed", message=exc.reason)

    return app
