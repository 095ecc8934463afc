"""One run directory, one running job: a lock held by the job's launcher (or its rank 0 under torchrun/srun).

``flock`` on ``RUN_DIR/.lock``: the kernel releases it when the holder dies, however it dies, so a crashed job
never leaves a stale lock; on NFS, Linux maps it onto the server's byte-range locks. The lock file names the
holder (pid, host, start time) for the error a second job gets.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from .errors import UsageError

_held: dict[str, int] = {}  # run directory -> the open lock file, kept for the life of the process


def lock(run_dir: Path, source: str = "", *, per_machine: bool = False) -> None:
    """Take the run directory for this process; :class:`UsageError` naming the holder if a job has it.

    ``per_machine``: a job spanning machines that share the run directory holds one lock per machine
    (``.lock-HOSTNAME``): one launcher per machine and run directory."""
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f".lock-{socket.gethostname()}" if per_machine else ".lock"
    key = str((run_dir / name).resolve())
    if key in _held:
        return
    fd = os.open(run_dir / name, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _take(fd, run_dir, source)
    except UsageError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
              .encode(), 0)
    _held[key] = fd


def check_free(run_dir: Path, source: str = "") -> None:
    """:class:`UsageError` naming the holder if a job holds ``run_dir`` now (``launcher submit``: a job that
    would fail at its start, maybe hours later in the queue, is refused at once). Takes nothing."""
    try:
        fd = os.open(run_dir / ".lock", os.O_RDWR)
    except (FileNotFoundError, PermissionError):  # no job ran there yet; or not ours to judge here
        return
    try:
        _take(fd, run_dir, source)
    finally:
        os.close(fd)  # releases the lock if it was taken


def _take(fd: int, run_dir: Path, source: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
        raise UsageError(
            f"{source + ': ' if source else ''}the run directory {run_dir} is in use by another job "
            f"({holder})\n"
            "HINT: give this run another name= or output_dir=, or wait until that job ends"
        ) from None
