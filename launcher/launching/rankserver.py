"""Ranks that start with torch already imported: Python's forkserver, started early with our code preloaded.

A spawned rank spends most of its start-up importing torch. ``launcher run`` imports torch once, for the
elastic agent, and then forks :mod:`multiprocessing`'s fork server from itself, with
:mod:`launcher.rank.program` preloaded: each rank is then a fork of that single-threaded server instead of a
fresh interpreter. The fork is taken while the launcher still runs one thread, before it imports the user's
entry or opens anything of the run. A fresh server would import torch a second time: the same start-up on
idle cores, more CPU and memory. The Python API (:func:`launcher.launch`) still starts a fresh one: its
caller's process may run threads of its own. The server's own threads: none of torch's (``import torch``
starts none); numpy's OpenBLAS server thread, which OpenBLAS re-creates after a fork, as in every forked
DataLoader worker. No CUDA is touched before the fork.

A rank inherits the server's environment, working directory, ``sys.path`` and start method from when the
server started. :func:`start` records the server's environment, the rank spec carries the launcher's, and
:func:`launcher.rank.program.forked_main` makes the rank what a fresh process started by the launcher would
be.

A rank, in turn, starts its DataLoader workers from a fork server of its own
(:mod:`launcher.data.workerserver`): forking the rank itself, which runs Gloo's threads, can deadlock the new
worker.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import sys
import threading
from collections.abc import Iterator
from multiprocessing import forkserver

from .. import env, internals, processes

#: Modules the server imports before it forks any rank: the server and its ranks die with the launcher first;
#: what torch imports lazily in every rank last (:data:`launcher.internals.LAZY_TORCH_MODULES`).
PRELOAD = ["launcher.rank.serverpreload", "launcher.rank.program", *internals.LAZY_TORCH_MODULES]

# The server this process started, and its environment: {pid: environ}.
_ours: dict[int | None, dict[str, str]] = {}


def threads_per_rank(nproc: int, cores: int | None = None) -> int:
    """Intra-op threads for each of ``nproc`` ranks sharing this machine's usable cores (at least 1)."""
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, cores // max(1, nproc))


def threads_env(nproc: int) -> dict[str, str]:
    """``OMP_NUM_THREADS`` for ``nproc`` ranks: the user's value, else the cores shared out.

    torchrun sets 1 for every rank; this is the same idea (no rank starts a thread per core of the machine)
    without starving a single rank. A value that is not a usable thread count (empty, ``abc``, ``0``,
    ``1e9``, more threads than a process may start) is replaced with a warning, as libgomp ignores it: it
    used to crash every rank in ``torch.set_num_threads``.
    """
    ours = str(threads_per_rank(nproc))
    given = os.environ.get("OMP_NUM_THREADS")
    if given is None:
        return {"OMP_NUM_THREADS": ours}
    if env.thread_count(given) is None:
        if given not in _warned:
            _warned.add(given)
            print(f"[launcher] warning: OMP_NUM_THREADS={given!r} is not a thread count from 1 to "
                  f"{env.MAX_THREADS}: the ranks use {ours} each", file=sys.stderr, flush=True)
        return {"OMP_NUM_THREADS": ours}
    return {"OMP_NUM_THREADS": given.strip()}


_warned: set[str] = set()


def start(nproc: int, *, fork: bool = False) -> dict[str, str] | None:
    """Start the server for ``nproc`` ranks unless ours runs (restart it if it died); return its environment.

    ``fork``: the server is a fork of this process, which has imported torch (the ``launcher`` command, whose
    only thread this is); else a fresh interpreter that imports torch itself, beside this process.

    Returns None when a server that someone else started in this process is running: its environment is
    unknown, so the caller should start the ranks with the ``spawn`` method instead.
    """
    running = internals.forkserver_pid()  # the module's singleton, the one torch.multiprocessing forks from
    processes.short_socket_folder()
    if running is not None and running not in _ours:
        return None
    with _environ(threads_env(nproc)):
        internals.start_resource_tracker_alone()  # before the server, which would start one of its own
        multiprocessing.set_forkserver_preload(PRELOAD)
        if fork and threading.active_count() == 1:  # a fork of a process with other threads can deadlock
            internals.forkserver_start_as_fork(PRELOAD)
        forkserver.ensure_running()  # a no-op after the fork; else starts (or restarts) a fresh one
        internals.remove_tempdir_with_tracker()  # its socket folder, should the launcher be SIGKILLed
        pid = internals.forkserver_pid()
        if pid not in _ours:
            if not _ours:
                atexit.register(stop)
            _ours.clear()
            _ours[pid] = dict(os.environ)
    return dict(_ours[pid])


def stop() -> None:
    """End our server now (the launcher is exiting; at exit, and before ``os._exit``).

    Left to itself the server ends once this process has exited, after tearing down an interpreter that has
    imported torch: about 0.5 s on 2 cores, more on a busy machine, so that a ``launcher`` that had returned
    still had a process running (seen in CI as a process left on a machine 1 s after the launcher exited).
    Its ranks have ended (or been killed) by now, and it holds nothing worth a graceful exit.
    """
    if internals.forkserver_pid() in _ours:
        internals.forkserver_kill()
        _ours.clear()


@contextlib.contextmanager
def _environ(updates: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(updates)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
