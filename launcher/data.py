"""Sharded IterableDatasets: each sample once per epoch, equal batches on every rank, mid-epoch resume.

Everything follows from one pure function, :func:`plan_epoch`: given the shard sizes, the number of ranks and
DataLoader workers, the batch size, the seed and the epoch, it says which samples each (rank, worker) slot
yields, in which order and in how many batches. Every worker computes the same plan and reads only its part:

* ``split="auto"``: whole shards per slot when there are at least as many shards as slots (shards balanced
  greedily by size, ranks first), else an interleaved split of the samples (slot ``s`` takes every
  ``S``-th sample of the epoch's stream, reading all shards but decoding only its own samples);
* batches are formed inside the dataset (use ``DataLoader(ds, batch_size=None)``), so the plan controls the
  exact batch count: ``uneven="drop"`` gives every rank the smallest rank's count of full batches (the tail
  is dropped: each sample at most once), ``uneven="pad"`` gives every rank the largest count, filling
  partial and missing batches with samples repeated cyclically from the epoch's stream (each sample at least
  once; :meth:`ShardedIterableDataset.plan` lists the padding). Equal counts mean DDP never hangs.
  ``uneven="none"`` (evaluation without collectives) yields every sample once with a partial last batch
  per worker and counts that may differ between ranks;
* shard order (and the optional bounded shuffle buffer) are drawn from ``(seed, epoch)``;
* the state of a worker is ``(epoch, batches yielded)``; torchdata's ``StatefulDataLoader`` collects it per
  worker, and a resumed worker skips exactly what it had yielded (whole shards are not even opened).
"""

from __future__ import annotations

import functools
import random
import signal
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from . import dist, forkserver, stop
from .smalltensors import by_value

Ref = tuple[int, int]  # (shard index, sample index within the shard)


@dataclass
class SlotPlan:
    """What one (rank, worker) slot yields in one epoch."""

    order: list[Ref]
    """Sample references in yield order, ``batches x batch_size`` long (padding included)."""
    num_padded: int
    """How many references at the end of full use are padding (repeats)."""
    batches: int
    """Number of batches this slot yields."""


def _rng(seed: int, epoch: int, salt: int = 0) -> random.Random:
    return random.Random(f"launcher-data:{seed}:{epoch}:{salt}")  # str seeds are hashed stably (sha512)


def _shuffle_buffer(stream: list[Ref], size: int, rng: random.Random) -> list[Ref]:
    """The order a bounded shuffle buffer of ``size`` items emits ``stream`` in (0 or 1: unchanged)."""
    if size <= 1:
        return list(stream)
    out, buf = [], []
    for ref in stream:
        buf.append(ref)
        if len(buf) >= size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            out.append(buf.pop())
    rng.shuffle(buf)
    return out + buf


def epoch_stream(sizes: Sequence[int], seed: int, epoch: int, shuffle: bool) -> list[Ref]:
    """All samples of the epoch in shard order (shards permuted by ``(seed, epoch)`` when shuffling)."""
    return [(s, i) for s in _shard_order(sizes, seed, epoch, shuffle) for i in range(sizes[s])]


def _shard_order(sizes: Sequence[int], seed: int, epoch: int, shuffle: bool) -> list[int]:
    order = list(range(len(sizes)))
    if shuffle:
        _rng(seed, epoch).shuffle(order)
    return order


def slot_streams(
    sizes: Sequence[int],
    world_size: int,
    num_workers: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    shuffle_buffer: int = 0,
    split: Literal["auto", "shards", "samples"] = "auto",
) -> list[list[list[Ref]]]:
    """``streams[rank][worker]``: every sample of the epoch exactly once, before batching and balancing."""
    workers = max(1, num_workers)
    slots = world_size * workers
    shard_order = _shard_order(sizes, seed, epoch, shuffle)
    stream = [(s, i) for s in shard_order for i in range(sizes[s])]
    streams: list[list[list[Ref]]] = [[[] for _ in range(workers)] for _ in range(world_size)]
    if split == "shards" or (split == "auto" and len(sizes) >= slots):
        # Greedy balance, largest shards first (ties in the epoch's shard order): ranks, then their workers.
        by_size = sorted(shard_order, key=lambda s: -sizes[s])
        per_rank: list[list[int]] = [[] for _ in range(world_size)]
        loads = [0] * world_size
        for s in by_size:
            r = min(range(world_size), key=lambda k: (loads[k], k))
            per_rank[r].append(s)
            loads[r] += sizes[s]
        for r, shards in enumerate(per_rank):
            wl = [0] * workers
            mine: list[list[int]] = [[] for _ in range(workers)]
            for s in shards:
                w = min(range(workers), key=lambda k: (wl[k], k))
                wl[w] += sizes[s]
                mine[w].append(s)
            for w in range(workers):
                streams[r][w] = [
                    (s, i) for s in sorted(mine[w], key=shard_order.index) for i in range(sizes[s])
                ]
    else:
        for k, ref in enumerate(stream):
            slot = k % slots
            streams[slot // workers][slot % workers].append(ref)
    for r in range(world_size):
        for w in range(workers):
            streams[r][w] = _shuffle_buffer(streams[r][w], shuffle_buffer if shuffle else 0,
                                            _rng(seed, epoch, 1 + r * workers + w))
    return streams


def plan_epoch(
    sizes: Sequence[int],
    world_size: int,
    num_workers: int,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    shuffle_buffer: int = 0,
    uneven: Literal["drop", "pad", "none"] = "drop",
    split: Literal["auto", "shards", "samples"] = "auto",
) -> list[list[SlotPlan]]:
    """``plan[rank][worker]`` for one epoch (a pure function: same inputs, same plan, on every process)."""
    if batch_size < 1 or world_size < 1:
        raise ValueError("batch_size and world_size must be at least 1")
    workers = max(1, num_workers)
    streams = slot_streams(sizes, world_size, num_workers, seed=seed, epoch=epoch, shuffle=shuffle,
                           shuffle_buffer=shuffle_buffer, split=split)
    stream = epoch_stream(sizes, seed, epoch, shuffle)
    counts = [[len(streams[r][w]) for w in range(workers)] for r in range(world_size)]
    if uneven == "none":  # evaluation: every sample once, last batches partial, counts may differ per rank
        return [[SlotPlan(order=streams[r][w], num_padded=0, batches=-(-counts[r][w] // batch_size))
                 for w in range(workers)] for r in range(world_size)]
    if uneven == "drop":
        per_worker = [[c // batch_size for c in row] for row in counts]
        target = min(sum(row) for row in per_worker)
        for row in per_worker:
            while sum(row) > target:  # trim the worker with the most batches (lowest index on ties)
                row[row.index(max(row))] -= 1
    else:
        per_worker = [[-(-c // batch_size) for c in row] for row in counts]
        target = max(sum(row) for row in per_worker)
        for row in per_worker:
            while sum(row) < target:  # extra batches go to the worker with the fewest (lowest index on ties)
                row[row.index(min(row))] += 1
    plans: list[list[SlotPlan]] = []
    pad_cursor = 0
    for r in range(world_size):
        slots_of_rank = []
        for w in range(workers):
            n = per_worker[r][w] * batch_size
            order = streams[r][w][:n]
            missing = n - len(order)
            if missing > 0:
                if not stream:
                    raise ValueError("uneven='pad' needs at least one sample")
                order += [stream[(pad_cursor + j) % len(stream)] for j in range(missing)]
                pad_cursor += missing
            slots_of_rank.append(SlotPlan(order=order, num_padded=max(0, missing), batches=per_worker[r][w]))
        plans.append(slots_of_rank)
    return plans


class ShardedIterableDataset(IterableDataset):
    """An IterableDataset over shards, split per rank and per DataLoader worker, yielding whole batches.

    Args:
        shards: shard descriptions (paths, URLs, any picklable objects).
        read: ``read(shard)`` yields the shard's raw samples in a fixed order (cheap: no decoding).
        sizes: samples per shard; counted once with ``read`` when omitted (pass them for large data).
        batch_size: samples per batch; use ``DataLoader(ds, batch_size=None)``.
        transform: applied to each kept sample (decoding, augmentation); skipped samples are never decoded.
        collate: turns a list of samples into a batch (``default_collate``).
        rank, world_size: default to the process group's.
        seed, shuffle, shuffle_buffer, uneven, split: see :func:`plan_epoch`.
    """

    def __init__(
        self,
        shards: Sequence[Any],
        read: Callable[[Any], Iterable[Any]],
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
        split: Literal["auto", "shards", "samples"] = "auto",
    ) -> None:
        self.shards = list(shards)
        self.read = read
        self.sizes = list(sizes) if sizes is not None else [sum(1 for _ in read(s)) for s in self.shards]
        if len(self.sizes) != len(self.shards):
            raise ValueError(f"{len(self.shards)} shards but {len(self.sizes)} sizes")
        self.batch_size = batch_size
        self.transform = transform
        self.collate = collate
        self.rank = dist.get_rank() if rank is None else rank
        self.world_size = dist.get_world_size() if world_size is None else world_size
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.uneven, self.split = uneven, split
        self.epoch = 0
        self._yielded = 0  # batches this worker yielded in the current epoch
        self._pending: dict[str, int] | None = None  # position restored by load_state_dict, used by __iter__

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (shuffling order); call before iterating each epoch, on every rank."""
        self.epoch = epoch

    def plan(self, num_workers: int, epoch: int | None = None) -> list[list[SlotPlan]]:
        """The plan of every rank and worker for ``epoch`` (defaults to the current one)."""
        return plan_epoch(
            self.sizes, self.world_size, num_workers, self.batch_size, seed=self.seed,
            epoch=self.epoch if epoch is None else epoch, shuffle=self.shuffle,
            shuffle_buffer=self.shuffle_buffer, uneven=self.uneven, split=self.split,
        )

    def batches_per_rank(self, num_workers: int) -> int:
        """Batches every rank yields this epoch (the same on all ranks)."""
        return sum(p.batches for p in self.plan(num_workers)[self.rank])

    def state_dict(self) -> dict[str, Any]:
        """Position of this worker: epoch and batches yielded (torchdata collects one per worker)."""
        return {"epoch": self.epoch, "yielded": self._yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the batches recorded in ``state`` when the next iteration is of the same epoch.

        A position from another epoch (e.g. saved at the end of an epoch, resumed into the next) is ignored.
        """
        self._pending = {"epoch": int(state["epoch"]), "yielded": int(state["yielded"])}

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot = self.plan(workers)[self.rank][worker]
        pending, self._pending = self._pending, None
        skip = pending["yielded"] if pending and pending["epoch"] == self.epoch else 0
        self._yielded = skip
        wanted = slot.order[skip * self.batch_size :]
        for start in range(0, len(wanted), self.batch_size):
            chunk = wanted[start : start + self.batch_size]
            samples = self._fetch(chunk)
            self._yielded += 1  # before the yield: a snapshot taken after this batch must include it
            batch = self.collate(samples)
            yield by_value(batch) if info is not None else batch

    def _fetch(self, refs: list[Ref]) -> list[Any]:
        """Read the samples ``refs`` (shard, index), opening each needed shard once, in order."""
        needed: dict[int, set[int]] = {}
        for s, i in refs:
            needed.setdefault(s, set()).add(i)
        got: dict[Ref, Any] = {}
        for s in sorted(needed, key=lambda s: next(k for k, r in enumerate(refs) if r[0] == s)):
            want = needed[s]
            last = max(want)
            for i, raw in enumerate(self._read_cached(s)):
                if i in want:
                    got[(s, i)] = self.transform(raw) if self.transform else raw
                if i >= last:
                    break
        return [got[r] for r in refs]

    def _read_cached(self, shard: int) -> list[Any]:
        # Batches are cut from a shard's samples in order; keep the raw (undecoded) samples of the last two
        # shards read so a batch or a shuffle-buffer window spanning a shard boundary reads each shard once.
        cache: dict[int, list[Any]] = self.__dict__.setdefault("_cache", {})
        if shard not in cache:
            if len(cache) >= 2:
                cache.pop(next(iter(cache)))
            cache[shard] = list(self.read(self.shards[shard]))
        return cache[shard]


def make_loader(
    dataset: ShardedIterableDataset, num_workers: int = 0, pin_memory: bool = False, **kw: Any
) -> Any:
    """A torchdata ``StatefulDataLoader`` over ``dataset`` (batches come from the dataset; state per worker).

    Inside a SLURM job the workers ignore SIGTERM and USR2: SLURM signals every process of the step on a
    preemption or requeue, and torch's workers would die of it and crash the rank before it reaches the step
    boundary where it saves (:mod:`launcher.stop`). The rank stops its workers itself when it exits.

    A worker that sends nothing for ``timeout`` seconds (default: the job's ``distributed.startup_timeout_s``,
    600 s outside the launcher) fails the rank instead of hanging it:
    a worker stuck at start-up, for instance.

    In a rank, workers start from a fork server of the rank's own when the dataset can be sent to one
    (:func:`launcher.forkserver.for_workers`: forking a rank that runs Gloo collectives can deadlock the new
    worker); otherwise, or with ``multiprocessing_context`` given, as the DataLoader starts them.
    """
    from torchdata.stateful_dataloader import StatefulDataLoader

    if num_workers > 0:
        kw.setdefault("timeout", dist.data_timeout_s())
    if num_workers > 0 and stop.installed():
        kw["worker_init_fn"] = functools.partial(_ignore_stop_signals, kw.get("worker_init_fn"))
    if num_workers > 0 and "multiprocessing_context" not in kw:
        kw["multiprocessing_context"] = forkserver.for_workers(dataset, kw.get("worker_init_fn"))
    with warnings.catch_warnings():
        # torchdata 0.11 calls torch.set_vital, deprecated in newer torch: noise, not a user problem.
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        return StatefulDataLoader(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory and torch.cuda.is_available(),
            persistent_workers=False,
            **kw,
        )


def _ignore_stop_signals(user_init: Callable[[int], None] | None, worker_id: int) -> None:
    for sig in stop.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if user_init is not None:
        user_init(worker_id)
