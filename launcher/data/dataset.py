"""The sharded IterableDataset: each sample once per epoch, equal batches on every rank, mid-epoch resume.

It follows the plan of :class:`launcher.data.plan.EpochPlan` (see that module for the guarantees) and reads
by streaming: a worker holds at most one shuffle window of raw samples and one batch, never a whole shard.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from .. import dist
from .plan import EpochPlan
from .smalltensors import by_value

#: Marks a worker's position inside a DataLoader's state (found there by :func:`positions`).
POSITION = "launcher.data.position"


@dataclass(frozen=True)
class Phase:
    """The rest of an epoch resumed on another topology (:meth:`ShardedIterableDataset.continue_from`)."""

    epoch: int
    number: int
    remaining: list[tuple[int, int]]
    """Stream ranges still to yield (see :mod:`launcher.data.plan`)."""


class ShardedIterableDataset(IterableDataset):
    """An IterableDataset over shards, split per rank and per DataLoader worker, yielding whole batches.

    Args:
        shards: shard descriptions (paths, fsspec URLs, any picklable objects).
        read: ``read(shard)`` or ``read(shard, start)`` yields the shard's raw samples in a fixed order
            (cheap: no decoding), from sample ``start`` on when it takes two arguments
            (:func:`launcher.data.tar.read_tar` seeks there; a one-argument ``read`` is read from the start
            and the first samples skipped).
        sizes: samples per shard; counted once with ``read`` when omitted (pass them for large data).
        batch_size: samples per batch; use ``DataLoader(ds, batch_size=None)``.
        transform: applied to each kept sample (decoding, augmentation); skipped samples are never decoded.
        collate: turns a list of samples into a batch (``default_collate``).
        rank, world_size: default to the process group's.
        seed, shuffle, shuffle_buffer, uneven: see :class:`launcher.data.plan.EpochPlan`.

    Raises:
        launcher.data.plan.EmptyEpoch: when an epoch would yield no batch on any rank.
    """

    def __init__(
        self,
        shards: Sequence[Any],
        read: Callable[..., Iterable[Any]],
        *,
        batch_size: int,
        sizes: Sequence[int] | None = None,
        transform: Callable[[Any], Any] | None = None,
        collate: Callable[[list[Any]], Any] = default_collate,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 0,
        uneven: Literal["drop", "pad", "none"] = "drop",
    ) -> None:
        self.shards = list(shards)
        self.read = read
        self._takes_start = _takes_start(read)
        self.sizes = list(sizes) if sizes is not None else [sum(1 for _ in self._open(s, 0))
                                                            for s in self.shards]
        if len(self.sizes) != len(self.shards):
            raise ValueError(f"{len(self.shards)} shards but {len(self.sizes)} sizes")
        self.batch_size = batch_size
        self.transform = transform
        self.collate = collate
        self.rank = dist.get_rank() if rank is None else rank
        self.world_size = dist.get_world_size() if world_size is None else world_size
        self.seed, self.shuffle, self.shuffle_buffer, self.uneven = seed, shuffle, shuffle_buffer, uneven
        self.epoch = 0
        self._phase: Phase | None = None
        self._slot: tuple[int, int] | None = None  # (rank, worker) once iterating
        self._yielded = 0  # batches this worker yielded in the current epoch
        self._pending: dict[str, int] | None = None  # position restored by load_state_dict, used by __iter__
        self.plan(1)  # an epoch with no batch at all is an error now, not a silent no-op later

    @classmethod
    def for_job(cls, job: Any, shards: Sequence[Any], read: Callable[..., Iterable[Any]], *, batch_size: int,
                **kw: Any) -> ShardedIterableDataset:
        """The dataset with the job's ``data:`` section and seed applied (``uneven``, ``shuffle_buffer``,
        ``seed``); a keyword given here wins (an evaluation set: ``uneven="none"``, ``shuffle_buffer=0``)."""
        for key, value in (("seed", job.seed), ("uneven", job.data.uneven),
                           ("shuffle_buffer", job.data.shuffle_buffer)):
            kw.setdefault(key, value)
        return cls(shards, read, batch_size=batch_size, **kw)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (shuffling order); call before iterating each epoch, on every rank."""
        self.epoch = epoch

    def plan(self, num_workers: int, epoch: int | None = None) -> EpochPlan:
        """The plan of every rank and worker for ``epoch`` (defaults to the current one)."""
        epoch = self.epoch if epoch is None else epoch
        phase = self._phase if self._phase is not None and self._phase.epoch == epoch else None
        return EpochPlan(
            self.sizes, self.world_size, num_workers, self.batch_size, seed=self.seed, epoch=epoch,
            shuffle=self.shuffle, shuffle_buffer=self.shuffle_buffer, uneven=self.uneven,
            remaining=phase.remaining if phase else None, phase=phase.number if phase else 0,
        )

    def batches_per_rank(self, num_workers: int) -> int:
        """Batches every rank yields this epoch (the same on all ranks)."""
        return self.plan(num_workers).batches_per_rank(self.rank)

    # ------------------------------------------------------------------------------------ positions

    def state_dict(self) -> dict[str, Any]:
        """Position of this worker: epoch, phase, batches yielded (torchdata collects one per worker)."""
        phase = self._phase.number if self._phase is not None and self._phase.epoch == self.epoch else 0
        return {POSITION: 1, "epoch": self.epoch, "phase": phase, "yielded": self._yielded,
                "slot": list(self._slot) if self._slot else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the batches recorded in ``state`` when the next iteration is of the same epoch.

        A position from another epoch (e.g. saved at the end of an epoch, resumed into the next) is ignored.
        """
        self._pending = {"epoch": int(state["epoch"]), "phase": int(state.get("phase", 0)),
                         "yielded": int(state["yielded"])}

    def plan_record(self, num_workers: int) -> dict[str, Any]:
        """What another topology needs besides the workers' positions to continue this epoch exactly."""
        phase = self._phase if self._phase is not None and self._phase.epoch == self.epoch else None
        return {"epoch": self.epoch, "phase": phase.number if phase else 0,
                "remaining": None if phase is None else
                torch.tensor(phase.remaining, dtype=torch.int64).reshape(-1, 2),
                "world_size": self.world_size, "num_workers": num_workers, "batch_size": self.batch_size,
                "shuffle_buffer": self.shuffle_buffer, "uneven": self.uneven, "seed": self.seed,
                "shuffle": self.shuffle, "shards": len(self.sizes), "samples": sum(self.sizes)}

    def restore_phase(self, record: dict[str, Any]) -> None:
        """Take back the phase of :meth:`plan_record` (a resume on the same topology)."""
        if record.get("remaining") is not None:
            self._phase = Phase(int(record["epoch"]), int(record["phase"]), _ranges(record["remaining"]))

    def continue_from(self, record: dict[str, Any], positions: Iterable[dict[str, Any]]) -> str:
        """Continue the epoch of ``record`` (:meth:`plan_record` of a run with another world size, worker
        count or batch size) with exactly the samples none of its workers' ``positions`` had yielded.

        Returns what happened, in words. Changed shards, seed or shuffling cannot be carried over: the epoch
        then starts over, and the words say why.
        """
        changed = [f"{k} {record[k]} -> {now}" for k, now in (
            ("shards", len(self.sizes)), ("samples", sum(self.sizes)), ("seed", self.seed),
            ("shuffle", self.shuffle)) if record.get(k) != now]
        epoch, number = int(record["epoch"]), int(record["phase"])
        if changed:
            return f"data position not carried over ({', '.join(changed)}): epoch {epoch} starts over"
        old = EpochPlan(
            self.sizes, int(record["world_size"]), int(record["num_workers"]), int(record["batch_size"]),
            seed=self.seed, epoch=epoch, shuffle=self.shuffle, shuffle_buffer=int(record["shuffle_buffer"]),
            uneven=record["uneven"], phase=number,
            remaining=_ranges(record["remaining"]) if record.get("remaining") is not None else None,
        )
        yielded = {(int(p["slot"][0]), int(p["slot"][1])): int(p["yielded"]) for p in positions
                   if p.get("slot") and int(p["epoch"]) == epoch and int(p.get("phase", 0)) == number}
        self._phase = Phase(epoch, number + 1, old.unseen(yielded))
        left = sum(b - a for a, b in self._phase.remaining)
        return (f"data position carried over from {old.world_size} ranks x {old.workers} workers: "
                f"epoch {epoch} "
                f"goes on with the {left} of its {old.total} samples not yet yielded")

    # -------------------------------------------------------------------------------------- reading

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = self.plan(workers)
        pending, self._pending = self._pending, None
        same = pending and pending["epoch"] == self.epoch and pending["phase"] == plan.phase
        skip = pending["yielded"] if pending and same else 0
        self._slot, self._yielded = (self.rank, worker), skip
        return self._batches(plan, worker, skip, in_worker=info is not None)

    def _batches(self, plan: EpochPlan, worker: int, skip: int, in_worker: bool) -> Iterator[Any]:
        batch: list[Any] = []
        for raw in self._emitted(plan, worker, skip * self.batch_size):
            batch.append(self.transform(raw) if self.transform else raw)
            if len(batch) == self.batch_size:
                yield self._finish(batch, in_worker)
                batch = []
        if batch:  # uneven="none": a partial last batch
            yield self._finish(batch, in_worker)

    def _finish(self, batch: list[Any], in_worker: bool) -> Any:
        self._yielded += 1  # before the yield: a snapshot taken after this batch must include it
        out = self.collate(batch)
        return by_value(out) if in_worker else out

    def _emitted(self, plan: EpochPlan, worker: int, done: int) -> Iterator[Any]:
        """The slot's raw samples in emission order from the ``done``-th on: one window read at a time, each
        lane by its own sequential reader."""
        sp = plan.slot(self.rank, worker)
        j, into = plan.window_at(sp, min(done, sp.count))
        spans, chunk = plan.lanes(sp)
        if plan.window == 1:
            yield from self._read(plan, sp.start + done, sp.start + sp.count)
            return
        readers = [self._read(plan, a + j * chunk, a + n) for a, n in spans if n > j * chunk]  # generators
        try:
            while pieces := plan.window_pieces(sp, j):
                window = [raw for (lo, hi), r in zip(pieces, readers) for raw in itertools.islice(r, hi - lo)]
                for p in plan.permutation(self.rank, worker, j, len(window))[into:]:
                    yield window[p]
                j, into = j + 1, 0
        finally:
            for r in readers:
                r.close()

    def _read(self, plan: EpochPlan, first: int, stop: int) -> Generator[Any, None, None]:
        """Raw samples of phase offsets ``[first, stop)``, streaming each shard's run once."""
        for shard, a, b in plan.runs(first, stop):
            it = iter(self._open(self.shards[shard], a))
            try:
                n = 0
                for n, raw in enumerate(itertools.islice(it, b - a), 1):
                    yield raw
                if n < b - a:
                    raise ValueError(
                        f"shard {self.shards[shard]!r} has {a + n} samples but sizes says "
                        f"{self.sizes[shard]} (a truncated file, or sizes of other shards)\nHINT: pass the "
                        "shards' real sizes (the tar index lists them: launcher.data.tar.open_shards), or "
                        "write the shard again")
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()  # a generator reader closes its file now, not when collected

    def _open(self, shard: Any, start: int) -> Iterable[Any]:
        if self._takes_start:
            return self.read(shard, start)
        return itertools.islice(self.read(shard), start, None)


def positions(state: Any) -> Iterator[dict[str, Any]]:
    """Every worker position (:meth:`ShardedIterableDataset.state_dict`) inside a DataLoader's state."""
    if isinstance(state, dict):
        if state.get(POSITION) == 1:
            yield state
            return
        for value in state.values():
            yield from positions(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from positions(value)


def _ranges(value: Any) -> list[tuple[int, int]]:
    rows = value.tolist() if isinstance(value, torch.Tensor) else value
    return [(int(a), int(b)) for a, b in rows]


def _takes_start(read: Callable[..., Any]) -> bool:
    """Whether ``read`` accepts a second positional argument (the first sample to yield)."""
    try:
        params = list(inspect.signature(read).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 2
