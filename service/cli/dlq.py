"""``python -m service dlq ...``: see, replay, purge, export and import dead letters."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from service import deadletters as dl
from service import queues
from service.cli.base import EXIT_FAILED, connected, friendly_errors
from service.deadletters import DeadLetterError, Filters, parse_moment, read_archive
from service.settings import load

out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, highlight=False)


def _moment(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return parse_moment(value)
    except DeadLetterError as exc:
        raise click.BadParameter(str(exc)) from None


def filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The filters every selecting command takes."""
    options = [
        click.option("--queue", "-q", "queue_names", multiple=True, metavar="QUEUE",
                     help="Work or dead-letter queue (default, default.dead), or unroutable (unroutable.dead); "
                          "repeatable. Default: all."),
        click.option("--task", "tasks", multiple=True, metavar="PATTERN",
                     help="Task name or pattern (emails.*); repeatable."),
        click.option("--exception", "exceptions", multiple=True, metavar="PATTERN",
                     help="Exception class, short or qualified, or pattern (*Timeout*); repeatable."),
        click.option("--reason", "reasons", multiple=True, metavar="REASON",
                     help="kit-reason (retries-exhausted, permanent-error, ..., unroutable); repeatable."),
        click.option("--id", "ids", multiple=True, metavar="ID", help="Task id; repeatable."),
        click.option("--search", default="", metavar="TEXT",
                     help="Text in the exception's message or class name, any case (timeout finds TimeoutError)."),
        click.option("--since", callback=_moment, metavar="TIME",
                     help="Dead-lettered at or after: ISO 8601 (UTC if no zone) or an age (30m, 2h, 7d)."),
        click.option("--until", callback=_moment, metavar="TIME", help="Dead-lettered at or before (as --since)."),
        click.option("--limit", type=click.IntRange(min=1), help="At most this many messages."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _filters(kwargs: dict[str, Any]) -> Filters:
    return Filters(tasks=kwargs.pop("tasks"), exceptions=kwargs.pop("exceptions"), reasons=kwargs.pop("reasons"),
                   ids=kwargs.pop("ids"), since=kwargs.pop("since"), until=kwargs.pop("until"),
                   search=kwargs.pop("search"))


def _holder(command: str) -> str:
    """Who takes a lock for ``dlq COMMAND``: the OS user, host, pid and command (``root@box pid 7 (dlq replay)``)."""
    return dl.process_holder(f"dlq {command}")


def _json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group()
def dlq() -> None:
    """Dead letters: what died and why; replay, purge, export and import them.

    Listing and showing never change a queue. Replay, purge and import take a
    lock per queue (one refused names who holds it and since when); replay and
    purge republish or archive a message before removing it, and leave the
    messages they skip in place and in order.
    """


@dlq.command()
@click.option("--queue", "-q", "queue_names", multiple=True, metavar="QUEUE", help="Queue(s); default: all.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def stats(queue_names: tuple[str, ...], as_json: bool) -> None:
    """Per dead-letter queue: count, oldest, newest, and counts by task, exception and reason.

    unroutable.dead (tasks no work queue was bound for) also by routing key.
    """
    names = dl.resolve_queues(queue_names)
    with connected(load()) as conn:
        busy = {name: holder for name in names if (holder := dl.holder_of(conn, name)) is not None}
        results = [dl.stats(conn, name) for name in names]
    _warn_if_busy(busy, "counted")  # on standard error: the JSON stays whole
    if as_json:
        _json(results)
        return
    for result in results:
        out.print(f"[bold]{result['queue']}[/bold]: {result['count']} dead letter(s)"
                  + (f", oldest {result['oldest']}, newest {result['newest']}" if result["count"] else ""))
        for title, key in (("task", "by_task"), ("exception", "by_exception"), ("reason", "by_reason"),
                           ("routing key", "by_routing_key")):
            if result.get(key):
                out.print(f"  by {title}: " + ", ".join(f"{k} {v}" for k, v in result[key].items()))


@dlq.command("list")
@filter_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def list_(queue_names: tuple[str, ...], limit: int | None, as_json: bool, **kwargs: Any) -> None:
    """List dead letters (id, task, exception, attempts, source queue, routing key, when it died). Changes nothing."""
    filters = _filters(kwargs)
    rows: list[dict[str, Any]] = []
    names = dl.resolve_queues(queue_names)
    with connected(load()) as conn:
        busy = {name: holder for name in names if (holder := dl.holder_of(conn, name)) is not None}
        for name in names:
            rows += [dict(letter.summary(), queue=name) for letter in dl.browse(conn, name, filters)]
    rows = rows[:limit] if limit else rows
    if as_json:
        _json(rows)
        _warn_if_busy(busy)  # on standard error: the JSON stays whole
        return
    columns = ("queue", "position", "id", "task", "reason", "exception", "attempts", "replays", "source_queue",
               "routing_key", "died_at")
    if out.is_terminal:
        table = Table(*columns)
        for row in rows:
            table.add_row(*(escape("" if row[c] is None else str(row[c])) for c in columns))
        out.print(table)
    else:  # whole values, tab-separated, for grep/cut/awk
        click.echo("\t".join(columns))
        for row in rows:
            click.echo("\t".join("" if row[c] is None else str(row[c]) for c in columns))
    click.echo(f"{len(rows)} dead letter(s)")
    _warn_if_busy(busy)


@dlq.command()
@click.argument("letter_id", metavar="ID")
@click.option("--queue", "-q", "queue_names", multiple=True, metavar="QUEUE", help="Queue(s) to look in.")
@click.option("--hide-args", is_flag=True, help="Do not print the task's arguments (they may hold personal data).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def show(letter_id: str, queue_names: tuple[str, ...], hide_args: bool, as_json: bool) -> None:
    """Everything about one dead letter: reason, traceback, arguments, headers, x-death history."""
    with connected(load()) as conn:
        letter = dl.find(conn, dl.resolve_queues(queue_names), letter_id)
    info = letter.details(show_args=not hide_args)
    if as_json:
        _json(info)
        return
    for key in ("id", "task", "queue", "position", "reason", "retry_rule", "exception", "message", "attempts",
                "replays", "source_queue", "routing_key", "exchange", "first_failure_at", "last_failure_at", "died_at",
                "body_bytes"):
        out.print(f"[bold]{key:16}[/bold] {escape(str(info.get(key)))}")
    if not hide_args:
        out.print(f"[bold]{'args':16}[/bold] {escape(json.dumps(info['args']))}")
        out.print(f"[bold]{'kwargs':16}[/bold] {escape(json.dumps(info['kwargs']))}")
    if info["traceback"]:
        out.print("[bold]traceback[/bold]")
        out.print(info["traceback"], markup=False)
    if info["x_death"]:
        out.print("[bold]x-death[/bold] " + escape(json.dumps(info["x_death"], default=str)))
    out.print("[bold]headers[/bold] " + escape(json.dumps(info["headers"], default=str, sort_keys=True)))


def _warn_if_busy(busy: dict[str, dict[str, Any]], what: str = "listed") -> None:
    """One warning line per queue a replay, purge, import or the console's read holds (the messages it
    holds are invisible meanwhile)."""
    for name, holder in busy.items():
        click.echo(f"warning: {dl.holder_text(holder)} holds {name}: the messages it holds are not {what}",
                   err=True)


class _Reporter:
    """A progress bar on a terminal, nothing otherwise."""

    def __init__(self, total: int, label: str) -> None:
        self.progress = None
        if err.is_terminal and total:
            self.progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                     console=err, transient=True)
            self.task = self.progress.add_task(label, total=total)

    def __enter__(self) -> _Reporter:
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress:
            self.progress.stop()

    def __call__(self, letter: dl.DeadLetter, what: str) -> None:
        if self.progress:
            self.progress.advance(self.task)


def _summary(totals: dict[str, int], verbs: dict[str, str]) -> str:
    return ", ".join(f"{verbs.get(k, k)} {v}" for k, v in totals.items())


@dlq.command()
@filter_options
@click.option("--to", "to_queue", metavar="QUEUE", help="Work queue to replay into (default: each one's source).")
@click.option("--rate", type=click.FloatRange(min=0.1), help="At most N messages per second.")
@click.option("--dry-run", is_flag=True, help="Print exactly what would be replayed; change nothing.")
@click.option("--max-replays", type=click.IntRange(min=0),
              help="Refuse messages already replayed this many times (default: KIT_MAX_REPLAYS).")
@click.option("--force", is_flag=True, help="Replay even messages over the replay budget.")
@click.option("--batch", type=click.IntRange(min=1), default=dl.REPLAY_BATCH, show_default=True,
              help="Confirm N messages at a time: faster, but a kill may then replay up to N twice.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@friendly_errors
def replay(queue_names: tuple[str, ...], limit: int | None, to_queue: str | None, rate: float | None,
           dry_run: bool, max_replays: int | None, force: bool, batch: int, as_json: bool, **kwargs: Any) -> None:
    """Put matching dead letters back on their source queue, with a fresh retry budget.

    Each is republished and confirmed before it leaves the dead-letter queue;
    killing this command at any moment loses nothing. An unroutable task goes
    back to the work queue its routing key names; when that is no work queue it
    is refused: replay it with --to QUEUE.
    """
    filters = _filters(kwargs)
    settings = load()
    budget = settings.max_replays if max_replays is None else max_replays
    totals = {"taken": 0, "skipped": 0, "refused": 0, "failed": 0}
    listed: list[dict[str, Any]] = []
    over_budget = 0
    homeless: list[dl.DeadLetter] = []
    with connected(settings) as conn:
        for name in dl.resolve_queues(queue_names):
            remaining = None if limit is None else limit - totals["taken"] - totals["refused"]
            if remaining is not None and remaining <= 0:
                break
            total = len(dl.browse(conn, name, filters)) if err.is_terminal else 0
            with _Reporter(total, f"replaying {name}") as reporter:
                outcome = dl.replay(conn, settings, name, filters, to=to_queue, limit=remaining, rate=rate,
                                    max_replays=budget, force=force, dry_run=dry_run, batch=batch,
                                    progress=reporter, holder=_holder("replay"))
            for key, value in outcome.counts().items():
                totals[key] += value
            for letter in outcome.taken:
                listed.append(dict(letter.summary(), queue=name, to=to_queue or letter.source_queue,
                                   action="would replay" if dry_run else "replayed"))
            over_budget += len(outcome.refused)
            homeless += outcome.homeless
            for letter in outcome.refused:
                listed.append(dict(letter.summary(), queue=name, to=None, action="refused"))
            for letter in outcome.homeless:
                listed.append(dict(letter.summary(), queue=name, to=None, action="refused",
                                   why="no work queue for its routing key; use --to QUEUE"))
            for letter, why in outcome.failed:
                listed.append(dict(letter.summary(), queue=name, to=None, action=f"failed: {why}"))
    verbs = {"taken": "would replay" if dry_run else "replayed"}
    if as_json:
        _json({"dry_run": dry_run, "totals": totals, "messages": listed})
    else:
        if dry_run or totals["refused"] or totals["failed"]:
            for row in listed:
                click.echo(f"{row['action']:13} {row['queue']:15} {row['id']}  {row['task']}  "
                           f"{row['exception']}  replays={row['replays']}"
                           + (f"  -> {row['to']}" if row["to"] else "")
                           + (f"  routing key {row['routing_key']!r}: {row['why']}" if row.get("why") else ""))
        click.echo(_summary(totals, verbs) + (" (dry run: nothing changed)" if dry_run else ""))
        if over_budget:
            click.echo(f"refused: replayed {budget} time(s) already; fix the cause, then use --force", err=True)
        if homeless:
            keys = ", ".join(repr(k) for k in dict.fromkeys(letter.routing_key for letter in homeless))
            click.echo(f"refused: {len(homeless)} unroutable task(s) have no work queue to go back to (routing "
                       f"key {keys} is none of {', '.join(queues.WORK_QUEUE_NAMES)}); replay them with "
                       "--to QUEUE, e.g. `dlq replay --queue unroutable --to default`", err=True)
    if totals["failed"]:
        sys.exit(EXIT_FAILED)  # a replay that failed part-way: the rest stays where it was


@dlq.command()
@filter_options
@click.option("--archive", type=click.Path(dir_okay=False, path_type=Path),
              help="Append the purged messages to this JSON Lines file first (dlq import reads it).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@friendly_errors
def purge(queue_names: tuple[str, ...], limit: int | None, archive: Path | None, yes: bool, **kwargs: Any) -> None:
    """Delete matching dead letters (asks first). With --archive, each is saved before it is deleted."""
    filters = _filters(kwargs)
    settings = load()
    names = dl.resolve_queues(queue_names)
    with connected(settings) as conn:
        held = []
        try:
            for name in names:  # lock first, so the count is what will be purged
                held.append((dl.hold(conn, name, _holder("purge")), name))
            matching = sum(len(dl.browse(conn, name, filters)) for name in names)
            _purge_locked(conn, names, filters, limit, archive, yes, matching)
        finally:
            for channel, name in held:
                dl.release(channel, name)


def _open_for_writing(path: Path | str, mode: str) -> Any:
    try:
        return open(path, mode)  # noqa: SIM115 - the caller closes it
    except OSError as exc:
        raise DeadLetterError(f"cannot write {path}: {exc.strerror}; nothing was changed") from None


def _purge_locked(conn: Any, names: list[str], filters: Filters, limit: int | None, archive: Path | None,
                  yes: bool, matching: int) -> None:
    count = min(matching, limit) if limit else matching
    if not count:
        click.echo("nothing matches: nothing purged")
        return
    if not yes:
        if not sys.stdin.isatty():
            raise DeadLetterError(f"{count} dead letter(s) match; pass --yes to purge them without a prompt")
        click.confirm(f"Purge {count} dead letter(s) from {', '.join(names)}?", abort=True)
    totals = {"taken": 0, "skipped": 0}
    stream = _open_for_writing(archive, "a") if archive else None
    try:
        for name in names:
            remaining = None if limit is None else limit - totals["taken"]
            if remaining is not None and remaining <= 0:
                break
            outcome = dl.purge(conn, name, filters, limit=remaining, archive=stream, holder=_holder("purge"))
            totals["taken"] += len(outcome.taken)
            totals["skipped"] += outcome.skipped
    finally:
        if stream:
            stream.close()
    click.echo(f"purged {totals['taken']}, kept {totals['skipped']}"
           + (f"; archived in {archive}" if archive else ""))


@dlq.command()
@filter_options
@click.option("--output", "-o", "output", required=True, metavar="FILE",
              help="JSON Lines file to write ('-' for standard output).")
@friendly_errors
def export(queue_names: tuple[str, ...], limit: int | None, output: str, **kwargs: Any) -> None:
    """Write matching dead letters to a JSON Lines archive. Changes nothing."""
    filters = _filters(kwargs)
    written = 0
    names = dl.resolve_queues(queue_names)
    with connected(load()) as conn:
        stream = sys.stdout if output == "-" else _open_for_writing(output, "w")
        try:
            for name in names:
                remaining = None if limit is None else limit - written
                if remaining is not None and remaining <= 0:
                    break
                written += dl.export(conn, name, filters, stream, limit=remaining)
        finally:
            if stream is not sys.stdout:
                stream.close()
    click.echo(f"exported {written} dead letter(s)" + ("" if output == "-" else f" to {output}"), err=output == "-")


@dlq.command("import")
@click.argument("archive", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--queue", "-q", "queue_name", metavar="QUEUE", help="Dead-letter queue to import into "
              "(default: the one each message was exported from).")
@friendly_errors
def import_(archive: Path, queue_name: str | None) -> None:
    """Put an archive written by export or purge --archive back into dead-letter queues, byte for byte."""
    settings = load()
    target = dl.resolve_queues([queue_name])[0] if queue_name else None
    records = read_archive(archive)
    with connected(settings) as conn:
        count = dl.import_records(conn, settings, records, target, holder=_holder("import"))
    click.echo(f"imported {count} dead letter(s) from {archive}")
