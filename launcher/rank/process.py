"""What makes a rank a well-behaved process: it dies with its parent, names itself, lets go of the server.

Linux-only effects (``prctl``) are no-ops elsewhere.
"""

from __future__ import annotations

import contextlib
import glob
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Any, NoReturn

from .. import internals, processes

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def _prctl(option: int, arg: Any) -> bool:
    """Linux's prctl(2); False (nothing done) elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(option, arg)
    return True


def die_with_parent(parent: int | None = None) -> None:
    """Linux: get SIGKILL when the parent dies, even by SIGKILL (a rank: its launcher): no orphans.

    ``parent``: the pid the parent had (known to a fork hook); a parent that died before ``prctl`` took
    effect is then seen under a subreaper too, not only when the orphan went to init."""
    if not _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL):
        return
    if os.getppid() == 1 or (parent is not None and os.getppid() != parent):  # died before prctl took effect
        os._exit(128 + signal.SIGKILL)


def set_name(name: str) -> None:
    """The name ``top`` and ``ps -o comm`` show (15 bytes at most)."""
    _prctl(_PR_SET_NAME, name.encode()[:15])


def group_dies_with_this_process() -> int:
    """A rank leading its own process group: fork a watcher that SIGKILLs the group when this process ends,
    however it ends; returns the watcher's pid (0 where Linux's parent-death signal is missing).

    What the rank's code starts with ``subprocess`` (a logging service, a helper binary) is in the rank's
    group but gets no parent-death signal: a rank SIGKILLed with its launcher left such helpers running as
    orphans. The watcher is one small process that only waits, in a process group of its own: what the
    group gets (SIGINT, SIGTERM, and Ctrl-Z's SIGSTOP, which nothing can ignore) never reaches it. A watcher
    in the group was stopped with it: a launcher SIGKILLed while Ctrl-Z held the job left every rank's
    watcher, and what the rank had started, stopped for good. Call it before anything else forks (the at-fork
    hooks of :func:`forked_children_die_with_this_process` must not apply to it), from the main thread, in a
    process that leads its group.
    """
    if not sys.platform.startswith("linux"):
        return 0
    parent = os.getpid()
    group = os.getpgrp()
    pid = os.fork()
    if pid:
        return pid
    try:
        os.setpgid(0, 0)
        set_name(f"launcher-reap{os.environ.get('RANK', '')}")
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, lambda *_: _kill_group_and_exit(group))
        _prctl(_PR_SET_PDEATHSIG, signal.SIGUSR1)
        if os.getppid() != parent:  # the rank died before prctl took effect
            _kill_group_and_exit(group)
        while True:
            signal.pause()
    finally:
        os._exit(0)


def _kill_group_and_exit(group: int) -> NoReturn:
    members = processes.in_group(group)
    with contextlib.suppress(OSError):
        os.killpg(group, signal.SIGKILL)  # SIGKILL ends a stopped process too
    _remove_shared_memory_of(members)
    os._exit(0)


def _remove_shared_memory_of(pids: list[int], wait_s: float = 1.0) -> None:
    """Remove the shared-memory files torch made in ``pids`` (``/dev/shm/torch_PID_*``) once they are gone.

    torch shares a tensor between processes (a DataLoader worker's batch) through a file it creates and
    unlinks at once; a process killed between the two leaves it in /dev/shm for good (an empty one was left
    by a killed job in the suite). Nobody else can still need it: the receiver holds its descriptor."""
    deadline = time.monotonic() + wait_s
    while any(processes.parent_of(p) is not None for p in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    for pid in pids:
        for path in glob.glob(f"/dev/shm/torch_{pid}_*"):
            with contextlib.suppress(OSError):
                os.unlink(path)


def forked_children_die_with_this_process() -> None:
    """Processes this rank forks from its main thread (DataLoader workers) get SIGKILL when the rank dies.

    Without it a SIGKILLed rank's workers notice only at torch's next liveness check (up to 5 s). Forks from
    other threads are left alone: the signal follows the forking thread, not the process.
    """
    forking_thread: list[bool] = []
    os.register_at_fork(
        before=lambda: forking_thread.append(threading.current_thread() is threading.main_thread()),
        after_in_parent=forking_thread.clear,
        after_in_child=lambda: forking_thread.pop() and _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL),
    )


def detach_from_server() -> None:
    """In a rank forked from the launcher's server: let go of the server's keep-alive pipe, so the server ends
    when the launcher does.

    Every process forked from the server holds the pipe's write end (children may use the server in turn),
    and the server stays up until all copies are closed: a rank holding one would keep its own parent alive
    after a SIGKILLed launcher, and so itself (its parent-death signal comes from the server). The rank then
    uses the platform's default start method, like a fresh process.
    """
    internals.forkserver_forget()
    multiprocessing.set_start_method(None, force=True)  # type: ignore[arg-type]


def exit_now(code: int) -> NoReturn:
    """Leave without running C++ static destructors once the work is done and the result written.

    With torch 2.15, a rank (or a plain torchrun script) sometimes aborts at interpreter shutdown with
    "terminate called without an active exception" (a joinable thread destroyed), turning a finished job into
    a SIGABRT failure. What multiprocessing started is cleaned up first, as at a normal exit (and as a spawned
    rank's process does): leftover DataLoader workers and the fork server of the workers, whose socket folder
    in the temp directory would otherwise stay behind.
    """
    internals.run_multiprocessing_exit()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def kill_children() -> None:
    """SIGKILL what multiprocessing started from this process and is still running (DataLoader workers).

    A rank whose target raised must not wait for them: inside a SLURM job they ignore SIGTERM (they must
    outlive a preemption signal), and the exception's traceback keeps the loader that would stop them alive,
    so the interpreter's exit would join them forever and hold the allocation until its time limit.
    """
    for child in multiprocessing.active_children():
        with contextlib.suppress(Exception):
            child.kill()


def quiet_when_withdrawn(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    """``sys.excepthook`` of the fork servers and what they fork: silent when a new child cannot rebuild a
    semaphore it was sent (``multiprocessing.synchronize`` ``__setstate__``), which means its parent stopped
    while it started (Ctrl-C at the start of an epoch) and has already deleted its queues. The parent says why
    it stopped; the child's traceback only buried that. Anything else goes to Python's own hook."""
    import traceback

    synchronize = os.path.join("multiprocessing", "synchronize.py")
    withdrawn = isinstance(value, FileNotFoundError) and any(
        frame.f_code.co_name == "__setstate__" and frame.f_code.co_filename.endswith(synchronize)
        for frame, _ in traceback.walk_tb(tb))
    if not withdrawn:
        sys.__excepthook__(kind, value, tb)
