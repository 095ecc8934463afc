"""One run directory, one running job: a lock held by the job's launcher (or its rank 0 under torchrun/srun).

``flock`` on ``RUN_DIR/.lock``: the kernel releases it when the holder dies, however it dies, so a crashed job
never leaves a stale lock; on NFS, Linux maps it onto the server's byte-range locks. The lock file names the
holder (pid, host, start time) for the error a second job gets.

Output folders are often shared: the lock file is opened without following a symbolic link and must be a
plain file with one name (truncating it must never reach somebody else's file). A run directory deleted under
a running job would let a second job in beside it (a new lock file, a new inode): the holder checks its lock
file every :data:`WATCH_S` seconds and takes a new one at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError

#: Seconds between the holder's checks that its lock file is still the one it holds.
WATCH_S = 0.5
#: Kernel file systems: a run directory there cannot hold anything (a write fails, or does something else).
_NOT_STORAGE = (Path("/proc"), Path("/sys"), Path("/dev"))


@dataclass
class _Held:
    fd: int
    path: Path
    source: str
    holder: str
    what: str
    lost: bool = False  # removed, and another job took it before this one could: said once
    lost_why: str = ""


_held: dict[str, _Held] = {}  # lock file path -> the lock, kept for the life of the process
_watcher: list[threading.Thread] = []
_on_lost: list[Any] = []  # what to do when another job took a folder of ours (see on_lost)


def check_usable(run_dir: Path, source: str = "", key: str = "output_dir") -> None:
    """:class:`UsageError` naming ``key`` and the fix when ``run_dir`` cannot be a run directory or
    checkpoint folder (a file in the way, a kernel file system, a read-only file system, no permission to
    make it or write in it, no space left); checked before anything is written."""
    where = f"{source}: " if source else ""
    hint = ("HINT: output_dir=PATH names a folder on a disk (default: runs, in the working directory)"
            if key == "output_dir" else
            "HINT: checkpoint.dir=PATH names a writable folder on a disk (default: checkpoints, inside the "
            "run directory)")
    resolved = run_dir.absolute().resolve()
    for root in _NOT_STORAGE:
        if resolved == root or root in resolved.parents:
            raise UsageError(f"{where}output_dir: {run_dir.parent} is under {root}, a kernel file system, "
                             f"not storage\n{hint}")
    existing = run_dir
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "the run directory" if existing == run_dir and key == "output_dir" else key
        raise UsageError(f"{where}{what}: {existing} is a file, not a folder\n{hint}, or remove the file")
    # access() answers EROFS for a read-only mount even to root, which permission bits do not stop: a
    # read-only checkpoint folder was otherwise found at the first save, hours in.
    if not os.access(existing, os.W_OK | os.X_OK):
        what = f"cannot make {run_dir}" if existing != run_dir else f"cannot write in {run_dir}"
        why = "is on a read-only file system" if _read_only(existing) else "gives no permission to write"
        raise UsageError(f"{where}{key}: {what} ({existing} {why})\n{hint}")
    full = no_space(existing)
    if full:
        raise UsageError(f"{where}{key}: {full}\n{hint}, or free space there")


#: Free bytes under which a run cannot start: the lock, the resolved job and the first log lines.
MIN_FREE_BYTES = 64 << 10


def no_space(folder: Path) -> str:
    """"no space left on the device ..." when ``folder``'s file system has under :data:`MIN_FREE_BYTES` (or
    no free inode) for an unprivileged writer; empty otherwise, or when it cannot be told."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return ""
    free = st.f_bavail * st.f_frsize
    if free < MIN_FREE_BYTES or (st.f_files and st.f_favail == 0):
        return f"no space left on the device that holds {folder} ({free >> 10} KiB free)"
    return ""


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def lock(run_dir: Path, source: str = "", *, per_machine: bool = False, what: str = "run directory") -> None:
    """Take the run directory for this process; :class:`UsageError` naming the holder if a job has it.

    ``per_machine``: a job spanning machines that share the run directory holds one lock per machine
    (``.lock-HOSTNAME``): one launcher per machine and run directory. ``what``: the folder's name in
    messages (a checkpoint folder outside the run directory is locked the same way)."""
    where = f"{source}: " if source else ""
    key_name = "output_dir" if what == "run directory" else "checkpoint.dir"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{where}{key_name}: cannot make the {what} {run_dir} ({e.strerror})\n"
                         f"HINT: {key_name}=PATH names a folder on a disk") from None
    name = f".lock-{socket.gethostname()}" if per_machine else ".lock"
    path = run_dir.absolute() / name
    if str(path) in _held:
        return
    holder = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    _held[str(path)] = _Held(_take_file(path, source, holder, what), path, source, holder, what)
    if not _watcher:
        _watcher.append(threading.Thread(target=_watch, name="launcher-rundir-lock", daemon=True))
        _watcher[0].start()


def on_lost(action: Any) -> None:
    """Call ``action()`` (once, from the watcher thread) when a folder this process holds was removed and
    another job has taken it: this job must stop, or two jobs write one folder. Without an action the process
    gets SIGTERM (also after ``on_lost(None)``, which lets go of the action)."""
    _on_lost[:] = [] if action is None else [action]


def lost() -> str:
    """Why this process lost a folder it held to another job ("" while it holds them all)."""
    return next((h.lost_why for h in _held.values() if h.lost), "")


def lock_job(job: Any, *, per_machine: bool = False) -> None:
    """Take the job's run directory and, when it lies outside it, its checkpoint folder: two jobs sharing a
    ``checkpoint.dir`` would resume from and prune each other's checkpoints."""
    lock(job.run_dir, job.source, per_machine=per_machine)
    if _outside(job.checkpoint_dir, job.run_dir):
        lock(job.checkpoint_dir, job.source, per_machine=per_machine, what="checkpoint folder")


def check_job_usable(job: Any) -> None:
    """:func:`check_usable` for the run directory and the checkpoint folder, before anything starts."""
    check_usable(job.run_dir, job.source)
    if job.script is None and _outside(job.checkpoint_dir, job.run_dir):
        check_usable(job.checkpoint_dir, job.source, key="checkpoint.dir")


def check_job_free(job: Any) -> None:
    """:func:`check_free` for the run directory and a checkpoint folder outside it."""
    check_free(job.run_dir, job.source)
    if job.script is None and _outside(job.checkpoint_dir, job.run_dir):
        check_free(job.checkpoint_dir, job.source, what="checkpoint folder")


def _outside(folder: Path, run_dir: Path) -> bool:
    inner, outer = folder.absolute().resolve(), run_dir.absolute().resolve()
    return inner != outer and outer not in inner.parents


def check_free(run_dir: Path, source: str = "", what: str = "run directory") -> None:
    """:class:`UsageError` naming the holder if a job holds ``run_dir`` now (``launcher submit``: a job that
    would fail at its start, maybe hours later in the queue, is refused at once). Takes nothing."""
    try:
        fd = _open(run_dir / ".lock", source, create=False)
    except FileNotFoundError:  # no job ran there yet
        return
    except UsageError as e:
        if isinstance(e.__cause__, PermissionError):  # not ours to judge here: the run will
            return
        raise
    try:
        _flock(fd, run_dir, source, what)
    finally:
        os.close(fd)  # releases the lock if it was taken


def _take_file(path: Path, source: str, holder: str, what: str) -> int:
    fd = _open(path, source, create=True)
    try:
        _flock(fd, path.parent, source, what)
        os.ftruncate(fd, 0)  # ours: a plain file with no other name (checked in _open)
        os.pwrite(fd, holder.encode(), 0)
    except OSError as e:  # a full disk: the holder's name cannot be written; leave no empty lock file
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
        where = f"{source}: " if source else ""
        raise UsageError(f"{where}cannot take the {what} {path.parent} ({e.strerror})\n"
                         "HINT: free space there, or point output_dir at another file system") from None
    except UsageError:
        os.close(fd)
        raise
    return fd


def _open(path: Path, source: str, create: bool) -> int:
    """The lock file, never through a symbolic link, and only a plain file with one name."""
    where = f"{source}: " if source else ""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:
            problem = "is a symbolic link (never followed there: the launcher would overwrite its target)"
        else:
            problem = f"cannot be opened ({e.strerror})"
        raise UsageError(f"{where}the run directory's lock file {path} {problem}\n"
                         f"HINT: remove {path} (the launcher makes its own), or give this run another name=")\
            from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "has other names (hard links)" if stat.S_ISREG(st.st_mode) else "is not a plain file"
        raise UsageError(f"{where}the run directory's lock file {path} {what}: the launcher writes to it\n"
                         f"HINT: remove {path} (the launcher makes its own), or give this run another name=")
    return fd


def _flock(fd: int, run_dir: Path, source: str, what: str = "run directory") -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
        fix = ("give this run another name (name=, or --name for a script) or output_dir"
               if what == "run directory" else
               "give each job a checkpoint.dir of its own (a relative path is inside the run directory)")
        raise UsageError(
            f"{source + ': ' if source else ''}the {what} {run_dir} is in use by another job ({holder})\n"
            f"HINT: {fix}, or wait until that job ends"
        ) from None


def _same_file(held: _Held) -> bool:
    try:
        now = os.stat(held.path, follow_symlinks=False)
    except OSError:
        return False
    ours = os.fstat(held.fd)
    return (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino)


def _watch() -> None:
    """Take the lock again when the lock file has been removed or replaced (the run directory deleted)."""
    while True:
        time.sleep(WATCH_S)
        for held in list(_held.values()):
            if held.lost or _same_file(held):
                continue
            try:
                held.path.parent.mkdir(parents=True, exist_ok=True)
                fd = _take_file(held.path, held.source, held.holder, held.what)
            except (OSError, UsageError) as e:
                # Another job took it while this one could not look (stopped by Ctrl-Z, say): both would write
                # one folder and both exit 0. This job stops.
                held.lost_why = (f"the {held.what} {held.path.parent} was removed while this job ran, and it "
                                 f"could not be taken again: {str(e).splitlines()[0]}")
                held.lost = True
                print(f"[launcher] {held.lost_why}; stopping this job", file=sys.stderr, flush=True)
                action = _on_lost[0] if _on_lost else (lambda: os.kill(os.getpid(), signal.SIGTERM))
                action()
                continue
            os.close(held.fd)
            held.fd = fd
            print(f"[launcher] {held.path.parent} was removed while this job ran: the job goes on and holds "
                  "it again (what was in it is gone)", file=sys.stderr, flush=True)
