"""Exceptions the kit raises, each with a message that says what to do.

The command line prints ``KitError`` messages without a stack trace. This module
holds the root (``KitError``) and the errors several features share (the
broker's, start-up's, publishing's); an error of one feature lives beside it:
``settings.ConfigError``, ``topology.TopologyConflict``,
``deadletters.DeadLetterError``, ``broker.ProvisioningError``,
``stack.StackError``. It imports nothing of the kit.
"""

from __future__ import annotations


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


class ResultBackendUnavailable(KitError):
    """The result backend (KIT_RESULT_BACKEND) could not be reached or did not answer in time,
    or a feature that needs one (``task cancel``) was asked for without one."""


class InvalidTaskInput(KitError, ValueError):
    """A publish was refused before anything was sent: bad name, queue, priority or payload."""


class PermanentError(Exception):
    """Raised by a task when retrying cannot help (a 4xx answer, a bad address).

    The worker dead-letters the message at once, with reason ``permanent-error``.
    """
