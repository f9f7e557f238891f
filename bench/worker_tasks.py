"""The no-op task of bench/worker_drain.py, for the kit's worker (KIT_TASK_MODULES=bench.worker_tasks)."""

from __future__ import annotations

from service.app import app


@app.task(name="bench.noop")
def noop(*args: object, **kwargs: object) -> None:
    """Do nothing: the benchmark measures the worker, not the task."""
