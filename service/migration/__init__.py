"""Moving a deployment between the classic and the quorum topology, messages included (``topology migrate``).

RabbitMQ cannot change a queue's type, and both profiles (``service.queues``)
give their queues the same names. So each queue of the other type is
re-created, with a holding queue, ``<name>.migrating``, of the target type,
that has the queue's dead-lettering but no TTL:

1. the holding queue takes the queue's binding (bound first, then the queue
   unbound: a task published in that instant reaches both, none reaches neither),
   so publishers that keep running lose nothing and the queue stops filling;
2. the queue's messages move into the holding queue, without ``expiration``
   (kept in a header), and the queue is deleted and declared again with the
   target profile's arguments;
3. it takes its binding back from the holding queue, and the messages move
   back, expiration restored; the holding queue is deleted.

Each step is done for every queue before the next one, so that one pause
(``SETTLE_S``) after each change of bindings lets what was routed just
before it arrive. Every move is confirmed, then acked: a message leaves a
queue only once the broker confirmed its copy, so a kill at any moment loses
nothing and duplicates at most one window (``WINDOW``) of messages. A rerun
finishes what a killed run left: it finds the holding queues and goes on. One
migration runs at a time (an exclusive queue, ``queues.MIGRATION_LOCK_QUEUE``);
it also holds the dead-letter queues' replay locks. A queue that would be
deleted while it has consumers is refused: stop the workers first. The other
profile's high lanes are emptied into their work queues (which take the lanes'
bindings meanwhile) and deleted.

What lives here: ``plan`` (what a migration would do, queue by queue; the dry
run), ``messages`` (what a moved message keeps: body, headers, properties,
routing key, expiration), ``mover`` (confirmed-then-acked moves between queues)
and ``run`` (``migrate``). Import the names below from ``service.migration``.

May import: ``service.queues``, ``service.headers``, ``service.errors``,
``service.settings``, ``service.publishing``, ``service.topology`` and the
dead-letter locks of ``service.deadletters``. Never the command line; the
workers, beat and the client do not import this package.
"""

from service.migration.messages import held_message, restored_expiration, restored_message
from service.migration.mover import QUIET_S, REPORT_EVERY, SETTLE_S, STALL_S, WINDOW, Step
from service.migration.plan import MigrationError, Plan, QueuePlan, plan, require_idle
from service.migration.run import Outcome, migrate

__all__ = [
    "QUIET_S", "REPORT_EVERY", "SETTLE_S", "STALL_S", "WINDOW", "MigrationError", "Outcome", "Plan", "QueuePlan",
    "Step", "held_message", "migrate", "plan", "require_idle", "restored_expiration", "restored_message",
]
