"""``python -m service publish``: publish one task and print its id once the broker confirmed it."""

from __future__ import annotations

import click

from service import queues
from service.cli.base import friendly_errors, json_option


@click.command()
@click.argument("name")
@click.option("--args", "args_json", metavar="JSON", help="Positional arguments as a JSON array.")
@click.option("--kwargs", "kwargs_json", metavar="JSON", help="Keyword arguments as a JSON object.")
@click.option("--priority", default=queues.DEFAULT_PRIORITY, show_default=True,
              type=click.Choice(list(queues.PRIORITIES)), help="Named priority.")
@click.option("--queue", type=click.Choice(list(queues.WORK_QUEUE_NAMES)),
              help="Work queue (default: the task's route in service/queues.py).")
@click.option("--countdown", type=click.FloatRange(min=0), help="Seconds to wait in the broker before it runs.")
@click.option("--task-id", help="Task id to use (default: a new UUID).")
@friendly_errors
def publish(name: str, args_json: str | None, kwargs_json: str | None, priority: str,
            queue: str | None, countdown: float | None, task_id: str | None) -> None:
    """Publish task NAME and print its id once the broker confirmed it.

    Example: python -m service publish emails.send --kwargs '{"to": "a@example.com",
    "subject": "Hi", "body": "Hello"}' --priority high
    """
    from service.client import Publisher

    args = json_option(args_json, "--args", list)
    kwargs = json_option(kwargs_json, "--kwargs", dict)
    with Publisher() as publisher:
        click.echo(publisher.publish(name, args, kwargs, priority=priority, queue=queue,
                                     countdown=countdown, task_id=task_id))
