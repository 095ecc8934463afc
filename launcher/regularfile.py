"""Reading a small file that must be a plain file: a FIFO, a device or a folder in its place is an error,
never a wait (``open`` of a FIFO blocks until a writer comes: a job file or a manifest that was one hung the
launcher for good)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def read_bytes(path: str | os.PathLike[str], limit: int = -1) -> bytes:
    """The first ``limit`` bytes of ``path`` (all with -1); ``OSError`` when it cannot be read or is not a
    plain file (``strerror`` says which kind it is)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "a device"
            raise OSError(errno.EINVAL, f"{kind}, not a plain file", str(path))
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit)
    finally:
        os.close(fd)


def read_text(path: str | os.PathLike[str]) -> str:
    """:func:`read_bytes` as UTF-8 text."""
    return read_bytes(Path(path)).decode()
