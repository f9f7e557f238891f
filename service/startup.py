"""Start-up checks of workers and beat: what cannot work ends the process with one line.

Left alone, Celery prints a 60-line traceback for a refused login, reconnects
forever to a vhost that does not exist, and beat with a wrong password sits
silent until its first schedule is due. So before either starts (service.app
runs these from Celery's signals), one connection is opened with
service.connection.connect, and what stands in the way ends the process:
``error: <what is wrong and what to do>`` on stderr, exit status 2, within
KIT_CONNECT_TIMEOUT for a broker that does not answer and at once for what
cannot heal (a refused login, a missing vhost, no permission, TLS).

Only the start is checked: a worker whose broker goes away later keeps
reconnecting, as Celery does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import NoReturn

from service import queues
from service.connection import connect, user_and_vhost
from service.errors import KitError, StartupError
from service.settings import ConfigError, Settings, load

#: Exit status of a worker or beat that cannot start (the command line's too, service.cli.base).
EXIT_STARTUP = 2
#: Missing exchanges and queues named in the message; the rest are counted.
_NAMED = 3


def work_queues(names: Iterable[str] | None) -> list[str]:
    """The work queues named (all of them for None or none), or StartupError naming the known ones."""
    chosen = [n.strip() for n in (names or ()) if n.strip()] or list(queues.WORK_QUEUE_NAMES)
    for name in chosen:
        try:
            queues.work_queue(name)
        except ValueError as exc:
            raise StartupError(f"--queues/-Q: {exc}") from None
    return chosen


def check_worker(queue_names: Iterable[str] | None, settings: Settings | None = None) -> None:
    """Everything a worker needs before it consumes ``queue_names`` (None: every work queue).

    The queues are work queues; the broker lets the user in; with
    KIT_DECLARE_TOPOLOGY the topology is declared (TopologyConflict on drift,
    BrokerRefused when the user may not), without it the topology must exist.
    """
    work_queues(queue_names)
    settings = settings or load()
    conn = connect(settings)
    try:
        profile = queues.topology(settings.queue_type)
        if settings.declare_topology:
            from service.topology import declare

            declare(conn, profile)
            return
        from service.topology import missing

        absent = missing(conn, profile=profile)  # the whole topology: retries and dead letters need theirs too
        if absent:
            _, vhost = user_and_vhost(settings.broker_url)
            named = ", ".join(f"{d.kind} {d.name!r}" for d in absent[:_NAMED])
            more = f" and {len(absent) - _NAMED} more" if len(absent) > _NAMED else ""
            raise StartupError(
                f"{named}{more} missing in vhost {vhost!r}, and this "
                "worker does not declare the topology (KIT_DECLARE_TOPOLOGY=false). Load the broker's "
                "definitions (`python -m service broker provision`) or run `python -m service topology "
                "declare` as the kit's admin."
            )
    finally:
        conn.release()


def check_beat(settings: Settings | None = None) -> None:
    """What beat needs before it schedules anything: a broker that lets its user in, and the rights on its
    schedule lease and state (``service.beat.rights``): else BrokerRefused naming the right."""
    from service.beat.rights import check_rights

    settings = settings or load()
    conn = connect(settings)
    try:
        check_rights(conn, settings.queue_type)
    finally:
        conn.release()


def exit_with(error: BaseException) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr and end the process with EXIT_STARTUP."""
    message = " ".join(str(error).split())
    # The real stderr: beat has already redirected sys.stderr into its log (one prefixed line more).
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"error: {message}\n")
    stream.flush()
    raise SystemExit(EXIT_STARTUP)


def run_or_exit(check: Callable[[], None]) -> None:
    """Run a start-up check; a KitError or ConfigError ends the process with one line (``exit_with``)."""
    try:
        check()
    except (KitError, ConfigError) as exc:
        exit_with(exc)
