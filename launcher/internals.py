"""Every private attribute of CPython or torch that the launcher touches, in one place.

Each accessor names the attribute it reads; :data:`REQUIRED` lists them for ``tests/test_internals.py``,
which fails with the attribute's name when an upgrade removes one. Nothing here runs at import time beyond
binding names, so importing it has no side effect on the process.
"""

from __future__ import annotations

import multiprocessing.forkserver
import multiprocessing.util
import os
import signal
import sys
from typing import Any

_ELASTIC, _STATEFUL = "torch.distributed.elastic.", "torchdata.stateful_dataloader.stateful_dataloader"
#: ``(module, dotted attribute path)`` of every private name used below (checked by the test suite).
REQUIRED = [
    *[("multiprocessing.forkserver", f"_forkserver{attr}")
      for attr in ("", "._forkserver_pid", "._forkserver_alive_fd", "._forkserver_address")],
    ("multiprocessing.util", "_exit_function"), ("multiprocessing.util", "_args_from_interpreter_flags"),
    *[("multiprocessing.resource_tracker", name) for name in ("_resource_tracker", "_CLEANUP_FUNCS")],
    *[("multiprocessing.resource_tracker", f"ResourceTracker.{attr}") for attr in ("_fd", "_pid", "_lock")],
    ("multiprocessing.process", "BaseProcess._config"), ("torch.nn.modules.batchnorm", "_BatchNorm"),
    ("torch.nn.modules._functions", "SyncBatchNorm"),
    ("torch.distributed.distributed_c10d", "_set_pg_timeout"),
    *[(_ELASTIC + "agent.server.local_elastic_agent", f"LocalElasticAgent.{attr}")
      for attr in ("_start_workers", "_monitor_workers", "_pcontext")],
    *[(_ELASTIC + "agent.server.api", f"SimpleElasticAgent.{attr}")
      for attr in ("_restart_workers", "_remaining_restarts", "_store")],
    (_ELASTIC + "multiprocessing.api", "MultiprocessContext._pc"),
    *[(_ELASTIC + "rendezvous.dynamic_rendezvous", f"DynamicRendezvousHandler.{attr}")
      for attr in ("_store", "_shared_tcp_store_server", "_state_holder")],
    (_ELASTIC + "rendezvous.dynamic_rendezvous", "_BackendRendezvousStateHolder._backend"),
    (_ELASTIC + "rendezvous.c10d_rendezvous_backend", "C10dRendezvousBackend._store"),
    *[("torch.multiprocessing.spawn", f"ProcessContext.{a}") for a in ("error_files", "join", "sentinels")],
    ("torch.utils.data.dataloader", "_MultiProcessingDataLoaderIter._workers"),
    ("torch.utils.data.dataloader", "DataLoader._iterator"),
    *[(_STATEFUL, f"_StatefulMultiProcessingDataLoaderIter.{name}") for name in
      ("_get_data", "_workers", "_index_queues", "_workers_status", "_worker_pids_set")],
    ("torch.utils.data._utils.signal_handling", "_remove_worker_pids"),
    *[(_STATEFUL, f"StatefulDataLoader.{name}") for name in ("_get_iterator", "next_iter_state")],
    ("tarfile", "TarFile.members"), ("tarfile", "TarInfo.offset"), ("tarfile", "TarInfo.offset_data"),
    ("torch", "_dynamo"), ("atexit", "_clear"), ("atexit", "_run_exitfuncs"), ("threading", "_shutdown"),
    ("torch.distributed.fsdp", "FSDPModule._get_fsdp_state"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"), ("torch.serialization", "_get_layout"),
]
DCP_METADATA_PRIVATE = REQUIRED[-3:]  #: private names in a DCP ``.metadata`` pickle (checkpoint/sharded.py)

#: torch modules a rank imports on first use that its fork server imports once instead. ``torch._dynamo``: an
#: optimizer imports it at its first parameter group (``add_param_group`` carries ``torch._disable_dynamo``),
#: compiling or not: over a second of CPU in every rank of every start.
LAZY_TORCH_MODULES = ["torch._dynamo"]


def forkserver_pid() -> int | None:
    """The pid of this process's multiprocessing fork server (``_forkserver._forkserver_pid``), or None."""
    return getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)  # type: ignore[attr-defined]


def forkserver_forget() -> None:
    """Let go of the fork server inherited from the parent: close its keep-alive pipe and forget its address
    (``_forkserver._forkserver_alive_fd`` / ``_forkserver_address``), so the next use starts a server of our
    own and the parent's server can end when its owner does."""
    server: Any = multiprocessing.forkserver._forkserver  # type: ignore[attr-defined]
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        os.close(fd)
        server._forkserver_alive_fd = None
        server._forkserver_address = None


def forkserver_kill() -> None:
    """SIGKILL this process's fork server, reap it, forget it as ``ForkServer._stop`` would: the next use
    starts a new one (``_forkserver._forkserver_pid`` / ``_forkserver_alive_fd`` / ``_forkserver_address``)"""
    server: Any = multiprocessing.forkserver._forkserver  # type: ignore[attr-defined]
    pid = getattr(server, "_forkserver_pid", None)
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)  # prompt after SIGKILL
    except (ProcessLookupError, ChildProcessError):
        pass
    forkserver_forget()
    server._forkserver_pid = None


def forkserver_start_as_fork(preload: list[str], in_child: Any = None) -> None:
    """Start multiprocessing's fork server as ``ForkServer.ensure_running`` does, but as a fork of this
    process (it inherits what this process imported), and bind it as ensure_running would: ``_forkserver``'s
    ``_forkserver_address`` / ``_forkserver_alive_fd`` / ``_forkserver_pid``. Nothing when a server runs.
    Only for a process that runs no thread of its own (a fork copies one thread; a lock another one held
    stays held: CPython issue 112275). The server keeps stdin/stdout/stderr and its two descriptors, as a
    fresh one would. ``in_child``: called in the server first (no arguments); it never returns to the caller.
    """
    import socket
    import traceback
    from multiprocessing import connection, forkserver, util

    server: Any = multiprocessing.forkserver._forkserver  # type: ignore[attr-defined]
    if server._forkserver_pid is not None:
        return
    listener = socket.socket(socket.AF_UNIX)
    address = connection.arbitrary_address("AF_UNIX")  # type: ignore[attr-defined]
    listener.bind(address)
    if not util.is_abstract_socket_namespace(address):  # type: ignore[attr-defined]
        os.chmod(address, 0o600)
    listener.listen()
    alive_r, alive_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            # not util.close_all_fds_except with 0-2 kept: its empty range os.closerange(0, 0) becomes
            # close_range(0, ~0) on Linux, every descriptor (CPython 3.11.7)
            low = 3
            for fd in [*sorted((listener.fileno(), alive_r)), os.sysconf("SC_OPEN_MAX")]:
                if fd > low:
                    os.closerange(low, fd)
                low = fd + 1
            if in_child is not None:
                in_child()
            forkserver.main(listener.fileno(), alive_r, preload)  # type: ignore[attr-defined]
        except SystemExit:
            code = 0  # the last client has gone (its keep-alive pipe closed)
        except Exception:  # noqa: BLE001 - shown; the launcher then starts a fresh server
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)  # never the caller's atexit handlers nor its code after the fork
    os.close(alive_r)
    listener.close()
    server._forkserver_address = address
    server._forkserver_alive_fd = alive_w
    server._forkserver_pid = pid


def start_resource_tracker_alone() -> None:
    """Start multiprocessing's resource tracker, as ``resource_tracker.ensure_running`` would, but leading a
    process group of its own and ignoring SIGHUP/SIGQUIT (``_resource_tracker._fd`` / ``_pid`` / ``_lock``,
    ``util._args_from_interpreter_flags``); nothing when it runs. It unlinks the job's semaphores (``/dev/shm/
    sem.mp-*``) once the job is gone; in the launcher's group, a kill of that group (``kill -9 -PGID``, a
    closed terminal's SIGHUP) took it first and they stayed in /dev/shm for good."""
    import subprocess
    import threading
    from multiprocessing import resource_tracker, spawn, util

    tracker: Any = resource_tracker._resource_tracker  # type: ignore[attr-defined]
    with tracker._lock:
        if tracker._fd is not None:
            return
        r, w = os.pipe()
        # Its "leaked semaphore objects to clean up" warning is about the queues of ranks stopped by a signal:
        # cleaning them up is its job here, and users read the warning as a fault of the stopped job.
        quiet = ["-W", "ignore:resource_tracker:UserWarning"]
        # One more kind of resource, "folder": multiprocessing's pymp-* socket folder, which a SIGKILLed
        # launcher left in the temp directory (see remove_tempdir_with_tracker).
        code = ("import shutil; from multiprocessing import resource_tracker as t; "
                "t._CLEANUP_FUNCS['folder'] = lambda p: shutil.rmtree(p, ignore_errors=True); "
                f"t.main({r})")
        command = [spawn.get_executable(), *util._args_from_interpreter_flags(),  # type: ignore[attr-defined]
                   *quiet, "-c", code]
        # SIG_IGN survives exec (settable from the main thread only; elsewhere the own group suffices)
        main = threading.current_thread() is threading.main_thread()
        ignored = (signal.SIGHUP, signal.SIGQUIT) if main else ()
        saved = {s: signal.signal(s, signal.SIG_IGN) for s in ignored}
        try:
            child = subprocess.Popen(command, pass_fds=[r], process_group=0, stdin=subprocess.DEVNULL)
        finally:
            os.close(r)
            for sig, handler in saved.items():
                signal.signal(sig, handler)
        # It ends once the last of the job's processes has closed the pipe, after the launcher:
        # multiprocessing may reap it (a restart); subprocess must not (nor warn of a child "still running").
        child.returncode = 0
        tracker._fd, tracker._pid = w, child.pid
        _TRACKERS.add(child.pid)


_TRACKERS: set[int] = set()  # resource trackers started by start_resource_tracker_alone (they know "folder")


def remove_tempdir_with_tracker() -> None:
    """Have the resource tracker remove this process's ``pymp-*`` folder (made now if missing) once the job is
    gone (a SIGKILL does not remove it; the tracker outlives the job). Only with a tracker that
    :func:`start_resource_tracker_alone` started (``_resource_tracker._pid``; others know no "folder" kind);
    a path the tracker's protocol cannot carry (a ':') is left out."""
    from multiprocessing import resource_tracker, util

    if resource_tracker._resource_tracker._pid not in _TRACKERS:  # type: ignore[attr-defined]
        return
    path = util.get_temp_dir()
    if ":" not in path and "\n" not in path and len(path) < 400:
        resource_tracker.register(path, "folder")


def multiprocessing_tempdir() -> str | None:
    """The ``pymp-*`` folder multiprocessing made for this process (``current_process()._config
    ["tempdir"]``; the fork server's socket is in it), if any. A normal exit removes it, ``os._exit`` not."""
    import multiprocessing.process

    return multiprocessing.process.current_process()._config.get("tempdir")  # type: ignore[attr-defined]


def run_multiprocessing_exit() -> None:
    """What multiprocessing does at a normal interpreter exit (``multiprocessing.util._exit_function``):
    terminate and join leftover children, stop the fork server and remove its socket folder."""
    multiprocessing.util._exit_function()  # type: ignore[attr-defined]


def forget_exit_handlers() -> None:
    """A rank forked from the launcher's server: drop the ``atexit`` handlers it inherited (the launcher's
    own, such as the one that stops the ranks' server); what the rank's code registers from here on runs at
    its end (:func:`run_python_exit`). ``atexit._clear``."""
    import atexit

    atexit._clear()  # type: ignore[attr-defined]


def run_python_exit() -> None:
    """What Python's own end does, for a rank that leaves by ``os._exit`` (as multiprocessing's children do):
    wait for non-daemon threads, run ``atexit`` handlers (a logging service closes its run there), flush the
    streams (``threading._shutdown``, ``atexit._run_exitfuncs``, as ``Py_FinalizeEx``; each at most once)."""
    import atexit
    import threading

    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()  # type: ignore[attr-defined]
    atexit._clear()  # type: ignore[attr-defined]
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def batchnorm_base() -> type:
    """torch's common base of ``BatchNorm1d/2d/3d`` (``torch.nn.modules.batchnorm._BatchNorm``)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return _BatchNorm


def fused_sync_batchnorm() -> Any:
    """torch's autograd function behind ``nn.SyncBatchNorm`` (``torch.nn.modules._functions.SyncBatchNorm``):
    its fused CUDA kernels, called with the same arguments as ``nn.SyncBatchNorm.forward`` passes."""
    from torch.nn.modules._functions import SyncBatchNorm as fused

    return fused


def set_group_timeout(timeout: Any, group: Any = None) -> None:
    """A process group's collective timeout: ``torch.distributed.set_timeout`` where torch has it (2.14 does),
    else the private ``distributed_c10d._set_pg_timeout`` it grew from (torch 2.11 on the GPU machines)."""
    import torch.distributed as tdist
    from torch.distributed import distributed_c10d

    setter = getattr(tdist, "set_timeout", None) or distributed_c10d._set_pg_timeout
    setter(timeout, group)


def agent_restarts_done(agent: Any) -> int:
    """How many times the elastic agent has restarted its ranks (``max_restarts - _remaining_restarts``)."""
    return int(agent.get_worker_group().spec.max_restarts - agent._remaining_restarts)


def _process_context(agent: Any) -> Any:
    """torch.multiprocessing's context of the agent's last attempt (``agent._pcontext._pc``), or None."""
    return getattr(getattr(agent, "_pcontext", None), "_pc", None)


def agent_processes(agent: Any) -> tuple[dict[int, str], list[Any]]:
    """``(error files by local rank, processes)`` of the elastic agent's last attempt (``agent._pcontext``,
    and ``_pc.processes`` of a multiprocessing context): the only handle on ranks that died by a signal."""
    pcontext = getattr(agent, "_pcontext", None)
    error_files = dict(getattr(pcontext, "error_files", None) or {})
    processes = list(getattr(_process_context(agent), "processes", None) or [])
    return error_files, processes


def set_failure_grace(agent: Any, seconds: float, on_exit: Any = None) -> None:
    """When a rank of the agent's current attempt fails, torch's process context waits ``grace_period`` for
    the others, SIGTERMs them, waits again, then SIGKILLs; 30 s by default (``_pc.join``, called by ``_poll``
    without one). Bind ours. ``on_exit(pids)`` runs when a rank has ended, before torch stops the others."""
    import multiprocessing.connection

    pc = _process_context(agent)
    join = getattr(pc, "join", None)
    if join is None:
        return

    def join_with_grace(timeout: float | None = None, grace_period: float | None = None) -> Any:
        if on_exit is not None and multiprocessing.connection.wait(list(pc.sentinels), timeout=0):
            on_exit([p.pid for p in pc.processes])
        return join(timeout, grace_period=seconds if grace_period is None else grace_period)

    pc.join = join_with_grace


def release_rendezvous_stores(agent: Any) -> None:
    """Drop an elastic agent's c10d stores once its run is over (``SimpleElasticAgent._store``; the rendezvous
    handler's ``_store``, ``_shared_tcp_store_server``, ``_state_holder._backend._store``): the server and its
    thread end now, here. Left to the garbage collector (the agent lives in cycles), a process forked since (a
    DataLoader worker) collected its copy and joined the thread a fork does not copy: SIGSEGV."""
    group = agent.get_worker_group()
    group.store = None
    handler = group.spec.rdzv_handler
    backend = getattr(getattr(handler, "_state_holder", None), "_backend", None)
    for owner, name in ((agent, "_store"), (handler, "_store"), (handler, "_shared_tcp_store_server"),
                        (backend, "_store")):
        if hasattr(owner, name):
            setattr(owner, name, None)


def spawn_error_files(agent: Any) -> list[str]:
    """The ``pytorch-errorfile-*.pickle`` files torch.multiprocessing made in the temp directory for the
    agent's last attempt (``agent._pcontext._pc.error_files``): torch never removes them."""
    return [f for f in (getattr(_process_context(agent), "error_files", None) or []) if f]


def fsdp_comms(module: Any) -> tuple[Any, Any] | None:
    """The all-gather and reduce-scatter an FSDP2 module runs (torch's or the user's: torch 2.14 has setters,
    no getters) in its one parameter group (``_get_fsdp_state()._fsdp_param_groups``); else None."""
    groups = getattr(module._get_fsdp_state(), "_fsdp_param_groups", [])
    if len(groups) != 1:
        return None
    comms = [getattr(groups[0], f"_{name}_comm", None) for name in ("all_gather", "reduce_scatter")]
    return (comms[0], comms[1]) if None not in comms else None


def dataloader_workers(iterator: Any) -> list[Any]:
    """The worker processes of a multi-process DataLoader iterator (``_workers``), to say which one died."""
    return list(getattr(iterator, "_workers", None) or [])


def stateful_workers_iterator(loader: Any, wait_s: float) -> Any:
    """torchdata's iterator of a StatefulDataLoader with workers (``_StatefulMultiProcessingDataLoaderIter``,
    made as ``StatefulDataLoader._get_iterator`` does, ``next_iter_state`` consumed), whose every wait for its
    workers (``_get_data``; an epoch's start-up handshake too) polls their health every ``loader.timeout`` s
    and gives up after ``wait_s`` in all, raising :class:`launcher.errors.DataLoaderWaitExpired`."""
    import time

    from torch.utils.data._utils import signal_handling
    from torchdata.stateful_dataloader import stateful_dataloader as sd

    from .errors import DataLoaderWaitExpired

    class Patient(sd._StatefulMultiProcessingDataLoaderIter):  # type: ignore[misc, name-defined]
        def __init__(self, *args: Any) -> None:
            self.made_in = os.getpid()  # before torch's __init__, which an interrupt can cut short
            super().__init__(*args)

        def __del__(self) -> None:
            # A copy collected in a later loader's worker (a fork) would stop ours: only forget its pids.
            if getattr(self, "made_in", None) != os.getpid():
                if getattr(self, "_worker_pids_set", False):  # (a new iterator at its address would clash)
                    signal_handling._remove_worker_pids(id(self))
                return
            self.shut_down()

        def shut_down(self) -> None:  # torch's __del__; a no-op once done
            # Interrupted in __init__ (Ctrl-C while its workers start), torchdata's __del__ failed on the
            # status list it sets last, printing an "Exception ignored" traceback, and stopped no worker.
            if not hasattr(self, "_workers_status") and hasattr(self, "_index_queues"):
                sent = len(self._index_queues)  # a worker without its queue yet is only joined or killed
                self._workers_status = [i < sent for i in range(len(self._workers))]
            if hasattr(self, "_workers_status"):
                super().__del__()

        def _get_data(self) -> Any:
            start = time.monotonic()
            while True:
                try:
                    return super()._get_data()
                except RuntimeError as e:
                    waited = time.monotonic() - start
                    if not str(e).startswith("DataLoader timed out"):
                        raise
                    if waited >= wait_s:
                        raise DataLoaderWaitExpired(waited) from e
                    # nothing yet, every worker alive: wait on (the iterator's state is unchanged)

        def stop_workers(self) -> None:
            """End the workers now, after an error that gives up on them (torch: when collected, 5 s each)."""
            if getattr(self, "_worker_pids_set", False):  # else torch's SIGCHLD check calls a kill a crash
                signal_handling._remove_worker_pids(id(self))
                self._worker_pids_set = False
            for w in getattr(self, "_workers", ()):
                if w.is_alive():
                    w.kill()
            self.shut_down()

    loader.check_worker_number_rationality()
    it = Patient(loader, loader.next_iter_state)
    loader.next_iter_state = None
    return it


def dataloader_iterator(loader: Any) -> Any:
    """The iterator a DataLoader keeps for itself (``_iterator``; None before the first epoch)."""
    return getattr(loader, "_iterator", None)


def tar_forget_members(tar: Any) -> None:
    """Drop the headers a ``tarfile.TarFile`` keeps of every member it has read (``TarFile.members``): a
    reader that streams a shard of millions of members would otherwise hold all their headers."""
    tar.members.clear()


def tar_member_offset(member: Any) -> int:
    """Where a tar member's header starts in the archive (``TarInfo.offset``)."""
    return int(member.offset)


def tar_member_data_end(member: Any) -> int:
    """Where a tar member's data ends in the archive, padded to 512 bytes (``TarInfo.offset_data``)."""
    return int(member.offset_data) + -(-int(member.size) // 512) * 512
