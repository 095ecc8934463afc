"""Every rank and DataLoader worker can dump all its threads' Python stacks on a signal, without the GIL,
ptrace or a port.

``faulthandler.register`` installs a C handler: a process stuck in C code that holds the GIL, or in a
``time.sleep``, still writes where it is. A process cannot dump another's stack, so the process that knows
every pid (the launcher, or ``launcher stacks RUN_DIR``) sends :data:`SIGNAL`; each process appends its dump
to ``RUN_DIR/logs/stacks/NAME.txt`` and says where it is in ``NAME.pid`` (``PID HOST``), NAME being
``rankN``, ``rankN-workerW`` (worker W of a ``launcher.make_loader``, from :func:`in_worker`) or
``rankN-pidP`` (a process the rank forked: the workers of a script's own ``torch.utils.data.DataLoader``).
"""

from __future__ import annotations

import faulthandler
import os
import re
import socket
from collections.abc import Callable
from typing import IO

from ..processes import alive
from ..spec import STACKS_SIGNAL as SIGNAL

_files: list[IO[str]] = []  # kept open for the life of the process: faulthandler writes to the descriptor
_where: tuple[str, int] | None = None  # (folder, rank) of this rank, for its DataLoader workers


def install(folder: str | None, rank: int, name: str | None = None) -> None:
    """Dump every thread's stack into ``folder/NAME.txt`` on :data:`SIGNAL` (NAME: ``name``, else
    ``rank{rank}``); nothing when ``folder`` is None or cannot be written: stacks are a help, never a reason
    to fail a rank."""
    global _where
    if not folder:
        return
    if name is None:
        if _where is None:  # once per process: a hook cannot be removed
            # A child inherits the rank's handler, which would write into the rank's file: each forked child
            # (a DataLoader worker of the user's own loader: fork is torch's default) gets a file of its own.
            os.register_at_fork(after_in_child=_in_forked_child, after_in_parent=_prune)
        _where = (folder, rank)
    name = name or f"rank{rank}"
    try:
        os.makedirs(folder, exist_ok=True)
        dump = open(os.path.join(folder, f"{name}.txt"), "a")  # noqa: SIM115 - kept open, see _files
        faulthandler.register(SIGNAL, file=dump, all_threads=True, chain=False)
        _files.append(dump)
        pid_file = os.path.join(folder, f"{name}.pid")
        tmp = f"{pid_file}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        os.replace(tmp, pid_file)
    except OSError:
        return


def for_workers() -> tuple[str, int] | None:
    """``(folder, rank)`` for :func:`in_worker` when this rank dumps its stacks, else None."""
    return _where


def in_worker(where: tuple[str, int], user_init: Callable[[int], None] | None, worker_id: int) -> None:
    """A DataLoader worker's init: its stacks on :data:`SIGNAL` too (``rank{N}-worker{W}``), then the
    user's ``worker_init_fn``."""
    folder, rank = where
    install(folder, rank, name=f"rank{rank}-worker{worker_id}")
    _remove(os.path.join(folder, f"rank{rank}-pid{os.getpid()}"))  # forked by the rank: named twice
    if user_init is not None:
        user_init(worker_id)


def _in_forked_child() -> None:
    if _where is not None:
        install(_where[0], _where[1], name=f"rank{_where[1]}-pid{os.getpid()}")


def _prune() -> None:
    """Remove the files of the rank's forked children that have ended (a new set of workers each epoch)."""
    if _where is None:
        return
    folder, rank = _where
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = re.fullmatch(rf"rank{rank}-pid(\d+)\.pid", name)
        if m and not alive(int(m.group(1))):
            _remove(os.path.join(folder, name[:-4]))


def _remove(stem: str) -> None:
    for suffix in (".pid", ".txt"):
        try:
            os.remove(stem + suffix)
        except OSError:
            pass
