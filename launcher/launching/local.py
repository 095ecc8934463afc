"""Start ``nproc`` ranks on this machine and supervise them with torch.distributed.elastic's agent.

What we add on top of the agent (and why we build it ourselves instead of calling ``elastic_launch``):

* the rendezvous is a c10d store created on port 0 of loopback and kept open, so concurrent jobs never race
  for a port (the agent hands that store to the ranks: MASTER_PORT is its port);
* every rank is a fork of a server that has imported torch already (:mod:`launcher.launching.rankserver`:
  start-up without the ranks' own ``import torch``) and runs :func:`launcher.rank.program.forked_main`
  (named, not imported, here); the agent's
  ``@record`` writes the traceback of a failure, so the user needs no decorator; the first failure is
  reported with rank, host, exit code or signal and traceback;
* Ctrl-C stops the ranks gracefully and a second Ctrl-C kills them at once (the agent alone would wait);
* ranks run in their own sessions and are killed by process group, DataLoader workers included.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from torch.distributed.elastic.agent.server.api import WorkerSpec, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException, Std
from torch.distributed.elastic.rendezvous import RendezvousError, RendezvousParameters
from torch.distributed.elastic.rendezvous import registry as rdzv_registry

from .. import internals, perf, rundir
from ..dist import HEARTBEAT_ENV
from ..errors import LaunchError, RankFailure
from ..spec import Process, RankSpec, rank_function
from . import failures, machines, pause, rankserver, stacks

#: Most ranks started from the fork server: torch's process context sends every rank the result queues of
#: all ranks, and the server passes at most 256 file descriptors per request (126 ranks failed with "too many
#: fds"). More ranks start with the ``spawn`` method, as torchrun starts them (each imports torch itself).
MAX_FORKED_RANKS = 100

#: Seconds the other ranks of a failed attempt get to exit before SIGKILL (half before, half after SIGTERM).
#: A stop (Ctrl-C, SIGTERM) gives each rank ``distributed.stop_grace_s`` instead.
SHUTDOWN_TIMEOUT_S = 3


def spawn(
    spec: RankSpec,
    nproc: int,
    log_dir: Path,
    *,
    max_restarts: int = 0,
    console_ranks: set[int] | None = frozenset({0}),  # type: ignore[assignment]
    log_line_prefix: str = "[rank${rank}]:",
    nodes: tuple[int, int] = (1, 1),
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
) -> dict[int, Any]:
    """Run ``spec`` in ``nproc`` local ranks; return ``{global rank: result}`` (torch elastic's result).

    With ``nodes`` other than ``(1, 1)``, this machine's ranks join those of the other machines that meet at
    ``rdzv_endpoint`` under ``rdzv_id`` (torch elastic's c10d rendezvous, as torchrun's): the machine whose
    address the endpoint names hosts the store.

    Raises:
        RankFailure: a rank raised or died (after ``max_restarts`` restarts of all ranks).
        SignalException: the launcher was asked to stop (the ranks are stopped first).
    """
    log_dir = Path(log_dir).absolute()
    log_dir.mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y%m%d-%H%M%S-") + os.urandom(3).hex()  # sorts by start time
    multi = nodes != (1, 1)
    if not multi:  # the run directory is ours (locked): a SIGKILLed launcher's heartbeat folder goes now
        for stale in log_dir.glob("heartbeat-*"):
            shutil.rmtree(stale, ignore_errors=True)
    heartbeats = log_dir / f"heartbeat-{run_id}"
    heartbeats.mkdir()
    meet = machines.Meeting(rdzv_endpoint or "") if multi else None
    threads = {**rankserver.threads_env(nproc), HEARTBEAT_ENV: str(heartbeats), **(meet.env if meet else {})}
    server_env = rankserver.start(nproc) if nproc <= MAX_FORKED_RANKS else None
    if server_env is not None:
        # Handed to each rank through the fork server's socket: no file holds the environment.
        spec = spec.with_process(Process(environ={**os.environ, **threads}, server_env=server_env,
                                         cwd=os.getcwd(), sys_path=list(sys.path)))
    entrypoint = rank_function("forked_main")  # by name: the launching side never imports the rank program
    local_addr = meet.local_addr if meet else "127.0.0.1"
    rdzv = RendezvousParameters(
        backend="c10d",
        endpoint=meet.endpoint if meet else "127.0.0.1:0",
        run_id=rdzv_id if meet and rdzv_id else run_id,
        min_nodes=nodes[0],
        max_nodes=nodes[1],
        local_addr=local_addr,
        # decided here: torch's own test resolves this machine's hostname, which need not resolve
        is_host=meet.is_host if meet else True,
        join_timeout=int(spec.startup_timeout_s),
        # a store operation that gets no answer (the host machine is gone, its link cut) fails after this
        read_timeout=max(1, int(spec.timeout_s)),
    )
    worker_spec = WorkerSpec(
        role="rank",
        local_world_size=nproc,
        entrypoint=entrypoint,
        args=(spec,),
        rdzv_handler=rdzv_registry.get_rendezvous_handler(rdzv),
        max_restarts=max_restarts,
        monitor_interval=0.1,
        local_addr=local_addr,
    )
    # torch names its folder after the rendezvous' run id, the job's name on every machine when several
    # meet: a folder of ours in between keeps them sorted by start time and named by machine
    rank_logs = log_dir / f"{run_id}-{socket.gethostname()}" if multi else log_dir
    logs = DefaultLogsSpecs(
        log_dir=str(rank_logs), redirects=Std.ALL, tee=Std.ALL, local_ranks_filter=set(console_ranks or ())
    )
    agent = _Agent(
        spec=worker_spec,
        logs_specs=logs,
        start_method="forkserver" if server_env is not None else "spawn",
        # torch's agent takes an empty template for none given and prefixes "[rank0]:": a truthy "" asks for
        # no prefix (torchrun's --log-line-prefix-template '' cannot either)
        log_line_prefix_template=log_line_prefix or _NoPrefix(),
        exit_barrier_timeout=spec.startup_timeout_s,  # waiting for the other machines to finish
        **_shutdown_timeout(spec.stop_grace_s),
    )
    agent.stacks_dir = Path(spec.stacks_dir) if spec.stacks_dir else None

    def cleanup() -> None:
        _before_exit(agent)
        agent.remove_error_files()
        shutil.rmtree(heartbeats, ignore_errors=True)

    disarm = None
    if meet is not None:
        agent.roster = machines.Roster(meet.host_ip, meet.port, rdzv.run_id, meet.local_addr)
        disarm = machines.watchdog(agent.ranks_gone, functools.partial(_wait_bound, agent, spec),
                                   agent.roster.lost, cleanup)
    watch = perf.watch(heartbeats, log_dir, spec.progress_s)  # a progress line, perf.jsonl, a straggler named
    if agent.stacks_dir is not None:  # a rank without a step for a while: its stack, once, the job untouched
        stacks.watch_for_stalls(heartbeats, agent.stacks_dir, agent.local_pids, spec.stall_warning_s,
                                spec.timeout_s, lambda: agent.resumed_at, watch)
    # The agent writes os.environ (e.g. TORCHINDUCTOR_CACHE_DIR); callers keep theirs.
    environ = dict(os.environ)
    restore = _install_signal_handlers(agent, None if multi else heartbeats)
    # Another job took the run directory (removed under this one): its ranks go at once, then this launcher.
    rundir.on_lost(functools.partial(_stop_at_once, agent))
    try:
        os.environ.update(threads)  # the agent passes OMP_NUM_THREADS on from here ("spawn" ranks inherit it)
        with _quiet_elastic_logs():
            try:
                result = agent.run()
            except UnboundLocalError as e:
                raise stop_behind(e) from None
            except RendezvousError as e:  # the machine hosting the store is gone (or unreachable)
                why = agent.roster.lost() if agent.roster else ""
                raise LaunchError(f"the rendezvous at {rdzv.endpoint} failed: {why or e}") from None
            except ValueError as e:  # torch reads a failed rank's error file as JSON: empty on a full disk
                lost = failures.unreadable_reports(agent, log_dir)
                if not lost:
                    raise
                raise RankFailure(lost) from e
            finally:
                restore()
                _kill_groups(agent.rank_pids)  # a rank's DataLoader workers, left when the agent stopped it
                with contextlib.suppress(Exception):  # the run's outcome matters more than closing the store
                    worker_spec.rdzv_handler.shutdown()
        if result.is_failed():
            failed = failures.of_attempt(agent, result.failures)
            why = agent.roster.lost() if agent.roster else ""
            stalled = why or failures.left_early(failed, heartbeats) or \
                failures.stall_report(failed, heartbeats, agent.states_at_failure)
            stalled += stacks.where_stalled(agent.stacks_dir, agent.stack_sizes, stalled)
            if stalled and agent.suspended_s > spec.timeout_s / 2:
                # Gloo and NCCL count a collective's wait in monotonic time, which runs on while a process is
                # stopped: a wait begun before Ctrl-Z can expire right after `fg`.
                stalled = (f"the job was suspended (Ctrl-Z) for {agent.suspended_s:.0f} s; a collective that "
                           f"waited across it timed out (distributed.timeout_s: {spec.timeout_s:g} s)\n"
                           "HINT: resume within distributed.timeout_s, or raise it for jobs you suspend\n"
                           f"{stalled}")
            raise RankFailure(failed, stalled=stalled)
    finally:
        os.environ.clear()
        os.environ.update(environ)
        rundir.on_lost(None)
        if agent.roster is not None:
            agent.roster.stop()
        if disarm is not None:
            disarm.set()
        watch.set()
        agent.remove_error_files()
        shutil.rmtree(heartbeats, ignore_errors=True)
        internals.release_rendezvous_stores(agent)  # last: the roster above talks to this machine's store
    return dict(sorted(result.return_values.items()))


@contextlib.contextmanager
def _quiet_elastic_logs() -> Iterator[None]:
    """While the agent runs: its ERROR lines for each failure, its "Received 2 death signal" warning and
    torch.multiprocessing's "Terminating process ... via signal SIGTERM" are not shown (the launcher reports
    the first failure and a stop in its own words). torch's loggers may carry levels of their own, so each is
    set; all are restored afterwards: importing this module changes nothing for the rest of the process."""
    names = ["torch.distributed.elastic", "torch.multiprocessing.spawn"]
    names += [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic.")]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _wait_bound(agent: _Agent, spec: RankSpec) -> float:
    """How long the agent may take once this machine's ranks are gone: a moment while it watches them (it is
    then stuck in a store call to a machine that no longer answers), the start-up bound while it meets the
    others again (a restart) or waits for them to finish."""
    state = agent.get_worker_group().state
    if state in (WorkerState.HEALTHY, WorkerState.UNHEALTHY, WorkerState.FAILED):
        return machines.STUCK_S
    return spec.startup_timeout_s + 10


def _shutdown_timeout(grace_s: float) -> dict[str, int]:
    """The agent's grace after the stop signal (``shutdown_timeout``, newer torch only: 2.11, on the first
    GPU machine we were lent, rejected the keyword; there a stop waits torch's 30 s)."""
    if "shutdown_timeout" in inspect.signature(LocalElasticAgent.__init__).parameters:
        return {"shutdown_timeout": max(1, round(grace_s))}
    return {}


class _NoPrefix(str):
    """An empty line prefix that torch's agent does not take for a missing one."""

    def __bool__(self) -> bool:
        return True


class _Agent(LocalElasticAgent):
    """torch's local agent, remembering every rank it starts (each leads its own process group), noting the
    ranks' process states when one fails, and stopping the others within :data:`SHUTDOWN_TIMEOUT_S`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rank_pids: list[int] = []
        self.current_pids: list[int] = []
        self.states_at_failure: dict[int, str] = {}
        self.global_ranks: list[int] = []  # of this attempt's ranks, in local rank order
        self.roster: machines.Roster | None = None
        self.suspended_s = 0.0  # the longest Ctrl-Z so far
        self.resumed_at = 0.0  # time.time() of the last `fg` after a Ctrl-Z
        self.stacks_dir: Path | None = None  # where the ranks dump their stacks (launcher.rank.stacks)
        self.stack_sizes: dict[int | tuple[int, str], int] = {}  # each dump file before the failure's request

    def local_pids(self) -> dict[int, int]:
        """``{global rank: pid}`` of this attempt's ranks on this machine."""
        return dict(zip(self.global_ranks, self.current_pids))

    def ranks_gone(self) -> bool:
        """This attempt's ranks have all ended (for the watchdog of a multi-machine run)."""
        pids = self.current_pids
        return bool(pids) and all(failures.process_state(pid) in ("Z", "X", "?") for pid in pids)

    def _note_states(self, pids: list[int]) -> None:
        """A rank has ended: note every rank's process state; one the kernel shows stopped cannot act on
        SIGTERM, so it is killed at once instead of after the grace."""
        if not self.states_at_failure:
            ranks = self.global_ranks or list(range(len(pids)))  # by global rank, as failures and heartbeats
            self.states_at_failure = {rank: failures.process_state(pid) for rank, pid in zip(ranks, pids)}
            states = self.states_at_failure
            _kill_groups([pid for rank, pid in zip(ranks, pids) if states[rank] in ("T", "t")])
            _, processes = internals.agent_processes(self)
            if self.stacks_dir is not None and any(p.exitcode not in (None, 0) for p in processes):
                # a rank failed: where every other one is, before torch stops them (a C handler writes it
                # at once, GIL or not)
                alive = {r: pid for r, pid in zip(ranks, pids) if states[r] not in ("Z", "X", "?", "T", "t")}
                self.stack_sizes = stacks.ask(self.stacks_dir, alive)  # and their DataLoader workers

    def remove_error_files(self) -> None:
        """torch.multiprocessing's per-rank traceback files of the last attempt, once they have been read."""
        for path in internals.spawn_error_files(self):
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _monitor_workers(self, worker_group: Any) -> Any:
        self.last_result = super()._monitor_workers(worker_group)
        return self.last_result

    def _restart_workers(self, worker_group: Any) -> None:
        """Say why before each restart: the job goes on, and the cause would otherwise be in a log only."""
        result = getattr(self, "last_result", None)
        if result is not None and result.is_failed():
            f = RankFailure(failures.of_attempt(self, result.failures)).first
            said = (f.traceback or f.message or "").strip().splitlines()
            lines = [line for line in said if not line.startswith("[launcher]")]  # our own notes
            cause = f": {lines[-1]}" if lines else ""
            done = internals.agent_restarts_done(self)
            print(f"[launcher] rank {f.rank} failed ({f.how}){cause}\n[launcher] restarting all ranks "
                  f"(restart {done} of {worker_group.spec.max_restarts})", file=sys.stderr, flush=True)
        super()._restart_workers(worker_group)

    def _start_workers(self, worker_group: Any) -> dict[int, Any]:
        _kill_groups(self.rank_pids)  # a restart: what is left of the ranks stopped before it
        self.remove_error_files()
        self.states_at_failure = {}
        self.global_ranks = [w.global_rank for w in sorted(worker_group.workers, key=lambda w: w.local_rank)]
        pids = super()._start_workers(worker_group)
        # torch waits 30 s after SIGTERM before it SIGKILLs the other ranks of a failed attempt; ours is the
        # documented grace: half of it for them to end on their own, half after SIGTERM.
        internals.set_failure_grace(self, SHUTDOWN_TIMEOUT_S / 2, on_exit=self._note_states)
        self.rank_pids.extend(pids.values())
        self.current_pids = list(pids.values())
        if self.roster is not None:
            self.roster.publish(worker_group.group_rank, worker_group.group_world_size,
                                [w.global_rank for w in worker_group.workers])
        return pids


def stop_behind(error: UnboundLocalError) -> BaseException:
    """The stop an ``UnboundLocalError`` replaced, else the error itself.

    Our SIGINT/SIGTERM handler raises SignalException wherever the main thread is; landing in torch elastic's
    metrics wrapper (``metrics/api.py``, ``prof``) before its ``start = time.time()``, the wrapper's
    ``finally`` replaced the stop with an UnboundLocalError: exit 1 and a traceback instead of 130 (seen once
    in a loaded make test)."""
    return error.__context__ if isinstance(error.__context__, SignalException) else error


def _stop_at_once(agent: _Agent) -> None:
    """The ranks' groups SIGKILLed, then SIGTERM to this launcher (its handler turns it into a stop)."""
    _kill_groups(agent.current_pids)
    os.kill(os.getpid(), signal.SIGTERM)


def _kill_groups(pids: list[int]) -> None:
    """SIGKILL the process group each of ``pids`` leads (a rank and its DataLoader workers)."""
    _signal_groups(pids, signal.SIGKILL)


def _signal_groups(pids: list[int], sig: signal.Signals) -> None:
    """Send ``sig`` to the process group each of ``pids`` leads."""
    for pid in pids:
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _before_exit(agent: _Agent) -> None:
    """What a normal exit would have done, before an ``os._exit``: no rank, fork server or temp folder of
    multiprocessing's stays behind."""
    _kill_groups(agent.rank_pids)
    rankserver.stop()
    tempdir = internals.multiprocessing_tempdir()
    if tempdir:
        shutil.rmtree(tempdir, ignore_errors=True)


def _install_signal_handlers(agent: _Agent, heartbeats: Path | None) -> Callable[[], None]:
    """SIGINT/SIGTERM: graceful stop through the agent; a second signal kills every rank at once. SIGTSTP."""
    # The agent registers its own handler for the signals in this variable each time it starts ranks;
    # we keep SIGINT/SIGTERM for ourselves so that the second signal can escalate.
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if len(received) == 1:
            raise SignalException(
                f"launcher got {signal.Signals(signum).name}", sigval=signal.Signals(signum)
            )
        _before_exit(agent)
        os._exit(128 + received[0])

    def suspend(signum: int, frame: FrameType | None) -> None:
        """Ctrl-Z: the ranks (in sessions of their own, out of the terminal's reach) stop with the launcher
        and go on with it, as torchrun's do (they trained on unsupervised before); first they wait at a step
        boundary, so that no collective waits across the stop (launching/pause.py)."""
        groups = list(dict.fromkeys(agent.current_pids))
        pause.request(heartbeats, groups)
        _signal_groups(groups, signal.SIGSTOP)
        stopped = time.monotonic()
        os.kill(os.getpid(), signal.SIGSTOP)  # returns once the shell's `fg` or `bg` sent SIGCONT
        pause.release(heartbeats)
        _signal_groups(groups, signal.SIGCONT)
        agent.suspended_s = max(agent.suspended_s, time.monotonic() - stopped)
        agent.resumed_at = time.time()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGTSTP] = signal.signal(signal.SIGTSTP, suspend)

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore


