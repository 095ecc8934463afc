"""A rank's DataLoader workers start from a fork server of the rank's own, never by forking the rank.

Forking a rank can deadlock the new worker before it runs any Python: Gloo's run-loop threads create a Python
thread state, without the GIL, each time they destroy a finished collective (gdb: ``~AsyncAllgatherWork`` ->
``decref`` -> ``gil_scoped_acquire`` -> ``PyThreadState_New``), and a fork at that instant copies CPython's
runtime lock held (CPython issue 112275, fixed after 3.11.7). The rank's own server is single-threaded and
forks every worker instead (Python 3.14's default start method on Linux).

A job with DataLoader workers has its rank fork that server from itself before the process group exists
(:func:`start_early`, while the rank runs one thread): the server then has torch and the rank's code without
importing them, and imports the job's entry module (whatever a dataset needs, it imports). Otherwise (a
script, :func:`launcher.launch`, a rank that runs threads) the server is a fresh interpreter started when a
loader first needs it, importing torch itself beside the rank's start-up (the CPU and memory this costs:
docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import pickle
import signal
import threading
from collections.abc import Iterator, Sequence
from multiprocessing import forkserver, resource_tracker
from multiprocessing.context import BaseContext
from typing import Any

from .. import internals, processes
from ..spec import MAIN_ALIAS

#: Modules a rank's own server for its DataLoader workers imports, besides those of the dataset.
WORKER_PRELOAD = ["launcher.rank.serverpreload", "torch", "launcher.data"]
#: What a worker may receive through the server, pickled (tensors excluded: they go through shared memory).
WORKER_PICKLE_LIMIT = 16 << 20


def for_workers(*objects: Any) -> BaseContext | None:
    """How a rank starts DataLoader workers that receive ``objects``: from a fork server of its own, or by
    fork (None).

    Only in a process with a process group (Gloo's threads are the risk), and only when ``objects`` unpickle
    in a fresh interpreter (nothing from ``__main__`` or a script target) and are small (at most
    :data:`WORKER_PICKLE_LIMIT` bytes besides tensors: the server sends them to every worker of every epoch,
    where a fork shares them). The server starts at once, importing torch beside the rank's own set-up, and
    dies with the thread that calls this (:mod:`launcher.rank.serverpreload`): call it from the rank's main
    thread.
    """
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        return None
    modules = _modules_if_importable(objects)
    if modules is None:
        return None
    from ..rank import stop

    # For a fresh server only: ensure_running does nothing while the rank's early server (start_early) runs,
    # and starts a fresh one if it has died.
    multiprocessing.set_forkserver_preload(WORKER_PRELOAD + modules)
    processes.short_socket_folder()
    with _stop_signals_blocked(stop.SIGNALS if stop.installed() else ()):
        forkserver.ensure_running()
    return multiprocessing.get_context("forkserver")


def start_early(modules: Sequence[str], stop_signals: Sequence[signal.Signals]) -> None:
    """Fork this rank's server for DataLoader workers now, from this process, if it runs no other thread
    (call it before the process group starts Gloo's) and no server yet: the server imports ``modules`` (the
    job's entry module) and has everything else this rank imported. ``stop_signals``: blocked in the server
    and its workers (the signals :mod:`launcher.rank.stop` will handle in this rank)."""
    if threading.active_count() != 1 or internals.forkserver_pid() is not None:
        return
    processes.short_socket_folder()
    rank = os.getpid()
    with _stop_signals_blocked(stop_signals):
        internals.forkserver_start_as_fork(WORKER_PRELOAD + list(modules), in_child=lambda: _serve(rank))


def _serve(rank: int) -> None:
    # Imported here, in the server: its import makes the importing process die with its parent and quiet on
    # exit (right for a server, not for a rank under torchrun or srun that never imported it).
    from ..rank import serverpreload

    serverpreload.become_server(rank)


@contextlib.contextmanager
def _stop_signals_blocked(signals: Sequence[signal.Signals]) -> Iterator[None]:
    """Around starting the server: the resource tracker, then the server, with ``signals`` blocked.

    Under SLURM the server, its workers and multiprocessing's resource tracker must outlive the stop signals
    (inherited mask; pending ones wait for the rank): SLURM signals every process of the job step. Elsewhere
    they keep SIGTERM: multiprocessing stops leftover workers with it at exit. Starting the tracker blocks
    SIGINT and SIGTERM and then *unblocks* them (CPython's resource_tracker.ensure_running), so they are
    blocked again before the server starts: a preemption's SIGTERM killed the server, and the next epoch's
    workers with it (tests/test_slurm_nodes.py); a time limit's USR2 killed the tracker.
    """
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _modules_if_importable(objects: Any) -> list[str] | None:
    """The modules ``objects`` need when unpickled elsewhere; None when they do not pickle, need a module
    that another interpreter cannot import, or are larger than :data:`WORKER_PICKLE_LIMIT`."""
    import torch

    class Probe(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return 0 if isinstance(obj, torch.Tensor) else None

    class Check(pickle.Unpickler):
        def __init__(self, file: io.BytesIO) -> None:
            super().__init__(file)
            self.modules: set[str] = set()

        def find_class(self, module: str, name: str) -> Any:
            if module.partition(".")[0] in ("__main__", "__mp_main__", MAIN_ALIAS):
                raise pickle.UnpicklingError(f"{module}.{name} cannot be imported in another interpreter")
            self.modules.add(module)
            return super().find_class(module, name)

        def persistent_load(self, pid: Any) -> Any:
            return None

    buffer = io.BytesIO()
    try:
        Probe(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(objects)
        if buffer.tell() > WORKER_PICKLE_LIMIT:
            return None
        buffer.seek(0)
        check = Check(buffer)
        check.load()
    except Exception:  # noqa: BLE001  (whatever fails here would fail in the worker: fork instead)
        return None
    return sorted(check.modules)
