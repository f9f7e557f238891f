"""Exceptions the kit raises, each with a message that says what to do.

The command line prints ``KitError`` messages without a stack trace.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.topology import Drift


class KitError(Exception):
    """Base class: an error whose message is meant for an operator."""


class BrokerUnavailable(KitError):
    """The broker could not be reached, or did not confirm in time."""


class BrokerRefused(BrokerUnavailable):
    """The broker answered but refused: retrying cannot help until someone fixes the cause.

    A login refused (403 ACCESS_REFUSED: wrong user or password), a vhost that does
    not exist or that the user may not use (530 NOT_ALLOWED), a right the user lacks
    (403 on a declare), a certificate that does not verify. Raised at once, never
    after retrying until a deadline; the message names the user, vhost or resource
    and the fix. A BrokerUnavailable, so callers that catch that catch this too.
    """


class StartupError(KitError):
    """A worker or beat cannot start as configured: an unknown queue, a missing topology."""


class PublishError(KitError):
    """The broker refused a message (nack or unroutable); nothing was queued."""


class InvalidTaskInput(KitError, ValueError):
    """A publish was refused before anything was sent: bad name, queue, priority or payload."""


class TopologyConflict(KitError):
    """A live queue or exchange was declared with other arguments than the code wants."""

    def __init__(self, drift: Drift) -> None:
        self.drift = drift
        super().__init__(
            f"{drift.kind} {drift.name!r} already exists on the broker with "
            f"{drift.argument}={drift.live}, but service/queues.py wants "
            f"{drift.argument}={drift.wanted}. RabbitMQ cannot change a {drift.kind}'s "
            f"arguments in place. To fix it: stop the workers of this {drift.kind}, move "
            f"or drain its messages, delete it (rabbitmqctl delete_{drift.kind} "
            f"{drift.name} -p <vhost>; queues only, exchanges via the management UI), "
            "then run `python -m service topology declare`."
        )


class PermanentError(Exception):
    """Raised by a task when retrying cannot help (a 4xx answer, a bad address).

    The worker dead-letters the message at once, with reason ``permanent-error``.
    """


class DeadLetterError(KitError):
    """A dead-letter operation was asked something it cannot do (bad queue, filter, id)."""
