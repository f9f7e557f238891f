"""The files the local stack's components need, written into KIT_STATE_DIR before they start.

A bind mount nested in another one gets an overlay directory of symlinks into
the repository; the files under a ``rewrite-hosts`` path (Prometheus' target
files) are copied with their hosts and ports mapped and the stack's vhost as
their ``kit_vhost`` label; an ``alertmanager-config`` service gets its config
rendered (service.monitoring.alertmanager_config); the directory of each named
volume is created. See ``service.stack.model``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from service.stack.compose import full_command, mounts, path_under
from service.stack.model import REPO, VHOST_TARGET_LABEL, Stack, StackError


def prepare_files(stack: Stack) -> None:
    """Overlays for nested mounts, host-mapped target files, rendered configs, named volumes' directories."""
    for name in stack.local_services:
        for volume in mounts(stack.services[name]):
            if not volume.bind:  # a program may need its data directory to exist (redis-server --dir)
                stack.state_path(volume.target).mkdir(parents=True, exist_ok=True)
        service_mounts = [m for m in mounts(stack.services[name]) if m.bind]
        rewrite = set(stack.local_services[name].get("rewrite-hosts", []))
        table = dict(stack.mount_table(name))
        for m in service_mounts:
            local = table[m.target]
            if local.is_relative_to(REPO) and not local.is_relative_to(stack.state_dir):
                continue  # mapped straight to the repository
            if any(path_under(m.target, o.target) for o in service_mounts if o is not m):
                continue  # filled in with the mount it is nested in
            source = (REPO / m.source).resolve()
            nested = {n.target: n for n in service_mounts if n is not m and path_under(n.target, m.target)}
            if m.target in rewrite:
                _write_rewritten(stack, name, source, local)
            else:
                _write_overlay(source, local, {path_under(t, m.target).split("/")[0] for t in nested})
            for target, inner in nested.items():
                inner_local = table[target]
                if target in rewrite:
                    _write_rewritten(stack, name, (REPO / inner.source).resolve(), inner_local)
                else:
                    _replace_with_symlink(inner_local, (REPO / inner.source).resolve())
        values = stack.local_services[name].get("alertmanager-config")
        if values:
            _write_alertmanager_config(stack, name, dict(values))


def _write_overlay(source: Path, local: Path, skip: set[str]) -> None:
    if local.is_symlink() or local.is_file():
        local.unlink()
    local.mkdir(parents=True, exist_ok=True)
    entries = {p.name for p in source.iterdir()} - skip
    for entry in local.iterdir():
        if entry.name not in entries and entry.name not in skip:
            _remove(entry)
    for entry in entries:
        _replace_with_symlink(local / entry, source / entry)


def _write_rewritten(stack: Stack, name: str, source: Path, local: Path) -> None:
    """Copies of the JSON files of ``source``: hosts and ports mapped, ``kit_vhost`` labels the stack's vhost."""
    if local.is_symlink():
        local.unlink()
    local.mkdir(parents=True, exist_ok=True)

    def mapped(node: Any) -> Any:
        if isinstance(node, str):
            return stack.map_text(name, node)
        if isinstance(node, list):
            return [mapped(v) for v in node]
        if isinstance(node, dict):
            return {k: mapped(v) for k, v in node.items()}
        return node

    def with_vhost(groups: Any) -> Any:
        for group in groups if isinstance(groups, list) else ():
            labels = group.get("labels") if isinstance(group, dict) else None
            if isinstance(labels, dict) and VHOST_TARGET_LABEL in labels:
                labels[VHOST_TARGET_LABEL] = stack.vhost
            if stack.options.cluster and isinstance(group, dict) and isinstance(group.get("targets"), list):
                group["targets"] = stack.cluster_targets(group["targets"])  # Prometheus scrapes every node
        return groups

    for path in sorted(source.glob("*.json")):
        out = local / path.name
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(with_vhost(mapped(json.loads(path.read_text()))), indent=2) + "\n")
        tmp.replace(out)


def _write_alertmanager_config(stack: Stack, name: str, values: dict[str, Any]) -> None:
    from service.monitoring import alertmanager_config

    argv = full_command(stack.services[name])
    config = next((a.split("=", 1)[1] for a in argv if a.startswith("--config.file=")), None)
    if config is None:
        raise StackError(f"{name}: alertmanager-config needs a --config.file= flag")
    out = stack.work_dir / name / "alertmanager.yml"
    out.parent.mkdir(parents=True, exist_ok=True)
    values.setdefault("secrets_dir", stack.secrets_dir)
    # Compose host names in the values (the relay's http://alert-relay:8060/...) become this machine's.
    values = {k: stack.map_text(name, v) if isinstance(v, str) else v for k, v in values.items()}
    out.write_text(alertmanager_config.render(Path(stack.map_path(name, config)), **values))


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _replace_with_symlink(link: Path, target: Path) -> None:
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    if link.exists() or link.is_symlink():
        _remove(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
