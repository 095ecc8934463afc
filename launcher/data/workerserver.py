"""A rank's DataLoader workers start from a fork server of the rank's own, never by forking the rank.

Forking a rank can deadlock the new worker before it runs any Python: Gloo's run-loop threads create a Python
thread state, without the GIL, each time they destroy a finished collective (gdb: ``~AsyncAllgatherWork`` ->
``decref`` -> ``gil_scoped_acquire`` -> ``PyThreadState_New``), and a fork at that instant copies CPython's
runtime lock held (CPython issue 112275, fixed after 3.11.7). The rank's own server is single-threaded and
forks every worker instead (Python 3.14's default start method on Linux).
"""

from __future__ import annotations

import io
import multiprocessing
import pickle
import signal
from multiprocessing import forkserver, resource_tracker
from multiprocessing.context import BaseContext
from typing import Any

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

    multiprocessing.set_forkserver_preload(WORKER_PRELOAD + modules)
    # Under SLURM the server, its workers and multiprocessing's resource tracker must outlive the stop signals
    # (inherited mask; pending ones wait for the rank): SLURM signals every process of the job step. Elsewhere
    # they keep SIGTERM: multiprocessing stops leftover workers with it at exit. Starting the tracker blocks
    # SIGINT and SIGTERM and then *unblocks* them (CPython's resource_tracker.ensure_running), so they are
    # blocked again before the server starts: a preemption's SIGTERM killed the server, and the next epoch's
    # workers with it (tests/test_slurm_nodes.py); a time limit's USR2 killed the tracker.
    signals = stop.SIGNALS if stop.installed() else ()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return multiprocessing.get_context("forkserver")


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
