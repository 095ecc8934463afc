"""``make_loader``: torchdata's StatefulDataLoader set up for a rank (worker start-up, signals, timeouts)."""

from __future__ import annotations

import functools
import os
import signal
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .. import dist, internals
from ..errors import DataLoaderWaitExpired
from ..rank import stacks, stop
from . import workerserver
from .dataset import ShardedIterableDataset, positions


def make_loader(
    dataset: ShardedIterableDataset, num_workers: int | None = None, pin_memory: bool | None = None, *,
    job: Any = None, **kw: Any
) -> Any:
    """A torchdata ``StatefulDataLoader`` over ``dataset`` (batches come from the dataset; state per worker).

    ``job``: the job's ``data:`` section gives ``num_workers`` and ``pin_memory`` (a value given here wins);
    without a job they default to 0 and False.

    Inside a SLURM job the workers ignore SIGTERM and USR2: SLURM signals every process of the step on a
    preemption or requeue, and torch's workers would die of it and crash the rank before it reaches the step
    boundary where it saves (:mod:`launcher.rank.stop`). The rank stops its workers itself when it exits.

    A worker that dies (the OOM killer, a crash, its fork server killed) fails the rank within
    :data:`POLL_S` seconds plus torch's check, naming the rank, the worker's pid and how it died; a worker
    that is alive but sends nothing for ``timeout`` seconds (default: the job's
    ``distributed.startup_timeout_s``, 600 s outside the launcher) fails it too: a long first batch is
    allowed, a stuck worker is not.

    In a rank, workers start from a fork server of the rank's own when the dataset can be sent to one
    (:func:`launcher.data.workerserver.for_workers`: forking a rank that runs Gloo collectives can deadlock
    the new worker); otherwise, or with ``multiprocessing_context`` given, as the DataLoader starts them.
    """
    from torchdata.stateful_dataloader import StatefulDataLoader

    if num_workers is None:
        num_workers = job.data.num_workers if job is not None else 0
    if pin_memory is None:
        pin_memory = job.data.pin_memory if job is not None else False

    wait_s = float(kw.pop("timeout", 0) or dist.data_timeout_s())
    if num_workers > 0 and stop.installed():
        kw["worker_init_fn"] = functools.partial(_ignore_stop_signals, kw.get("worker_init_fn"))
    if num_workers > 0 and (where := stacks.for_workers()) is not None:  # `launcher stacks` sees workers too
        kw["worker_init_fn"] = functools.partial(stacks.in_worker, where, kw.get("worker_init_fn"))
    if num_workers > 0 and "multiprocessing_context" not in kw:
        kw["multiprocessing_context"] = workerserver.for_workers(dataset, kw.get("worker_init_fn"))
    with warnings.catch_warnings():
        # torchdata 0.11 calls torch.set_vital, deprecated in newer torch: noise, not a user problem.
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        loader = _watched_class(StatefulDataLoader)(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory and torch.cuda.is_available(),
            persistent_workers=False,
            # torch checks whether its workers are alive only when a wait for data times out: poll often;
            # the iterator (internals.stateful_workers_iterator) stretches each wait to the real bound.
            timeout=min(POLL_S, wait_s) if num_workers > 0 else 0,
            **kw,
        )
    loader.wait_s = wait_s
    return loader


#: How often a rank waiting for a batch checks that its DataLoader workers are alive (seconds). A dead worker
#: failed its job 3.2-3.5 s after its death with 2 s here, too close to the 5 s users are promised; a poll
#: costs one liveness check of each worker while the rank waits anyway.
POLL_S = 0.5
#: Key of the sharded dataset's plan record in the loader's state (beside torchdata's own keys).
PLAN = "launcher.data.plan"


@functools.cache
def _watched_class(base: type) -> type:
    """``base`` (torchdata's StatefulDataLoader) whose waits for workers have one bound, ``wait_s``, and whose
    iterators explain their errors (:class:`_Explained`)."""

    class WatchedLoader(base):  # type: ignore[misc, valid-type]
        wait_s: float = 600.0

        def state_dict(self) -> dict[str, Any]:
            state = dict(super().state_dict())
            if isinstance(self.dataset, ShardedIterableDataset):
                state[PLAN] = self.dataset.plan_record(self.num_workers)
            return state

        def load_state_dict(self, state: dict[str, Any]) -> None:
            state = dict(state)
            record = state.pop(PLAN, None)
            if record is not None and isinstance(self.dataset, ShardedIterableDataset):
                self.dataset.restore_phase(record)
            super().load_state_dict(state)

        def load_state_dict_from_ranks(self, states: list[dict[str, Any] | None]) -> str:
            """Continue the epoch of every rank's state of a run with another topology (world size, workers,
            batch size): what is left of it is split anew over this run's ranks and workers. Returns how, in
            words ("" when the states hold no position, e.g. a checkpoint written at the end of a run)."""
            known = [s for s in states if s]
            record = next((s[PLAN] for s in known if PLAN in s), None)
            if record is None or not isinstance(self.dataset, ShardedIterableDataset):
                return ""
            return self.dataset.continue_from(record, [p for s in known for p in positions(s)])


        def _get_iterator(self) -> Any:
            if self.num_workers == 0:
                return super()._get_iterator()
            return internals.stateful_workers_iterator(self, self.wait_s)

        def __iter__(self) -> Any:
            if self.num_workers == 0:
                return _Explained(super().__iter__(), explain=False)
            try:
                return _Explained(super().__iter__())  # starting the workers waits for them too
            except RuntimeError as e:
                it = internals.dataloader_iterator(self)
                it = _iterator_in(e) if it is None else it  # (not `or`: truth calls the loader's len())
                raise _given_up(it, e) from e

    return WatchedLoader


class _Explained:
    """A DataLoader iterator whose errors say which worker died and how, or how long the rank waited; the
    time each batch took to come is noted for the launcher's figures (``launcher.dist.note_data_wait``)."""

    def __init__(self, it: Any, explain: bool = True) -> None:
        self.it = it
        self.explain = explain

    def __iter__(self) -> _Explained:
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self.it, name)

    def __next__(self) -> Any:
        started = time.perf_counter()
        try:
            batch = next(self.it)
        except RuntimeError as e:
            if not self.explain:
                raise
            raise _given_up(self.it, e) from e
        dist.note_data_wait(time.perf_counter() - started, _batch_size(batch))
        return batch


def _batch_size(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor."""
    while isinstance(batch, (list, tuple, dict)) and batch:
        batch = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) and batch.dim() else 0


def _iterator_in(error: BaseException) -> Any:
    """The iterator whose start-up raised ``error`` (the loader keeps it only once it started): the ``self``
    of a frame in the traceback that has workers. Without it a worker killed during the start-up of an epoch
    was reported without its pid and signal (seen in CI once)."""
    tb = error.__traceback__
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("self")
        if candidate is not None and internals.dataloader_workers(candidate):
            return candidate
        tb = tb.tb_next
    return None


def _given_up(iterator: Any, error: RuntimeError) -> RuntimeError:
    """The error to raise for ``error`` from a DataLoader's iterator, explained. Where it gives up on the
    workers (one died, or all are stuck), the others are ended now: torch leaves them running until the
    iterator is collected, and its shutdown then waits 5 s for each stuck one, in whatever code runs then (a
    user who catches the error and goes on, a test). An error from the user's code in a worker leaves them:
    the iterator goes on after it."""
    explained = RuntimeError(_explain(iterator, error))
    if isinstance(error, DataLoaderWaitExpired) or "exited unexpectedly" in str(error):
        stop_workers = getattr(iterator, "stop_workers", None)  # internals.stateful_workers_iterator's
        if stop_workers is not None:
            stop_workers()
    return explained


def _explain(iterator: Any, error: RuntimeError) -> str:
    """The rank's own words for a DataLoader error: which worker died and how, or how long it waited."""
    rank, text = dist.get_rank(), str(error)
    if isinstance(error, DataLoaderWaitExpired):
        return (f"rank {rank}: no batch from its DataLoader workers for {error.waited:.0f} s (workers "
                "alive but stuck)\nHINT: a slow first batch needs distributed.startup_timeout_s; "
                "otherwise look for a worker blocked on storage or a lock (py-spy dump --pid WORKER)")
    if "exited unexpectedly" not in text:
        return f"rank {rank}: {text}"
    dead = []
    server = _dead_worker_server()
    if server:
        dead.append(server)
    for worker_id, w in enumerate(internals.dataloader_workers(iterator)):
        code = w.exitcode
        if code is None or code == 0:
            continue
        how = f"killed by {_signal_name(-code)}" if code < 0 else f"exit code {code}"
        if server and code == 255:  # the server can no longer report how its workers ended
            how = "ended with it"
        dead.append(f"worker {worker_id} (pid {w.pid}) {how}")
    hint = ("HINT: SIGKILL is what the kernel's OOM killer sends: check `dmesg`, lower data.num_workers "
            "or the memory each worker holds")
    return f"rank {rank}: DataLoader {'; '.join(dead) or text}\n{hint}"




def _dead_worker_server() -> str:
    """How this rank's DataLoader fork server died, if it did (it is the rank's child: reap it to know)."""
    pid = internals.forkserver_pid()
    if pid is None:
        return ""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return ""
    if not done:
        return ""
    how = f"killed by {_signal_name(os.WTERMSIG(status))}" if os.WIFSIGNALED(status) else \
        f"exit code {os.WEXITSTATUS(status)}"
    return f"workers' fork server (pid {pid}) {how}, and its workers with it"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _ignore_stop_signals(user_init: Callable[[int], None] | None, worker_id: int) -> None:
    for sig in stop.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if user_init is not None:
        user_init(worker_id)
