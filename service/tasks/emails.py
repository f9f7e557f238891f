"""Send one e-mail through the configured SMTP server (KIT_SMTP_*).

Errors are sorted for the worker: anything that may pass on a later attempt
(connection refused or reset, timeouts, SMTP 4xx replies, a dropped
connection) is raised as it is and retried with backoff; what cannot pass
(SMTP 5xx replies, an invalid address or header) raises PermanentError and
is dead-lettered at once.

The Message-ID is derived from the task id, so a message delivered twice
(a worker lost after the server accepted it) is recognisable as one.
"""

from __future__ import annotations

import logging
import smtplib
import uuid
from collections.abc import Sequence
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

from celery import Task

from service.app import app
from service.errors import PermanentError
from service.settings import load

logger = logging.getLogger(__name__)

_MAX_RECIPIENTS = 100


def _is_permanent(code: int) -> bool:
    return 500 <= code <= 599


def _reply_text(reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    return " ".join(text.split())[:300]


def _address(value: Any, field: str) -> str:
    """``value`` checked as a bare address (local@domain); PermanentError if it is not one."""
    if not isinstance(value, str) or not value.strip():
        raise PermanentError(f"{field} must be a non-empty e-mail address, got {value!r}")
    addr = value.strip()
    try:
        parsed = Address(addr_spec=addr)
    except (ValueError, IndexError, HeaderParseError) as exc:  # email's parser raises all three
        raise PermanentError(f"{field} {addr!r} is not a valid e-mail address: {exc}") from None
    if not parsed.username or not parsed.domain or parsed.addr_spec != addr:
        raise PermanentError(f"{field} {addr!r} is not a valid e-mail address (expected local@domain)")
    return addr


def _recipients(to: str | Sequence[str]) -> list[str]:
    items = [to] if isinstance(to, str) else to
    if not isinstance(items, Sequence) or not items:
        raise PermanentError(f"to must be an address or a non-empty list of addresses, got {to!r}")
    if len(items) > _MAX_RECIPIENTS:
        raise PermanentError(f"{len(items)} recipients in one message; the limit is {_MAX_RECIPIENTS}")
    return [_address(item, "recipient") for item in items]


def message_id_for(task_id: str, mail_from: str) -> str:
    """The Message-ID of the e-mail sent by task ``task_id``: the same on every attempt."""
    domain = mail_from.rpartition("@")[2] or "localhost"
    return f"<{task_id}@{domain}>"


def build_message(
    task_id: str, mail_from: str, to: list[str], subject: str, body: str, reply_to: str | None
) -> EmailMessage:
    """The EmailMessage to send; PermanentError if a header cannot be built (e.g. a newline in it)."""
    if not isinstance(subject, str) or not isinstance(body, str):
        raise PermanentError("subject and body must be strings")
    msg = EmailMessage()
    try:
        msg["From"] = mail_from
        msg["To"] = ", ".join(to)
        msg["Subject"] = subject
        if reply_to:
            msg["Reply-To"] = _address(reply_to, "reply_to")
        msg["Date"] = formatdate(localtime=False, usegmt=True)
        msg["Message-ID"] = message_id_for(task_id, mail_from)
        msg.set_content(body)
    except (ValueError, TypeError) as exc:
        raise PermanentError(f"cannot build the e-mail: {exc}") from None
    return msg


@app.task(name="emails.send", bind=True)
def send(
    self: Task, to: str | list[str], subject: str, body: str, reply_to: str | None = None
) -> dict[str, Any]:
    """Send a plain-text e-mail from KIT_MAIL_FROM to ``to`` (one address or a list).

    Promises: the Message-ID is ``<task id@sender domain>`` on every attempt;
    transient failures (network, timeouts, SMTP 4xx, disconnects) are raised
    unchanged and retried; SMTP 5xx replies and invalid addresses raise
    PermanentError naming the code and the recipient. When the server accepts
    some recipients and refuses others, the mail has gone out: the task
    succeeds and returns the refused ones rather than re-sending to all.
    Returns ``{"message_id": ..., "refused": {address: "code text"}}``.
    """
    settings = load()
    recipients = _recipients(to)
    mail_from = _address(settings.mail_from, "KIT_MAIL_FROM")
    task_id = self.request.id or uuid.uuid4().hex  # called directly, not as a task
    msg = build_message(task_id, mail_from, recipients, subject, body, reply_to)
    try:
        with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=settings.smtp_timeout) as smtp:
            refused = smtp.send_message(msg, from_addr=mail_from, to_addrs=recipients)
    except smtplib.SMTPRecipientsRefused as exc:
        # Every recipient was refused. Permanent only if every refusal is 5xx.
        details = {rcpt: (code, _reply_text(text)) for rcpt, (code, text) in exc.recipients.items()}
        if details and all(_is_permanent(code) for code, _ in details.values()):
            listed = "; ".join(f"{rcpt}: {code} {text}" for rcpt, (code, text) in details.items())
            raise PermanentError(f"SMTP server refused every recipient: {listed}") from None
        raise
    except smtplib.SMTPNotSupportedError as exc:
        # E.g. a non-ASCII address and a server without SMTPUTF8: no retry can fix it.
        raise PermanentError(f"SMTP server does not support what this message needs: {exc}") from None
    except smtplib.SMTPResponseException as exc:
        # Sender refused, DATA refused, HELO/connect refused: 5xx is final, 4xx is retried.
        if _is_permanent(exc.smtp_code):
            what = type(exc).__name__
            extra = f" (sender {exc.sender})" if isinstance(exc, smtplib.SMTPSenderRefused) else ""
            raise PermanentError(
                f"SMTP server answered {exc.smtp_code} {_reply_text(exc.smtp_error)} "
                f"({what}) sending to {', '.join(recipients)}{extra}"
            ) from None
        raise
    refused_text = {rcpt: f"{code} {_reply_text(text)}" for rcpt, (code, text) in refused.items()}
    if refused_text:
        # Sent to the others; retrying would send it to them twice. Results are not
        # stored (task_ignore_result), so the log is where the refusals show.
        logger.warning("e-mail %s sent, but refused for: %s", msg["Message-ID"], refused_text)
    return {"message_id": msg["Message-ID"], "refused": refused_text}
