"""Other processes by pid, from any process (no torch imported: ``launcher stacks`` stays quick)."""

from __future__ import annotations

import os


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
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    state, ppid = stat[stat.rindex(")") + 2:].split()[:2]  # the name, in parentheses, may hold spaces
    return None if state in ("Z", "X") else int(ppid)


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
