"""Every rank can dump all its threads' Python stacks on a signal, without the GIL, ptrace or a port.

``faulthandler.register`` installs a C handler: a rank stuck in C code that holds the GIL, or in a
``time.sleep``, still writes where it is. A process cannot dump another's stack, so the process that knows
every pid (the launcher, or ``launcher stacks RUN_DIR``) sends :data:`SIGNAL`; each rank appends its dump to
``RUN_DIR/logs/stacks/rankN.txt`` and says where it is in ``rankN.pid`` (``PID HOST``).
"""

from __future__ import annotations

import faulthandler
import os
import socket
from typing import IO

from ..spec import STACKS_SIGNAL as SIGNAL

_files: list[IO[str]] = []  # kept open for the life of the rank: faulthandler writes to the descriptor


def install(folder: str | None, rank: int) -> None:
    """Dump every thread's stack into ``folder/rank{rank}.txt`` on :data:`SIGNAL` (nothing when ``folder``
    is None or cannot be written: stacks are a help, never a reason to fail a rank)."""
    if not folder:
        return
    try:
        os.makedirs(folder, exist_ok=True)
        dump = open(os.path.join(folder, f"rank{rank}.txt"), "a")  # noqa: SIM115 - kept open, see _files
        faulthandler.register(SIGNAL, file=dump, all_threads=True, chain=False)
        _files.append(dump)
        pid_file = os.path.join(folder, f"rank{rank}.pid")
        tmp = f"{pid_file}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        os.replace(tmp, pid_file)
    except OSError:
        return
