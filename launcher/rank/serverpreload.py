"""Imported first by both fork servers: the launcher's, which forks the ranks
(:mod:`launcher.launching.rankserver`), and each rank's, which forks its DataLoader workers
(:mod:`launcher.data.workerserver`).

The server and every process it forks die with their parent. The chain is then: a SIGKILLed launcher takes its
server, the server its ranks, a rank its workers' server, that server the workers, each at once (the kernel's
parent-death signal). Without it a SIGKILLed launcher's ranks trained on until the server had torn down an
interpreter that imported torch (the run directory's lock gone meanwhile), and a SIGKILLed rank's workers
waited for torch's liveness check; each worker also holds the server's keep-alive pipe, so the server never
saw the rank go.
"""

import os
import sys

from .process import die_with_parent, quiet_when_withdrawn, set_name

_SERVER = os.getpid()
_server_forking: list[bool] = [False]


def _after_in_child() -> None:
    # Only the server's own forks: the hooks are inherited, and a rank forking from a thread other than its
    # main one must not get a signal that follows that thread (process.forked_children_die_with_this_process).
    if _server_forking[0]:
        die_with_parent(_SERVER)


def _before() -> None:
    _server_forking[0] = os.getpid() == _SERVER


def become_server(parent: int) -> None:
    """This process, a fork of ``parent`` (a rank), is now a fork server: it dies with ``parent`` and its own
    forks die with it, as a fresh server's do (:func:`launcher.data.workerserver.start_early`)."""
    global _SERVER
    _SERVER = os.getpid()
    die_with_parent(parent)
    set_name(f"launcher-data{os.environ.get('RANK', '')}")  # in top, ps -o comm (its workers inherit it)


die_with_parent()
os.register_at_fork(before=_before, after_in_child=_after_in_child)
sys.excepthook = quiet_when_withdrawn  # the forked children report through it (multiprocessing.forkserver)
