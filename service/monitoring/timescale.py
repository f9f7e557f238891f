"""Time-scaled copies of the production alert rules, for end-to-end drills.

Drills may only shorten time, through this documented override, never through a
second copy of the rules: :func:`scale_rules` takes the text of a rule file and
returns it with exactly these durations multiplied by a factor (with a floor):

- ``for:`` of each rule;
- inside ``expr:`` only: range windows ``[5m]``, subquery ranges and steps
  ``[1h:1m]``, and ``offset`` durations.

Every other byte is left as it is: thresholds, label matchers, annotations
(their text still quotes the production durations), comments, layout. The
rules are edited as text, line by line, so this needs no YAML library; it
accepts ``expr:`` written as a plain or block scalar (``expr: |``) and refuses a
quoted one (``expr: "..."``) rather than guess at its escapes.

:func:`write_drill_config` writes a drill copy of ``prometheus.yml`` into a
directory: the same file with every ``scrape_interval`` and
``evaluation_interval`` set to the drill's values (``scrape_timeout`` to at most
the scrape interval), next to the scaled rule files and the service-discovery
target files, at the same relative paths, so the copy's ``rule_files`` point at
the scaled rules. See docs/runbooks/README.md, "Drills".
"""

from __future__ import annotations

import glob
import json
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "format_duration",
    "parse_duration",
    "scale_duration",
    "scale_expr",
    "scale_rules",
    "write_drill_config",
]

# Prometheus duration units, longest first (model.Duration's order).
_UNITS_MS: tuple[tuple[str, int], ...] = (
    ("y", 365 * 24 * 3600 * 1000),
    ("w", 7 * 24 * 3600 * 1000),
    ("d", 24 * 3600 * 1000),
    ("h", 3600 * 1000),
    ("m", 60 * 1000),
    ("s", 1000),
    ("ms", 1),
)
_UNIT_MS = dict(_UNITS_MS)
_DURATION = r"(?:[0-9]+(?:ms|[smhdwy]))+"
_DURATION_RE = re.compile(rf"^{_DURATION}$")
_PART_RE = re.compile(r"([0-9]+)(ms|[smhdwy])")

# Inside PromQL: a range or subquery selector, and an offset modifier.
_RANGE_RE = re.compile(rf"\[(\s*)({_DURATION})(\s*)(?:(:)(\s*)({_DURATION})?(\s*))?\]")
_OFFSET_RE = re.compile(rf"(?i)(?<![\w:])(offset)(\s+)(-?)({_DURATION})(?![\w])")

# A YAML mapping key at the start of a line, possibly after a sequence dash.
_KEY_RE = re.compile(r"^(?P<lead>\s*(?:-\s+)*)(?P<key>[A-Za-z_][\w.-]*)\s*:(?:\s+(?P<value>.*?))?\s*$")
_FOR_VALUE_RE = re.compile(rf"^(?P<q>[\"']?)(?P<d>{_DURATION})(?P=q)(?P<rest>\s+#.*)?$")


def parse_duration(text: str) -> int:
    """Milliseconds of a Prometheus duration such as ``1h30m`` or ``500ms``."""
    text = text.strip()
    if not _DURATION_RE.match(text):
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(n) * _UNIT_MS[unit] for n, unit in _PART_RE.findall(text))


def format_duration(ms: int) -> str:
    """Prometheus' own spelling of a duration in milliseconds: ``72000`` -> ``1m12s``."""
    if ms < 0:
        raise ValueError("a duration cannot be negative")
    if ms == 0:
        return "0s"
    parts = []
    for unit, size in _UNITS_MS:
        count, ms = divmod(ms, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def scale_duration(text: str, factor: float, floor: str = "1s") -> str:
    """``text`` times ``factor``, rounded to the millisecond, never under ``floor``.

    A zero duration stays zero (``for: 0s`` means "at once" in any time scale).
    """
    if not factor > 0:
        raise ValueError(f"the factor must be positive, not {factor!r}")
    ms = parse_duration(text)
    if ms == 0:
        return text.strip()
    return format_duration(max(parse_duration(floor), round(ms * factor)))


def _code_spans(expr: str) -> Iterable[tuple[int, int]]:
    """(start, end) of the parts of a PromQL text that are neither strings nor comments."""
    i, start, n = 0, 0, len(expr)
    while i < n:
        c = expr[i]
        if c in "\"'`":
            yield start, i
            j = i + 1
            while j < n and expr[j] != c:
                j += 2 if c != "`" and expr[j] == "\\" else 1
            i = start = j + 1
        elif c == "#":
            yield start, i
            j = expr.find("\n", i)
            i = start = n if j < 0 else j
        else:
            i += 1
    if start < n:
        yield start, n


def scale_expr(expr: str, factor: float, floor: str = "1s") -> str:
    """A PromQL text with its range, subquery and offset durations scaled.

    Durations inside string literals (label matchers) and comments are not touched.
    """

    def scale(d: str) -> str:
        return scale_duration(d, factor, floor)

    def scale_range(m: re.Match[str]) -> str:
        sp1, rng, sp2, colon, sp3, step, sp4 = m.groups()
        if colon is None:
            return f"[{sp1}{scale(rng)}{sp2}]"
        return f"[{sp1}{scale(rng)}{sp2}:{sp3}{scale(step) if step else ''}{sp4 or ''}]"

    def scale_offset(m: re.Match[str]) -> str:
        word, space, sign, d = m.groups()
        return f"{word}{space}{sign}{scale(d)}"

    out, last = [], 0
    for start, end in _code_spans(expr):
        if start >= end:
            continue
        out.append(expr[last:start])
        code = _RANGE_RE.sub(scale_range, expr[start:end])
        out.append(_OFFSET_RE.sub(scale_offset, code))
        last = end
    out.append(expr[last:])
    return "".join(out)


def _is_parent(value: str | None) -> bool:
    """A key whose value is on the following lines (a mapping or list), maybe after an anchor or tag."""
    return not value or re.fullmatch(r"(?:[&!]\S+\s*)+(?:#.*)?|#.*", value) is not None


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def scale_rules(text: str, factor: float, floor: str = "1s") -> str:
    """The rule file ``text`` with only its ``for:`` durations and PromQL time windows scaled.

    ``factor`` is the multiplier (0.02 turns ``for: 5m`` into ``for: 6s``); no
    scaled duration is shorter than ``floor``. Raises ValueError on an ``expr:``
    written as a quoted YAML scalar.
    """
    parse_duration(floor)
    if not factor > 0:
        raise ValueError(f"the factor must be positive, not {factor!r}")
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _KEY_RE.match(line.rstrip("\r\n"))
        if not m or line.lstrip().startswith("#") or _is_parent(m.group("value")):
            out.append(line)
            i += 1
            continue
        # A key with a value: the value runs on over the following lines that are
        # blank or indented deeper than the key (block scalars, folded plain scalars).
        key_col = len(m.group("lead"))
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > key_col):
            j += 1
        while j > i + 1 and not lines[j - 1].strip():
            j -= 1
        key, value = m.group("key"), m.group("value")
        if key == "for" and key_col == _rule_key_col(lines, i, key_col):
            fm = _FOR_VALUE_RE.match(value)
            if not fm:
                raise ValueError(f"line {i + 1}: cannot read the duration of {line.strip()!r}")
            start = m.start("value")
            new_value = f"{fm['q']}{scale_duration(fm['d'], factor, floor)}{fm['q']}{fm['rest'] or ''}"
            out.append(line[:start] + new_value + line[start + len(value):])
            out.extend(lines[i + 1 : j])
        elif key == "expr":
            if value[:1] in "\"'":
                raise ValueError(
                    f"line {i + 1}: expr is a quoted YAML string; write it as a plain or block scalar (expr: |)"
                )
            start = m.start("value")
            block = line[start:] + "".join(lines[i + 1 : j])
            if value[:1] in "|>":
                # The header line (indicator, maybe a comment) is YAML, not PromQL.
                header_end = block.index("\n") + 1 if "\n" in block else len(block)
                block = block[:header_end] + scale_expr(block[header_end:], factor, floor)
            else:
                block = scale_expr(block, factor, floor)
            out.append(line[:start] + block)
        else:
            out.extend(lines[i:j])
        i = j
    return "".join(out)


def _rule_key_col(lines: list[str], i: int, key_col: int) -> int:
    """Column of the keys of the rule that line ``i`` belongs to (where its ``alert:``/``expr:`` sit).

    Guards against a ``for:`` key that is not a rule's (e.g. inside labels): it
    must sit at the same column as a sibling ``expr:`` of the same mapping.
    """
    for step in (-1, 1):
        k = i + step
        while 0 <= k < len(lines):
            line = lines[k]
            if line.strip() and not line.lstrip().startswith("#"):
                m = _KEY_RE.match(line.rstrip("\r\n"))
                col = len(m.group("lead")) if m else _indent(line)
                if m and col == key_col and m.group("key") in ("expr", "alert", "record"):
                    return key_col
                if col < key_col or (m and col == key_col and m.group("lead").rstrip().endswith("-")):
                    break
            k += step
    return -1


# ---------------------------------------------------------------------------
# The drill copy of prometheus.yml


_INTERVAL_RE = re.compile(
    r"^(?P<head>\s*(?:-\s+)?(?P<key>scrape_interval|evaluation_interval|scrape_timeout)\s*:\s*)"
    rf"(?P<q>[\"']?)(?P<d>{_DURATION})(?P=q)(?P<rest>\s*(?:#.*)?)$"
)
_LIST_ITEM_RE = re.compile(r"^(?P<lead>\s*-\s+)(?P<q>[\"']?)(?P<item>[^\"'#]+?)(?P=q)\s*(?:#.*)?$")
_FILES_FLOW_RE = re.compile(r"^(?P<lead>\s*(?:-\s+)?files\s*:\s*)\[(?P<items>[^\]]*)\]\s*(?:#.*)?$")


def _set_intervals(text: str, scrape_interval: str, evaluation_interval: str) -> str:
    scrape_ms = parse_duration(scrape_interval)
    parse_duration(evaluation_interval)
    out = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        m = _INTERVAL_RE.match(body)
        if m:
            key = m["key"]
            if key == "scrape_interval":
                new = scrape_interval
            elif key == "evaluation_interval":
                new = evaluation_interval
            else:
                new = format_duration(min(parse_duration(m["d"]), scrape_ms))
            line = f"{m['head']}{m['q']}{new}{m['q']}{m['rest']}{line[len(body):]}"
        out.append(line)
    return "".join(out)


def _list_under(text: str, key: str) -> list[str]:
    """Items of every top-level or nested block list ``key:`` (``- item`` lines) in ``text``."""
    items: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _KEY_RE.match(line)
        if not m or m["key"] != key:
            continue
        value = m["value"] or ""
        if value.startswith("["):
            items += [v.strip().strip("\"'") for v in value.strip("[] ").split(",") if v.strip()]
            continue
        key_col = len(m["lead"])
        for follow in lines[i + 1 :]:
            if not follow.strip() or follow.lstrip().startswith("#"):
                continue
            lm = _LIST_ITEM_RE.match(follow)
            if not lm or _indent(follow) < key_col:
                break
            items.append(lm["item"].strip())
    return items


def _relative_inside(pattern: str, base: Path) -> str:
    path = Path(pattern)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(
            f"{pattern!r} is not a relative path under {base}: the drill copy keeps relative paths only"
        )
    return pattern


def write_drill_config(
    config: str | Path,
    out_dir: str | Path,
    *,
    factor: float,
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
    floor: str = "1s",
    targets: Mapping[str, list[dict[str, Any]]] | None = None,
) -> Path:
    """Write a drill copy of the Prometheus ``config`` into ``out_dir``; return its path.

    ``out_dir`` receives ``prometheus.yml`` (intervals set to the drill's; every
    other line unchanged), the files its ``rule_files`` name, scaled by
    :func:`scale_rules` with ``factor`` and ``floor``, and the files its
    ``file_sd_configs`` name, copied, at the same relative paths as beside
    ``config``. ``targets`` replaces target files by relative path, e.g.
    ``{"targets/kit-workers.json": [{"targets": ["127.0.0.1:41234"]}]}``.
    """
    config = Path(config)
    out_dir = Path(out_dir)
    base = config.parent
    text = config.read_text()
    out_dir.mkdir(parents=True, exist_ok=True)

    for pattern in _list_under(text, "rule_files"):
        matches = sorted(glob.glob(str(base / _relative_inside(pattern, base))))
        if not matches:
            raise ValueError(f"rule_files pattern {pattern!r} matches no file under {base}")
        for match in matches:
            rel = Path(match).relative_to(base)
            dest = out_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(scale_rules(Path(match).read_text(), factor, floor))

    overrides = dict(targets or {})
    for pattern in _list_under(text, "files"):
        for match in sorted(glob.glob(str(base / _relative_inside(pattern, base)))):
            rel = Path(match).relative_to(base)
            if str(rel) not in overrides:
                (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(match, out_dir / rel)
    for rel, groups in overrides.items():
        dest = out_dir / _relative_inside(rel, base)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(groups, indent=2) + "\n")

    drill = out_dir / config.name
    drill.write_text(_set_intervals(text, scrape_interval, evaluation_interval))
    return drill
