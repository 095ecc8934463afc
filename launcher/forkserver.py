"""Ranks that start with torch already imported: Python's forkserver, started early with our code preloaded.

A spawned rank spends most of its start-up importing torch. ``launcher run`` starts :mod:`multiprocessing`'s
fork server as soon as it knows it will spawn ranks, with :mod:`launcher.worker` (so torch) preloaded: the
server imports torch while the launcher imports it for the elastic agent, and each rank is then a fork of
that single-threaded server instead of a fresh interpreter. The server's own threads: none of torch's
(``import torch`` starts none); numpy's OpenBLAS server thread, which OpenBLAS re-creates after a fork, as in
every forked DataLoader worker. No CUDA is touched before the fork.

A fork inherits the server's environment, working directory, ``sys.path`` and start method from when the
server started. :func:`start` records the server's environment, the rank spec carries the launcher's, and
:func:`launcher.worker.forked_main` makes the rank what a fresh process started by the launcher would be.

A rank, in turn, starts its DataLoader workers from a fork server of its own (:func:`for_workers`): forking
the rank itself, which runs Gloo's threads, can deadlock the new worker.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import pickle
import signal
from collections.abc import Iterator
from multiprocessing import forkserver
from multiprocessing.context import BaseContext
from typing import Any

#: Modules the server imports before it forks any rank.
PRELOAD = ["launcher.worker"]
#: Modules a rank's own server for its DataLoader workers imports, besides those of the dataset.
WORKER_PRELOAD = ["launcher.serverpreload", "torch", "launcher.data"]
#: What a worker may receive through the server, pickled (tensors excluded: they go through shared memory).
WORKER_PICKLE_LIMIT = 16 << 20

# The server this process started, and its environment: {pid: environ}.
_ours: dict[int | None, dict[str, str]] = {}


def threads_per_rank(nproc: int, cores: int | None = None) -> int:
    """Intra-op threads for each of ``nproc`` ranks sharing this machine's usable cores (at least 1)."""
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, cores // max(1, nproc))


def threads_env(nproc: int) -> dict[str, str]:
    """``OMP_NUM_THREADS`` for ``nproc`` ranks: the user's value, else the cores shared out.

    torchrun sets 1 for every rank; this is the same idea (no rank starts a thread per core of the machine)
    without starving a single rank.
    """
    return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads_per_rank(nproc)))}


def start(nproc: int) -> dict[str, str] | None:
    """Start the server for ``nproc`` ranks unless ours runs (restart it if it died); return its environment.

    Returns None when a server that someone else started in this process is running: its environment is
    unknown, so the caller should start the ranks with the ``spawn`` method instead.
    """
    server = forkserver._forkserver  # the module's singleton, the one torch.multiprocessing forks from
    running = getattr(server, "_forkserver_pid", None)
    if running is not None and running not in _ours:
        return None
    with _environ(threads_env(nproc)):
        multiprocessing.set_forkserver_preload(PRELOAD)
        forkserver.ensure_running()
        pid = getattr(server, "_forkserver_pid", None)
        if pid not in _ours:
            _ours.clear()
            _ours[pid] = dict(os.environ)
    return dict(_ours[pid])


def detach() -> None:
    """In a rank: let go of the server's keep-alive pipe, so the server ends when the launcher does.

    Every process forked from the server holds the pipe's write end (children may use the server in turn),
    and the server stays up until all copies are closed: a rank holding one would keep its own parent alive
    after a SIGKILLed launcher, and so itself (its parent-death signal comes from the server). The rank then
    uses the platform's default start method, like a fresh process.
    """
    server = forkserver._forkserver
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        os.close(fd)
        server._forkserver_alive_fd = None  # type: ignore[attr-defined]
        server._forkserver_address = None  # type: ignore[attr-defined]
    multiprocessing.set_start_method(None, force=True)  # type: ignore[arg-type]


@contextlib.contextmanager
def _environ(updates: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(updates)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def for_workers(*objects: Any) -> BaseContext | None:
    """How a rank starts DataLoader workers that receive ``objects``: from a fork server of its own, or by
    fork (None).

    Forking a rank can deadlock the new worker before it runs any Python: Gloo's run-loop threads create a
    Python thread state, without the GIL, each time they destroy a finished collective (gdb:
    ``~AsyncAllgatherWork`` -> ``decref`` -> ``gil_scoped_acquire`` -> ``PyThreadState_New``), and a fork
    at that instant copies CPython's runtime lock held (CPython issue 112275, fixed after 3.11.7). Seen about
    once in a few hundred test runs; the worker hung until the DataLoader timeout and outlived a killed
    launcher. The rank's own server is single-threaded and forks every worker instead (Python 3.14's default
    start method on Linux).

    Only in a process with a process group (Gloo's threads are the risk), and only when ``objects`` unpickle
    in a fresh interpreter (nothing from ``__main__`` or a script target) and are small (at most
    :data:`WORKER_PICKLE_LIMIT` bytes besides tensors: the server sends them to every worker of every epoch,
    where a fork shares them). The server starts at once, importing torch beside the rank's own set-up, and
    dies with the thread that calls this (:mod:`launcher.serverpreload`): call it from the rank's main thread.
    """
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        return None
    modules = _modules_if_importable(objects)
    if modules is None:
        return None
    from . import stop

    multiprocessing.set_forkserver_preload(WORKER_PRELOAD + modules)
    # Under SLURM the server and its workers must outlive the stop signals (inherited mask; pending ones wait
    # for the rank). Elsewhere they keep SIGTERM: multiprocessing stops leftover workers with it at exit.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stop.SIGNALS if stop.installed() else ())
    try:
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return multiprocessing.get_context("forkserver")


def _modules_if_importable(objects: Any) -> list[str] | None:
    """The modules ``objects`` need when unpickled elsewhere; None when they do not pickle, need a module
    that another interpreter cannot import, or are larger than :data:`WORKER_PICKLE_LIMIT`."""
    import torch

    from .worker import MAIN_ALIAS

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
