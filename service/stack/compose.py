"""docker-compose.yml as data: the one definition of every component's command, flags and config.

Compose's own rules, as far as this kit's compose file uses them: variable
interpolation (``$$``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
``$VAR``), durations such as ``1m30s``, the short and long syntax of ``ports``
and ``volumes``, and ``entrypoint`` + ``command`` in exec form. The local stack
(service.stack.model) and the tests read the compose file through this module.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from service.errors import KitError

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker-compose.yml"
#: Compose's default stop_grace_period.
DEFAULT_STOP_GRACE = 10.0

_INTERPOLATION = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(us|ms|h|m|s)")


class ComposeError(KitError):
    """docker-compose.yml cannot be read, or uses something this kit does not understand."""


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    """Compose's variable interpolation: ``$$`` is ``$``; ``${VAR}``, ``${VAR:-default}``, ``$VAR``."""

    def repl(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        expr = m["braced"] if m["braced"] is not None else m["named"]
        parts = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)(.*))?", expr, re.S)
        if not parts:
            raise ComposeError(f"docker-compose.yml: unsupported interpolation ${{{expr}}}")
        name, op, default = parts.groups()
        value = environ.get(name)
        if op == ":-" and not value:
            return default
        if op == "-" and value is None:
            return default
        return value or ""

    return _INTERPOLATION.sub(repl, text)


def _interpolate_all(node: Any, environ: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, environ)
    if isinstance(node, list):
        return [_interpolate_all(v, environ) for v in node]
    if isinstance(node, dict):
        return {k: _interpolate_all(v, environ) for k, v in node.items()}
    return node


def load_compose(path: Path = COMPOSE_FILE, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml as data: YAML anchors and merge keys resolved, variables interpolated."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ComposeError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or "services" not in data:
        raise ComposeError(f"{path} has no services")
    return _interpolate_all(data, os.environ if environ is None else environ)


def parse_duration(text: str | int | float | None, default: float = DEFAULT_STOP_GRACE) -> float:
    """Seconds of a compose duration such as ``420s`` or ``1m30s``."""
    if text is None:
        return default
    if isinstance(text, int | float):
        return float(text)
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        raise ComposeError(f"docker-compose.yml: {text!r} is not a duration")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def container_ports(service: Mapping[str, Any]) -> list[int]:
    """Ports a service listens on in its container: ``ports`` (container side) and ``expose``."""
    found: list[int] = []
    for item in service.get("ports", []) or []:
        if isinstance(item, dict):
            found.append(int(item["target"]))
        else:
            found.append(int(str(item).split("/")[0].rsplit(":", 1)[-1]))
    for item in service.get("expose", []) or []:
        found.append(int(str(item).split("/")[0]))
    return sorted(set(found))


def published_ports(service: Mapping[str, Any]) -> dict[int, int]:
    """container port -> host port of a service's ``ports``."""
    found: dict[int, int] = {}
    for item in service.get("ports", []) or []:
        if isinstance(item, dict):
            found[int(item["target"])] = int(item.get("published", item["target"]))
            continue
        fields = str(item).split("/")[0].split(":")
        found[int(fields[-1])] = int(fields[-2]) if len(fields) > 1 else int(fields[-1])
    return found


@dataclass(frozen=True)
class Mount:
    """One volume of a service: a bind mount of a repository path, or a named volume."""

    source: str
    target: str
    bind: bool
    read_only: bool


def mounts(service: Mapping[str, Any]) -> list[Mount]:
    """The volumes of a service, short or long syntax."""
    found = []
    for item in service.get("volumes", []) or []:
        if isinstance(item, dict):
            source, target = str(item.get("source", "")), str(item["target"])
            bind = item.get("type") == "bind"
            read_only = bool(item.get("read_only"))
        else:
            fields = str(item).split(":")
            if len(fields) == 1:
                source, target, mode = "", fields[0], ""
            else:
                source, target, mode = fields[0], fields[1], (fields[2] if len(fields) > 2 else "")
            bind = source.startswith((".", "/", "~"))
            read_only = "ro" in mode.split(",")
        found.append(Mount(source, target, bind, read_only))
    return found


def full_command(service: Mapping[str, Any]) -> list[str]:
    """``entrypoint`` + ``command`` of a service, as a list."""
    argv: list[str] = []
    for key in ("entrypoint", "command"):
        value = service.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            raise ComposeError(f"write {key} as a list (exec form), not a string: {value!r}")
        argv += [str(v) for v in value]
    return argv


def path_under(path: str, prefix: str) -> str | None:
    """``path`` relative to ``prefix`` ("" when equal), or None when it is not under it."""
    prefix = prefix.rstrip("/") or "/"
    if path == prefix:
        return ""
    if path.startswith(prefix.rstrip("/") + "/"):
        return path[len(prefix.rstrip("/")) + 1 :]
    return None
