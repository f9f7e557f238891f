"""What the benchmarks share: the repository on ``sys.path``, the statistics and the printed tables.

A benchmark script imports this module first (``bench/`` is on ``sys.path``
when a script of it runs), so ``service`` and ``harness`` import from
the checkout without installing anything.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from harness.broker import management  # noqa: E402 - importable once the repository is on the path

T = TypeVar("T")


def environment(load_before: tuple[float, float, float], **versions: str) -> dict[str, Any]:
    """What a run measured on: Python, the given library versions, RabbitMQ's version, CPUs, load before and now."""
    try:
        rabbitmq = management("GET", "/api/overview").get("rabbitmq_version", "?")
    except Exception:  # noqa: BLE001 - only informational
        rabbitmq = "?"
    return {
        "python": platform.python_version(),
        **versions,
        "rabbitmq": rabbitmq,
        "cpus": os.cpu_count(),
        "loadavg_1m_before": round(load_before[0], 2),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
    }


def rotated(items: Sequence[T], round_index: int) -> list[T]:
    """``items`` started at position ``round_index`` (mod len): each round runs the methods in another order."""
    k = round_index % len(items)
    return [*items[k:], *items[:k]]


def summarize(rates: list[float]) -> dict[str, float]:
    """Median, min, max (msg/s) of a method's successful rounds, and microseconds per message at the median."""
    return {
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "us_per_msg_median": 1e6 / statistics.median(rates),
    }


def ratio(summary: Mapping[str, Mapping[str, float]], a: str, b: str) -> float | None:
    """Median of ``a`` over median of ``b``; None when either has no successful round."""
    if a in summary and b in summary:
        return summary[a]["median"] / summary[b]["median"]
    return None


def print_methods(report: Mapping[str, Any], descriptions: Mapping[str, str], round_note: str) -> None:
    """The table of methods (median, min, max, us/msg, successful rounds) and each round's rates."""
    rounds = report["config"]["rounds"]
    header = f"{'method':<25} {'median msg/s':>13} {'min':>10} {'max':>10} {'us/msg':>9} {'ok':>5}  description"
    print(header)
    print("-" * len(header) + "-" * 40)
    for name, description in descriptions.items():
        ok = f"{sum(1 for rnd in report['rounds'] if rnd.get(name) is not None)}/{rounds}"
        s = report["summary"].get(name)
        if s is None:
            print(f"{name:<25} {'failed':>13} {'-':>10} {'-':>10} {'-':>9} {ok:>5}  {description}")
            continue
        print(
            f"{name:<25} {s['median']:>13,.0f} {s['min']:>10,.0f} {s['max']:>10,.0f} "
            f"{s['us_per_msg_median']:>9.1f} {ok:>5}  {description}"
        )
    print()
    print(f"Per-round msg/s ({round_note}):")
    for i, rnd in enumerate(report["rounds"], 1):
        cells = ", ".join(f"{name} {'FAILED' if rate is None else f'{rate:,.0f}'}" for name, rate in rnd.items())
        print(f"  round {i}: {cells}")


def print_problems(problems: Mapping[str, Sequence[str]]) -> None:
    """Each method's failed rounds and anomalies, if there were any."""
    if not any(problems.values()):
        return
    print()
    print("Problems (failed rounds are left out of the statistics):")
    for name, lines in problems.items():
        for line in lines:
            print(f"  {name}: {line}")


def print_ratios(ratios: Mapping[str, float | None], notes: Mapping[str, str]) -> None:
    """Each ratio of medians, with its note (a target met or not, how to read it)."""
    print()
    print("Ratios of medians:")
    for key, value in ratios.items():
        if value is None:
            print(f"  {key:<50}    n/a")
            continue
        note = f"   {notes[key]}" if key in notes else ""
        print(f"  {key:<50} {value:6.2f}x{note}")


def clean_up(closers: Sequence[Callable[[], Any]], vhost: Any) -> None:
    """Best effort: call every closer (a failing one does not stop the others), then delete the vhost."""
    for close in closers:
        with contextlib.suppress(Exception):
            close()
    vhost.delete()

