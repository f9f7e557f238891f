"""``python -m service broker definitions|provision``: users, permissions and topology as RabbitMQ definitions."""

from __future__ import annotations

from pathlib import Path

import click

from service import queues
from service.cli.base import friendly_errors
from service.settings import ConfigError, load, read_secret


@click.group()
def broker() -> None:
    """Broker users, permissions and topology as RabbitMQ definitions (no guest user).

    Passwords are read from DIR/rabbitmq_<role>_password for the roles admin,
    publisher, worker, monitor and console (see deploy/rabbitmq/README.md).
    """


_secrets_dir = click.option("--secrets-dir", required=True, type=click.Path(file_okay=False),
                            help="Directory of the rabbitmq_<role>_password files.")
_vhost = click.option("--vhost", default="kit", show_default=True, help="The kit's vhost.")
_user_prefix = click.option("--user-prefix", default="kit-", show_default=True,
                            help="Prefix of the user names: <prefix>admin, <prefix>publisher, ...")

_queue_type = click.option("--queue-type", type=click.Choice(queues.QUEUE_TYPES), envvar="KIT_QUEUE_TYPE",
                           default=queues.DEFAULT_QUEUE_TYPE, show_default=True,
                           help="Topology profile of the queues (default: KIT_QUEUE_TYPE): quorum for a cluster.")


@broker.command("definitions")
@_secrets_dir
@_vhost
@_user_prefix
@_queue_type
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="File to write (mode 0600: it holds password hashes); for load_definitions.")
@friendly_errors
def broker_definitions(secrets_dir: str, vhost: str, user_prefix: str, queue_type: str, out: str) -> None:
    """Write the definitions: vhost, users, permissions and the whole topology."""
    from service.broker import definitions, read_passwords, write_definitions

    defs = definitions(vhost, read_passwords(secrets_dir), user_prefix, queue_type)
    write_definitions(defs, out)
    click.echo(f"wrote {out}: vhost {vhost}, users {', '.join(u['name'] for u in defs['users'])}, "
               f"{len(defs['exchanges'])} exchanges, {len(defs['queues'])} queues")


@broker.command("provision")
@_secrets_dir
@_vhost
@_user_prefix
@_queue_type
@click.option("--management-url", help="RabbitMQ's management API, without credentials "
                                       "(default: KIT_ADMIN_URL, http://127.0.0.1:15672).")
@click.option("--admin-user", help="An administrator of the broker (default: KIT_ADMIN_USER, kit-admin).")
@click.option("--admin-password-file", type=click.Path(dir_okay=False),
              help="File with that administrator's password (default: KIT_ADMIN_PASSWORD_FILE, else "
                   "the admin role's file in --secrets-dir).")
@friendly_errors
def broker_provision(secrets_dir: str, vhost: str, user_prefix: str, queue_type: str, management_url: str | None,
                     admin_user: str | None, admin_password_file: str | None) -> None:
    """Create or update the vhost, users, permissions and topology over the management API (idempotent)."""
    from service.broker import SECRET_FILE, definitions, provision, read_passwords

    settings = load()
    management_url = management_url or settings.admin_url
    admin_user = admin_user or settings.admin_user
    if "@" in management_url.split("://", 1)[-1].split("/", 1)[0]:
        raise ConfigError("--management-url/KIT_ADMIN_URL must not hold credentials; use --admin-password-file")
    defs = definitions(vhost, read_passwords(secrets_dir), user_prefix, queue_type)
    path = Path(admin_password_file or settings.admin_password_file
                or Path(secrets_dir) / SECRET_FILE.format(role="admin"))
    admin_password = read_secret(path, unreadable=f"the admin password file {str(path)!r} cannot be read: {{error}}",
                                 empty=f"the admin password file {str(path)!r} is empty")
    provision(defs, management_url, admin_user, admin_password)
    click.echo(f"provisioned vhost {vhost} at {management_url}: users "
               f"{', '.join(u['name'] for u in defs['users'])}, {len(defs['exchanges'])} exchanges, "
               f"{len(defs['queues'])} queues")
