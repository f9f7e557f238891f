"""The console's pages that change nothing (GET): overview, list, one letter, a job, downloads, health.

Overview and list read the snapshot (service.console.snapshot), never the
broker; one letter is read from its queue (without changing it), and an
export walks the queues as ``dlq export`` does.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import deadletters as dl
from service import queues
from service.console.auth import Identity
from service.console.query import QueryError, Selection, read_selection
from service.console.snapshot import ConsoleBusy
from service.errors import KitError

router = APIRouter()
#: Letters per page of the list.
PAGE_SIZE = 50
#: Seconds a letter's page waits for the console's own read of its queue to end.
LETTER_WAIT_S = 10.0


def console(request: Request) -> Any:
    """The app's Console."""
    return request.app.state.console


def identity(request: Request) -> Identity:
    """The request's identity (NotLoggedIn sends the browser to /login)."""
    found = console(request).auth.identify(request)
    request.state.identity = found
    return found


#: A route's logged-in user.
Who = Annotated[Identity, Depends(identity)]


@router.get("/healthz", include_in_schema=False)
def healthz() -> PlainTextResponse:
    """200 while the console serves (no login)."""
    return PlainTextResponse("ok\n")


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """The console's Prometheus metrics (no login: counts only)."""
    audit = console(request).audit
    audit.collect_ages()
    return Response(generate_latest(audit.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/")
def overview(request: Request, who: Who) -> Response:
    """Per dead-letter queue: count, oldest, newest, by task, exception and reason; the work queues."""
    c = console(request)
    return c.render(request, "overview.html", snapshots=list(c.refresher.snapshots.values()),
                    work_queues=c.refresher.work_queues, broker_error=c.refresher.broker_error,
                    jobs=c.jobs.running())


def _selected_rows(c: Any, selection: Selection) -> list[Any]:
    rows = []
    for name in selection.queues:
        rows += [row for row in c.refresher.snapshots[name].rows if selection.filters.match(row)]
    return rows


@router.get("/letters")
def letters(request: Request, who: Who, page: int = 1) -> Response:
    """The dead letters matching the filters, in queue order, PAGE_SIZE a page."""
    c = console(request)
    try:
        selection = read_selection(request.query_params)
    except QueryError as exc:
        return c.render(request, "letters.html", 400, selection=None, error=str(exc), rows=[], total=0, page=1,
                        pages=1, snapshots=[])
    rows = _selected_rows(c, selection)
    pages = max(1, -(-len(rows) // PAGE_SIZE))
    page = min(max(1, page), pages)
    return c.render(request, "letters.html", selection=selection, error=None, total=len(rows), page=page,
                    pages=pages, rows=rows[(page - 1) * PAGE_SIZE: page * PAGE_SIZE],
                    snapshots=[c.refresher.snapshots[name] for name in selection.queues])


@router.get("/letters/{queue}/{letter_id}")
def letter(request: Request, queue: str, letter_id: str, who: Who, arguments: int = 0) -> Response:
    """Everything about one letter; its arguments only for an operator who asks."""
    from service.topology import connect

    c = console(request)
    if arguments:
        c.auth.require_operator(who, "seeing a task's arguments")
    try:
        name = dl.resolve_queues([queue])[0]
        with c.refresher.exclusive(name, timeout=LETTER_WAIT_S):
            conn = connect(c.settings)
            try:
                found = dl.find(conn, [name], letter_id)
            finally:
                conn.release()
    except ConsoleBusy as exc:
        return c.render(request, "error.html", 409, title="The queue is busy", message=str(exc))
    except KitError as exc:
        return c.render(request, "error.html", 404, title="No such dead letter", message=str(exc))
    info = found.details(show_args=bool(arguments))
    if arguments:
        c.audit(who.user, "show-arguments", {"queue": name, "id": letter_id}, role=who.role)
    pretty = {k: json.dumps(info.get(k), indent=2, default=str, ensure_ascii=False)
              for k in ("args", "kwargs", "headers", "x_death", "properties")}
    return c.render(request, "letter.html", info=info, queue=name, pretty=pretty, arguments=bool(arguments))


@router.get("/replay")
def replay_form(request: Request, who: Who) -> Response:
    """The replay form for the filters given (the dry run comes first)."""
    return _operation_form(request, who, "replay")


@router.get("/purge")
def purge_form(request: Request, who: Who) -> Response:
    """The purge form for the filters given (the preview comes first)."""
    return _operation_form(request, who, "purge")


def _operation_form(request: Request, who: Identity, kind: str) -> Response:
    c = console(request)
    c.auth.require_operator(who, f"a {kind}")
    try:
        selection = read_selection(request.query_params)
    except QueryError as exc:
        return c.render(request, "error.html", 400, title="Bad filter", message=str(exc))
    matching = len(_selected_rows(c, selection))
    return c.render(request, "operation.html", kind=kind, selection=selection, matching=matching,
                    work_queues=queues.WORK_QUEUE_NAMES, max_replays=c.settings.max_replays)


@router.get("/jobs/{job_id}.json")
def job_json(request: Request, job_id: str, who: Who) -> Response:
    """A job's progress as JSON."""
    job = console(request).jobs.job(job_id)
    if job is None:
        return JSONResponse({"detail": "no such job"}, status_code=404)
    return JSONResponse(job.view())


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str, who: Who) -> Response:
    """A replay's or purge's progress and result (the page polls /jobs/ID.json while it runs)."""
    c = console(request)
    job = c.jobs.job(job_id)
    if job is None:
        return c.render(request, "error.html", 404, title="No such job",
                        message="the console does not know this job (it forgets jobs when it restarts)")
    return c.render(request, "job.html", job=job.view(), plan=job.plan)


@router.get("/export")
def export(request: Request, who: Who) -> Response:
    """The matching letters as a JSON Lines download (the archive format; operators only)."""
    from service.topology import connect

    c = console(request)
    c.auth.require_operator(who, "an export")
    try:
        selection = read_selection(request.query_params)
    except QueryError as exc:
        return c.render(request, "error.html", 400, title="Bad filter", message=str(exc))
    spool = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115 - closed when the download ends
    written = 0
    try:
        conn = connect(c.settings)
        try:
            for name in selection.queues:
                with c.refresher.exclusive(name):
                    written += dl.export(conn, name, selection.filters, spool)
        finally:
            conn.release()
    except KitError as exc:
        spool.close()
        c.audit(who.user, "export", selection.shown(), outcome="failed", detail=str(exc), role=who.role)
        return c.render(request, "error.html", 503, title="Export failed", message=str(exc))
    c.audit(who.user, "export", selection.shown(), {"exported": written}, role=who.role)
    spool.seek(0)

    def chunks() -> Any:
        try:
            while block := spool.read(65536):
                yield block.encode()
        finally:
            spool.close()

    return StreamingResponse(chunks(), media_type="application/x-ndjson",
                             headers={"Content-Disposition": 'attachment; filename="dead-letters.jsonl"'})


@router.get("/archives/{name}")
def archive(request: Request, name: str, who: Who) -> Response:
    """Download the archive a purge wrote (operators only)."""
    c = console(request)
    c.auth.require_operator(who, "downloading an archive")
    directory = Path(c.settings.console_archive_dir).resolve()
    path = (directory / name).resolve()
    if path.parent != directory or not name.endswith(".jsonl") or not path.is_file():
        return c.render(request, "error.html", 404, title="No such archive", message=f"no archive {name!r}")
    c.audit(who.user, "download-archive", {"archive": name}, role=who.role)
    return FileResponse(path, media_type="application/x-ndjson", filename=name)
