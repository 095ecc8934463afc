"""The epoch plan: which samples each (rank, DataLoader worker) slot yields. Pure: no torch, no I/O.

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

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

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
