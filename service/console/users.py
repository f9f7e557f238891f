"""The console's users: a file of ``name:role:hash`` lines, one per user.

``role`` is ``viewer`` (reads) or ``operator`` (also replays, purges, exports and
sees task arguments). ``hash`` is ``scrypt$<n>$<r>$<p>$<salt>$<key>`` (hashlib's
scrypt, base64 salt and key), so the file holds no password. No user exists
until ``add_user`` (``python -m service console add-user``) writes one: there
is no default password. The file is written atomically and readable by its
owner only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from service.errors import KitError

VIEWER = "viewer"
OPERATOR = "operator"
ROLES = (VIEWER, OPERATOR)
#: Shortest password accepted.
MIN_PASSWORD_LENGTH = 12
#: scrypt's cost (2**15), block size and parallelism: about 50 ms and 32 MiB per check.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class UsersFileError(KitError):
    """The users file cannot be read or written, or an entry is invalid."""


@dataclass(frozen=True)
class User:
    """A console user: name, role and password hash."""

    name: str
    role: str
    password_hash: str = ""

    @property
    def operator(self) -> bool:
        """True when the user may replay, purge, export and see arguments."""
        return self.role == OPERATOR


def hash_password(password: str, salt: bytes | None = None) -> str:
    """The scrypt hash of ``password`` as stored in the users file."""
    salt = salt or secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=_SCRYPT_MAXMEM)
    return "$".join(("scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P),
                     base64.b64encode(salt).decode(), base64.b64encode(key).decode()))


def password_matches(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (constant-time compare; False for a malformed hash)."""
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(key)
        actual = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                                maxmem=_SCRYPT_MAXMEM, dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def check_name(name: str) -> str:
    """``name`` when it is a valid user name; UsersFileError otherwise."""
    if not _NAME.match(name):
        raise UsersFileError(f"user name {name!r} is not accepted: use 1 to 64 letters, digits and . _ @ -, "
                             "starting with a letter or digit")
    return name


def check_role(role: str) -> str:
    """``role`` when it is viewer or operator; UsersFileError otherwise."""
    if role not in ROLES:
        raise UsersFileError(f"role {role!r} is not one of {', '.join(ROLES)}")
    return role


def check_password(password: str) -> str:
    """``password`` when it is long enough; UsersFileError otherwise."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UsersFileError(f"the password has {len(password)} characters; use at least {MIN_PASSWORD_LENGTH} "
                             "(e.g. `openssl rand -base64 18`)")
    return password


def read_users(path: str | Path) -> dict[str, User]:
    """Every user of the file, by name; empty when the file does not exist.

    Raises UsersFileError naming the line of a malformed entry or why the file cannot be read.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UsersFileError(f"cannot read the console's users file {path}: {exc.strerror}") from None
    users: dict[str, User] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.strip().split(":")
        if len(parts) != 3 or parts[1] not in ROLES or not parts[2].startswith("scrypt$"):
            raise UsersFileError(f"{path}:{number}: not a `name:role:scrypt$...` entry (role viewer or "
                                 "operator); fix or delete the line, or add users with `console add-user`")
        users[parts[0]] = User(parts[0], parts[1], parts[2])
    return users


def add_user(path: str | Path, name: str, role: str, password: str) -> bool:
    """Add user ``name`` with ``role`` and ``password``, or replace its role and password.

    Returns True when the user is new. The file is replaced atomically (0600).
    """
    check_name(name)
    check_role(role)
    check_password(password)
    path = Path(path)
    users = read_users(path)
    created = name not in users
    users[name] = User(name, role, hash_password(password))
    _write(path, users)
    return created


def remove_user(path: str | Path, name: str) -> bool:
    """Remove user ``name``; False when there was none."""
    path = Path(path)
    users = read_users(path)
    if users.pop(name, None) is None:
        return False
    _write(path, users)
    return True


def _write(path: Path, users: dict[str, User]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write("# The dead-letter console's users (python -m service console add-user): name:role:hash\n")
            for user in users.values():
                stream.write(f"{user.name}:{user.role}:{user.password_hash}\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        raise UsersFileError(f"cannot write the console's users file {path}: {exc.strerror}") from None
