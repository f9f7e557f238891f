"""The console's state-changing requests (POST only, each with its CSRF token): log in and out,
dry-run and confirm a replay, preview and confirm a purge, refresh the snapshot.

Replay and purge are operator actions and come in two steps: the dry run
(replay) or preview (purge) shows exactly what would move or go, and only its
confirmation, naming the count, changes anything (service.console.jobs).
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from service import queues
from service.console.auth import COOKIE, LOGIN_COOKIE, Forbidden, NotLoggedIn, new_login_token, set_session_cookie
from service.console.jobs import PURGE, REPLAY
from service.console.pages import console, identity
from service.console.query import QueryError, read_selection
from service.console.users import UsersFileError, password_matches, read_users
from service.errors import KitError

logger = logging.getLogger(__name__)
router = APIRouter()
#: A hash checked when the user name is unknown, so the answer takes as long as for a known one.
_DUMMY_HASH = "scrypt$32768$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 43 + "="


def _safe_next(target: str | None) -> str:
    """Where to go after the login: a path of the console only (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or urlsplit(target).netloc:
        return "/"
    return target


@router.get("/login")
def login_form(request: Request, next: str = "/") -> Response:  # noqa: A002 - the parameter's name in the URL
    """The login form."""
    c = console(request)
    token = new_login_token()
    response = c.render(request, "login.html", identity=None, login_token=token, next=_safe_next(next), error=None)
    response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict",
                        secure=c.settings.console_cookie_secure, path="/login")
    return response


@router.post("/login")
async def login(request: Request) -> Response:
    """Check the user's password; 429 after too many failures from this address or for this user."""
    c = console(request)
    form = await request.form()
    user, typed = str(form.get("username", "")).strip(), str(form.get("password", ""))
    target = _safe_next(str(form.get("next", "/")))
    c.auth.check_post(request, None, str(form.get("csrf_token", "")), request.cookies.get(LOGIN_COOKIE))
    address = request.client.host if request.client else "-"
    keys = (f"address:{address}", f"user:{user}")

    def again(status: int, error: str) -> Response:
        token = new_login_token()
        response = c.render(request, "login.html", status, identity=None, login_token=token, next=target,
                            error=error)
        response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict",
                            secure=c.settings.console_cookie_secure, path="/login")
        return response

    wait = c.limiter.retry_after(*keys)
    if wait > 0:
        c.audit(user or "-", "login", outcome="rate-limited", detail=f"address {address}")
        response = again(429, f"Too many failed logins: try again in {int(wait) + 1} s.")
        response.headers["Retry-After"] = str(int(wait) + 1)
        return response
    try:
        listed = read_users(c.settings.console_users_file).get(user)
    except UsersFileError as exc:
        logger.error("console: %s", exc)
        return again(503, "The console's users file cannot be read; see the console's log.")
    stored = listed.password_hash if listed else _DUMMY_HASH
    matches = await run_in_threadpool(password_matches, typed, stored)
    if listed is None or not matches:
        c.limiter.failed(*keys)
        c.audit(user or "-", "login", outcome="failed", detail=f"address {address}")
        return again(401, "Wrong user name or password.")
    c.limiter.succeeded(*keys)
    session = c.sessions.open(listed.name, listed.role)
    c.audit(listed.name, "login", role=listed.role, detail=f"address {address}")
    response = RedirectResponse(target, status_code=303)
    set_session_cookie(response, session.token, c.settings.console_cookie_secure)
    response.delete_cookie(LOGIN_COOKIE, path="/login")
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    """End the session."""
    c = console(request)
    form = await request.form()
    try:
        who = identity(request)
    except NotLoggedIn:
        return RedirectResponse("/login", status_code=303)
    c.auth.check_post(request, who, str(form.get("csrf_token", "")))
    c.sessions.close(request.cookies.get(COOKIE))
    c.audit(who.user, "logout", role=who.role)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


async def _checked(request: Request, operator_for: str | None = None) -> tuple[Any, Any, Any]:
    """(console, identity, form) of a POST whose CSRF token (and role, when ``operator_for``) is right."""
    c = console(request)
    form = await request.form()
    who = identity(request)
    c.auth.check_post(request, who, str(form.get("csrf_token", "")))
    if operator_for:
        c.auth.require_operator(who, operator_for)
    return c, who, form


@router.post("/refresh")
async def refresh(request: Request) -> Response:
    """Read the queues again now (the overview's button)."""
    c, who, form = await _checked(request)
    c.refresher.request()
    await run_in_threadpool(c.refresher.wait_round, 30.0)
    return RedirectResponse(_safe_next(str(form.get("next", "/"))), status_code=303)


def _rate(form: Any) -> float | None:
    raw = str(form.get("rate", "")).strip()
    if not raw:
        return None
    try:
        rate = float(raw)
    except ValueError:
        raise QueryError(f"rate {raw!r} is not a number: give messages per second, e.g. 10") from None
    if not 0.1 <= rate <= 10_000:
        raise QueryError(f"rate {rate:g} is outside 0.1 to 10000 messages per second")
    return rate


def _target(form: Any) -> str | None:
    to = str(form.get("to", "")).strip() or None
    if to is not None and to not in queues.WORK_QUEUE_NAMES:
        raise QueryError(f"{to!r} is no work queue; the work queues are {', '.join(queues.WORK_QUEUE_NAMES)}")
    return to


@router.post("/replay/dry-run")
async def replay_dry_run(request: Request) -> Response:
    """Find exactly what a replay would move, and where to; nothing changes."""
    return await _dry_run(request, REPLAY)


@router.post("/purge/preview")
async def purge_preview(request: Request) -> Response:
    """Find exactly what a purge would delete; nothing changes."""
    return await _dry_run(request, PURGE)


async def _dry_run(request: Request, kind: str) -> Response:
    c, who, form = await _checked(request, operator_for=f"a {kind}")
    try:
        selection = read_selection(form)
        to, rate = (_target(form), _rate(form)) if kind == REPLAY else (None, None)
        plan = await run_in_threadpool(c.jobs.dry_run, kind, who.user, selection.queues, selection.filters,
                                       selection.shown(), to, rate)
    except KitError as exc:
        return c.render(request, "error.html", 400 if isinstance(exc, QueryError) else 503,
                        title=f"The {kind} dry run failed", message=str(exc))
    c.audit(who.user, f"{kind}-dry-run", selection.shown(), {"would": plan.count, "refused": plan.refused_count},
            role=who.role)
    return c.render(request, "plan.html", plan=plan, selection=selection)


@router.post("/replay/confirm")
async def replay_confirm(request: Request) -> Response:
    """Carry out a replay's dry run; the browser goes to the job's progress page."""
    return await _confirm(request, REPLAY)


@router.post("/purge/confirm")
async def purge_confirm(request: Request) -> Response:
    """Carry out a purge's preview (archive first); the browser goes to the job's progress page."""
    return await _confirm(request, PURGE)


async def _confirm(request: Request, kind: str) -> Response:
    c, who, form = await _checked(request, operator_for=f"a {kind}")
    try:
        plan = c.jobs.plan(str(form.get("plan", "")), who.user)
        if plan.kind != kind:
            raise Forbidden(f"that dry run is for a {plan.kind}, not a {kind}")
        if str(form.get("count", "")) != str(plan.count):
            raise KitError(f"the confirmation names {form.get('count')!r} letters, the dry run found {plan.count}; "
                           "run the dry run again")
        job = c.jobs.start(plan)
    except Forbidden:
        raise
    except KitError as exc:
        return c.render(request, "error.html", 409, title=f"The {kind} was not started", message=str(exc))
    c.audit(who.user, f"{kind}-start", plan.filters, {"letters": plan.count}, role=who.role)
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)
