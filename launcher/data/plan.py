"""The epoch plan: which samples each (rank, DataLoader worker) slot yields. Pure: no torch, no I/O.

The epoch's *stream* is every sample once: the shards in an order drawn from ``(seed, epoch)``, each shard's
samples in their stored order. A *phase* is the part of the stream still to yield, as sorted ranges of stream
positions: the whole stream when an epoch starts; what no rank has yielded yet when a run resumes mid-epoch
with another world size, worker count or batch size (:meth:`EpochPlan.unseen`). The phase's samples, in
stream order, are cut into one contiguous range per slot (rank-major, then worker):

* balance: every rank gets the same number of batches ``b``, its workers ``b // W`` or one more, each slot a
  whole number of batches. ``uneven="drop"`` leaves out the last ``L - R*b*B < R*B`` samples of the phase
  (``L`` samples, ``R`` ranks, batch ``B``), ``uneven="pad"`` repeats its first ``R*b*B - L < R*B``;
  ``uneven="none"`` (evaluation) yields every sample once, partial last batches, counts that may differ.
  An epoch that would yield no batch at all is an error (:class:`EmptyEpoch`), never a silent no-op.
* cost: a worker draws the shard order and sums the sizes (O(shards)) and finds its own range (O(1)); it never
  lists another slot's samples. Its samples come as runs ``(shard, first, stop)`` of consecutive samples.
* bytes: each slot reads one contiguous range, at most one partial shard at each end, so an epoch reads about
  the dataset's bytes once, whatever the number of shards and slots.
* shuffling: shard order per epoch; within a slot, a window of ``shuffle_buffer`` samples is emitted in a
  permutation drawn from ``(seed, epoch, phase, slot, window)``. A window takes ``shuffle_buffer / LANES``
  consecutive samples from each of :data:`LANES` lanes, evenly spaced parts of the slot's range read side by
  side, so a batch mixes samples from far apart in the stream (class-sorted shards included) while every
  lane is still read sequentially. Unlike a reservoir buffer, the window in progress and what it has emitted
  follow from the count of samples yielded, so a worker's position is one integer, and another topology can
  tell exactly which samples a stopped run has not yielded.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

#: Evenly spaced parts of a slot's range that a shuffle window draws from (when shuffle_buffer allows).
LANES = 8

Run = tuple[int, int, int]  # (shard index, first sample, stop sample): consecutive samples of one shard
Ref = tuple[int, int]  # (shard index, sample index within the shard)
Uneven = Literal["drop", "pad", "none"]


class EmptyEpoch(ValueError):
    """The epoch would yield no batch on any rank."""


@dataclass(frozen=True)
class SlotPlan:
    """What one (rank, worker) slot yields in one phase of an epoch."""

    start: int
    """Offset of the slot's first sample in the phase (offsets past the phase's length: padding repeats)."""
    count: int
    """Samples the slot yields, padding included."""
    batches: int
    """Batches the slot yields."""
    num_padded: int
    """How many of the slot's samples are repeats (``uneven="pad"``)."""


class EpochPlan:
    """The plan of one epoch (or of what is left of it) for ``world_size`` ranks of ``num_workers`` workers.

    Every process builds the same plan from the same arguments; a worker then reads only :meth:`slot` of its
    own. ``remaining`` (sorted, disjoint stream ranges) and ``phase`` describe a resumed epoch's rest.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        world_size: int,
        num_workers: int,
        batch_size: int,
        *,
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 0,
        uneven: Uneven = "drop",
        remaining: Sequence[tuple[int, int]] | None = None,
        phase: int = 0,
    ) -> None:
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size ({batch_size}) and world_size ({world_size}) must be at least 1")
        if uneven not in ("drop", "pad", "none"):
            raise ValueError(f"uneven={uneven!r}: expected 'drop', 'pad' or 'none'")
        self.sizes = sizes
        self.world_size, self.workers, self.batch_size = world_size, max(1, num_workers), batch_size
        self.seed, self.epoch, self.shuffle, self.uneven, self.phase = seed, epoch, shuffle, uneven, phase
        self.window = shuffle_buffer if shuffle and shuffle_buffer > 1 else 1
        self.order = list(range(len(sizes)))
        if shuffle:
            _rng(seed, epoch).shuffle(self.order)
        # stream position of the k-th shard in the order (one entry more: the total)
        self.shard_start = list(itertools.accumulate((sizes[s] for s in self.order), initial=0))
        self.total = self.shard_start[-1]
        segments = [(0, self.total)] if remaining is None else [(a, b) for a, b in remaining if b > a]
        self.seg_lo = [a for a, _ in segments]
        self.seg_at = list(itertools.accumulate((b - a for a, b in segments), initial=0))  # phase offsets
        self.length = self.seg_at[-1]
        slots = self.world_size * self.workers
        per_rank = self.world_size * batch_size
        if uneven == "none":
            self.batches = 0  # per slot, see slot()
        elif self.length == 0:
            self.batches = 0
        else:
            self.batches = self.length // per_rank if uneven == "drop" else -(-self.length // per_rank)
        if remaining is None and self.total == 0:
            raise EmptyEpoch(f"the epoch has no samples: {len(sizes)} shards, all empty\n"
                             "HINT: check the shard list and its sizes")
        if remaining is None and self.batches == 0 and uneven == "drop":
            raise EmptyEpoch(
                f"the epoch has {self.total} samples in {len(sizes)} shards, fewer than one batch for every "
                f"rank ({world_size} ranks x batch_size {batch_size} = {per_rank}): it would train on nothing"
                "\nHINT: lower the batch size, use fewer ranks, or uneven='pad' (repeats samples to give "
                "every rank a batch)")
        self._slots = slots

    # ---------------------------------------------------------------------------------------------- slots

    def slot(self, rank: int, worker: int) -> SlotPlan:
        """The range, sample count and batch count of slot ``(rank, worker)``."""
        w, b, bs = self.workers, self.batches, self.batch_size
        if self.uneven == "none":
            k = rank * w + worker
            q, extra = divmod(self.length, self._slots)
            count = q + (k < extra)
            return SlotPlan(start=k * q + min(k, extra), count=count, batches=-(-count // bs), num_padded=0)
        mine = b // w + (worker < b % w)
        start = (rank * b + worker * (b // w) + min(worker, b % w)) * bs
        count = mine * bs
        padded = max(0, min(count, start + count - self.length))
        return SlotPlan(start=start, count=count, batches=mine, num_padded=padded)

    def batches_per_rank(self, rank: int = 0) -> int:
        """Batches rank ``rank`` yields (the same on every rank unless ``uneven="none"``)."""
        return sum(self.slot(rank, w).batches for w in range(self.workers))

    def dropped(self) -> int:
        """Samples of the phase no slot yields (``uneven="drop"``)."""
        return self.length - self.world_size * self.batches * self.batch_size if self.uneven == "drop" else 0

    # ------------------------------------------------------------------------------------- positions

    def runs(self, first: int, stop: int) -> Iterator[Run]:
        """Phase offsets ``[first, stop)`` as runs of consecutive samples of one shard, in order (offsets past
        the phase's length wrap around to its start: padding)."""
        while first < stop:
            if self.length == 0:
                raise EmptyEpoch("padding needs at least one sample")
            at = first % self.length
            n = min(stop - first, self.length - at)
            for a, b in self._stream_ranges(at, at + n):
                yield from self._shard_runs(a, b)
            first += n

    def _stream_ranges(self, first: int, stop: int) -> Iterator[tuple[int, int]]:
        """Phase offsets ``[first, stop)`` (inside the phase) as stream ranges."""
        i = bisect.bisect_right(self.seg_at, first) - 1
        while first < stop:
            end = min(stop, self.seg_at[i + 1])
            lo = self.seg_lo[i] + first - self.seg_at[i]
            yield lo, lo + end - first
            first, i = end, i + 1

    def _shard_runs(self, first: int, stop: int) -> Iterator[Run]:
        k = bisect.bisect_right(self.shard_start, first) - 1
        while first < stop:
            end = min(stop, self.shard_start[k + 1])
            yield self.order[k], first - self.shard_start[k], end - self.shard_start[k]
            first, k = end, k + 1

    def permutation(self, rank: int, worker: int, window: int, n: int) -> list[int]:
        """The order slot ``(rank, worker)`` emits the ``n`` samples of its ``window``-th window in."""
        perm = list(range(n))
        if self.window > 1:
            _rng(self.seed, self.epoch, f"{self.phase}:{rank * self.workers + worker}:{window}").shuffle(perm)
        return perm

    def lanes(self, sp: SlotPlan) -> tuple[list[tuple[int, int]], int]:
        """The slot's lanes as ``(first offset, length)`` and how many samples a window takes from each."""
        n = min(LANES, self.window) if self.window > 1 else 1
        q, extra = divmod(sp.count, n)
        spans = [(sp.start + p * q + min(p, extra), q + (p < extra)) for p in range(n)]
        return spans, self.window // n

    def window_pieces(self, sp: SlotPlan, j: int) -> list[tuple[int, int]]:
        """Window ``j`` of slot ``sp`` as phase offset ranges, one per lane, in reading order."""
        spans, chunk = self.lanes(sp)
        return [(a + j * chunk, a + min(n, (j + 1) * chunk)) for a, n in spans if n > j * chunk]

    def window_at(self, sp: SlotPlan, done: int) -> tuple[int, int]:
        """``(window, emitted inside it)`` once the slot has emitted ``done`` samples."""
        spans, chunk = self.lanes(sp)
        per = chunk * len(spans)
        j = min(done // per, (sp.count // len(spans)) // chunk)  # windows before j are whole: skip them
        done -= j * per
        while True:
            size = sum(b - a for a, b in self.window_pieces(sp, j))
            if done < size or size == 0:
                return j, done
            j, done = j + 1, done - size

    def refs(self, rank: int, worker: int) -> Iterator[Ref]:
        """Every sample slot ``(rank, worker)`` yields, in yield order (for tests and small data)."""
        sp = self.slot(rank, worker)
        j = 0
        while pieces := self.window_pieces(sp, j):
            block = [(s, i) for lo, hi in pieces for s, a, b in self.runs(lo, hi) for i in range(a, b)]
            yield from (block[p] for p in self.permutation(rank, worker, j, len(block)))
            j += 1

    # ----------------------------------------------------------------------------------------- resume

    def unseen(self, yielded: Mapping[tuple[int, int], int]) -> list[tuple[int, int]]:
        """Stream ranges of the samples no slot has yielded, given the batches each ``(rank, worker)`` slot
        yielded (absent: none). Samples a window had read but not emitted are among them; so is the tail
        ``uneven="drop"`` would have left out. Cost: O(slots x shuffle_buffer + phase ranges)."""
        left: list[tuple[int, int]] = []  # phase offsets
        if self.uneven == "drop":
            left.append((self.length - self.dropped(), self.length))
        for rank in range(self.world_size):
            for worker in range(self.workers):
                sp = self.slot(rank, worker)
                j, into = self.window_at(sp, min(sp.count, yielded.get((rank, worker), 0) * self.batch_size))
                if into:
                    offsets = [o for a, b in self.window_pieces(sp, j) for o in range(a, b)]
                    left += [(offsets[p], offsets[p] + 1)
                             for p in self.permutation(rank, worker, j, len(offsets))[into:]]
                    j += 1
                spans, chunk = self.lanes(sp)
                left += [(a + j * chunk, a + n) for a, n in spans if n > j * chunk]
        # offsets past the phase's length are padding: repeats of samples that have an offset of their own
        clipped = sorted((a, min(b, self.length)) for a, b in left if a < min(b, self.length))
        return _merge(r for a, b in clipped for r in self._stream_ranges(a, b))


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _rng(seed: int, epoch: int, salt: object = 0) -> random.Random:
    return random.Random(f"launcher-data:{seed}:{epoch}:{salt}")  # str seeds are hashed stably (sha512)
