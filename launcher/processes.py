"""Other processes by pid, from any process (no torch imported: ``launcher stacks`` stays quick), and the
folder multiprocessing's servers need."""

from __future__ import annotations

import os
import tempfile
from multiprocessing import util

#: A socket's path in a multiprocessing folder (``TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX``) without TMPDIR.
_SOCKET_TAIL = len("/pymp-XXXXXXXX/listener-XXXXXXXX")
#: The longest path of a Unix socket on Linux (``sun_path``: 108 bytes with its final NUL).
SOCKET_PATH_MAX = 107


def short_socket_folder() -> None:
    """Make this process's multiprocessing folder (``pymp-*``, where its fork servers' sockets go) in /tmp
    when a socket's path under TMPDIR would be too long: every ``launcher run`` failed with "AF_UNIX path
    too long" under a TMPDIR of 76 characters or more (torchrun's spawned ranks need no socket). Only that
    folder moves; the ranks' TMPDIR stays. A no-op once the folder exists."""
    if len(os.fsencode(tempfile.gettempdir())) + _SOCKET_TAIL <= SOCKET_PATH_MAX:
        return
    saved, tempfile.tempdir = tempfile.tempdir, "/tmp"
    try:
        util.get_temp_dir()  # made under tempfile.tempdir; removed at exit as multiprocessing's own
    except OSError:
        pass  # /tmp not writable: multiprocessing's own error follows, naming the path
    finally:
        tempfile.tempdir = saved


def alive(pid: int) -> bool:
    """A process with this pid exists (it may be another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def parent_of(pid: int) -> int | None:
    """The parent's pid of a live process (Linux's ``/proc``); None when it has ended or is a zombie."""
    stat = _stat(pid)
    return None if not stat or stat[0] in ("Z", "X") else int(stat[1])


def in_group(pgid: int) -> list[int]:
    """The pids of the processes in process group ``pgid`` (zombies included; Linux's ``/proc``)."""
    return [int(name) for name in os.listdir("/proc")
            if name.isdigit() and (stat := _stat(int(name))) and int(stat[2]) == pgid]


def _stat(pid: int) -> list[str]:
    """``/proc/PID/stat`` from the state on (state, ppid, pgrp, ...); [] when the process has ended."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return []
    return stat[stat.rindex(")") + 2:].split()  # the name, in parentheses, may hold spaces


def catches(pid: int, signum: int) -> bool:
    """The live process ``pid`` has a handler of its own for ``signum`` (``SigCgt`` in Linux's ``/proc``).
    A child forked with a handler loses it when it runs another program (``exec``): a signal whose default
    action ends a process must not reach it then."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError):
        return False
    return False
