"""Who is asking: the console's login, a trusted proxy's user header, roles and CSRF.

- A request carries the session cookie (``COOKIE``) of a login (service.console.sessions),
  or, only when KIT_CONSOLE_PROXY_USER_HEADER is set and the request comes
  from an address of KIT_CONSOLE_TRUSTED_PROXIES, the proxy's user header.
  A proxied user's role is the users file's, else viewer.
- Every state-changing request is a POST that must carry the session's CSRF
  token (form field ``csrf_token``) and, when the browser sends one, an Origin
  of the console itself (the request's Host, or KIT_CONSOLE_URL's); anything else is 403. The login form carries a token
  of its own, bound to a cookie (double submit), as there is no session yet.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import Request, Response

from service.console.sessions import Session, Sessions
from service.console.users import OPERATOR, VIEWER, read_users
from service.settings import Settings

COOKIE = "kit_console_session"
LOGIN_COOKIE = "kit_console_login"


class NotLoggedIn(Exception):
    """The request has no live session: the pages send the browser to /login."""


class Forbidden(Exception):
    """The request is refused (403): wrong role, missing or wrong CSRF token, foreign origin."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Identity:
    """The user of a request, their role and their session."""

    user: str
    role: str
    session: Session

    @property
    def operator(self) -> bool:
        """True when the user may replay, purge, export and see arguments."""
        return self.role == OPERATOR


class Authenticator:
    """Finds the identity of requests and checks their CSRF token."""

    def __init__(self, settings: Settings, sessions: Sessions) -> None:
        self.settings = settings
        self.sessions = sessions
        self.proxy_header = settings.console_proxy_user_header.strip().lower()
        self.trusted = {a.strip() for a in settings.console_trusted_proxies.split(",") if a.strip()}

    def identify(self, request: Request) -> Identity:
        """The identity of ``request``; NotLoggedIn when it has none."""
        session = self.sessions.get(request.cookies.get(COOKIE))
        proxied = self._proxied_user(request)
        if proxied is not None:
            if session is None or session.user != proxied:
                role = self.role_of(proxied)
                session = self.sessions.open(proxied, role)
                request.state.new_session = session.token
            return Identity(proxied, session.role, session)
        if session is None:
            raise NotLoggedIn()
        return Identity(session.user, session.role, session)

    def role_of(self, user: str) -> str:
        """The role the users file gives ``user``; viewer when it lists no such user."""
        listed = read_users(self.settings.console_users_file).get(user)
        return listed.role if listed else VIEWER

    def _own_hosts(self, request: Request) -> set[str]:
        """The console's own host[:port]: the request's Host, and KIT_CONSOLE_URL's (a proxy may rewrite Host)."""
        hosts = {request.headers.get("host", "")}
        if self.settings.console_url:
            hosts.add(urlsplit(self.settings.console_url).netloc)
        return hosts

    def _proxied_user(self, request: Request) -> str | None:
        if not self.proxy_header or request.client is None or request.client.host not in self.trusted:
            return None
        value = request.headers.get(self.proxy_header, "").strip()
        return value or None

    def check_post(self, request: Request, identity: Identity | None, token: str | None,
                   login_token: str | None = None) -> None:
        """Forbidden unless the POST carries the right CSRF token and no foreign Origin."""
        origin = request.headers.get("origin")
        if origin and origin != "null" and urlsplit(origin).netloc not in self._own_hosts(request):
            raise Forbidden("the request comes from another site (Origin header)")
        if origin == "null":
            raise Forbidden("the request comes from an opaque origin")
        expected = identity.session.csrf if identity else login_token
        if not token or not expected or not hmac.compare_digest(token, expected):
            raise Forbidden("the form's CSRF token is missing or wrong; reload the page and try again")

    @staticmethod
    def require_operator(identity: Identity, what: str) -> None:
        """Forbidden unless ``identity`` is an operator."""
        if not identity.operator:
            raise Forbidden(f"{what} needs the operator role; {identity.user} is a {identity.role}")


def new_login_token() -> str:
    """A random token for the login form's double submit."""
    return secrets.token_urlsafe(32)


def set_session_cookie(response: Response, token: str, secure: bool) -> None:
    """Set the session cookie: HttpOnly, SameSite=Strict, Secure when ``secure`` (KIT_CONSOLE_COOKIE_SECURE)."""
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=secure, path="/")
