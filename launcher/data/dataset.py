"""The sharded IterableDataset: each sample once per epoch, equal batches on every rank, mid-epoch resume.

It follows the plan of :func:`launcher.data.plan.plan_epoch`; see that module for the guarantees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

from torch.utils.data import IterableDataset, default_collate, get_worker_info

from .. import dist
from .plan import Ref, SlotPlan, plan_epoch
from .smalltensors import by_value


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
