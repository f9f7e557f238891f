"""The export directory (KIT_REPORT_DIR) as the web service shows it: listing and safe opening.

Only a plain file name of an export (letters, digits, ``._-``, not starting with
a dot, ending in .csv or .xlsx, no ``..``) is ever looked up, and only as a
direct entry of the export directory, opened with O_NOFOLLOW relative to the
directory's own descriptor: a path, an absolute path, ``..`` (encoded or not), a
hidden or temporary file, a symlink (wherever it points) or anything that is
not a regular file is never served. Names are refused with ExportNameInvalid
(400); a good name that is not there is ExportNotFound (404).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from service.tasks.contracts import EXPORT_SUFFIXES

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
#: Content types of the export formats.
MEDIA_TYPES = {".csv": "text/csv; charset=utf-8",
               ".xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"}
_CHUNK = 64 * 1024


class ExportNameInvalid(ValueError):
    """The requested name is not an export file name (a path, a hidden file, another suffix)."""


class ExportNotFound(LookupError):
    """No export of that name: missing, a symlink, or not a regular file."""


def is_export_name(name: str) -> bool:
    """Whether ``name`` may name an export file (and nothing else)."""
    return bool(_NAME.fullmatch(name)) and ".." not in name and name.endswith(EXPORT_SUFFIXES)


def download_url(name: str) -> str:
    """The web service's download path of an export."""
    return f"/api/download/{quote(name)}"


@dataclass(frozen=True)
class ExportEntry:
    """One export file: name, size in bytes, when it was written (UTC)."""

    file_name: str
    size: int
    created_at: datetime


def list_exports(directory: Path) -> list[ExportEntry]:
    """The export files of ``directory`` (regular files with export names; no symlinks), newest first."""
    found: list[ExportEntry] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        if not is_export_name(entry.name):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # deleted meanwhile (the clean-up)
            continue
        if stat.S_ISREG(info.st_mode):
            # The file appears complete (atomic rename): its mtime is when it was written.
            found.append(ExportEntry(entry.name, info.st_size, datetime.fromtimestamp(info.st_mtime, UTC)))
    return sorted(found, key=lambda e: (e.created_at, e.file_name), reverse=True)


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


@dataclass
class OpenExport:
    """An export opened for download: its descriptor, size and content type; read with ``chunks``.

    The descriptor is closed at the end of ``chunks``, by ``close``, or else when
    the object is dropped (a response whose streaming never started).
    """

    file_name: str
    fd: int
    size: int
    media_type: str

    def __post_init__(self) -> None:
        self._finalizer = weakref.finalize(self, _close_fd, self.fd)

    def chunks(self) -> Iterator[bytes]:
        """The file's bytes, in chunks; closes the descriptor at the end (or when dropped)."""
        try:
            while True:
                data = os.read(self.fd, _CHUNK)
                if not data:
                    return
                yield data
        finally:
            self.close()

    def close(self) -> None:
        """Close the descriptor (twice is harmless)."""
        if self.fd >= 0:
            self.fd = -1
            self._finalizer()  # closes it, once


def open_export(directory: Path, name: str) -> OpenExport:
    """Open export ``name`` of ``directory`` for reading; ExportNameInvalid or ExportNotFound otherwise."""
    if not is_export_name(name):
        raise ExportNameInvalid(f"{name!r} is not an export file name (e.g. work_logs_2024-01-01_2024-01-31_ID.xlsx)")
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        raise ExportNotFound(f"no export named {name}") from None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:  # missing, a symlink (ELOOP), unreadable
        raise ExportNotFound(f"no export named {name}") from None
    finally:
        os.close(dir_fd)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ExportNotFound(f"no export named {name}")
    os.set_blocking(fd, True)
    return OpenExport(name, fd, info.st_size, MEDIA_TYPES[os.path.splitext(name)[1]])
