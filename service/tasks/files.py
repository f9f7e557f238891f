"""Files the example tasks write: complete when they appear, or not there at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from service.tasks.contracts import TEMP_SUFFIX


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the platform allows opening directories)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def written_atomically(path: Path) -> Iterator[str]:
    """The name of a temporary file beside ``path`` to write (and fsync) in the block.

    When the block ends normally the file replaces ``path`` (a rename, then the
    directory fsynced), so a reader never sees a half-written file and a second
    write replaces the first; when it raises, the temporary file is removed.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield tmp_name
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_directory(path.parent)
