"""Beat without a single point of failure: several beats, one schedule lease on the broker.

What lives here: ``lease`` (``Lease``: the exclusive queue ``kit.beat.lease`` on a
heartbeat connection of its own; whoever holds it schedules), ``state`` (each
entry's last run, kept on the broker in ``kit.beat.state`` so a beat that takes
the lease goes on where the last one stopped), ``scheduler`` (``LeasedScheduler``,
Celery's persistent scheduler gated by the lease: the app's ``beat_scheduler``,
``service.beat.scheduler:LeasedScheduler``) and ``rights`` (what beat's broker
user must be allowed, checked before beat starts). The guarantee is stated in
``scheduler`` and the README ("Beat").

May import: ``service.queues``, ``service.settings``, ``service.connection``,
``service.errors`` and Celery's beat. Never the command line, the dlq tools or
the local stack; the workers and the client do not import it.
"""

from service.beat.lease import LEASE_HEARTBEAT_S, Lease, LeaseLost, LeaseUnavailable, poll_interval
from service.beat.rights import check_rights
from service.beat.state import ScheduleState, StateUnreadable

__all__ = ["LEASE_HEARTBEAT_S", "Lease", "LeaseLost", "LeaseUnavailable", "ScheduleState", "StateUnreadable",
           "check_rights", "poll_interval"]
