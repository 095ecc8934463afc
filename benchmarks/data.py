"""Sharded tar reading with 1, 2, 4 DataLoader workers vs one plain loop (target W >= 0.9 x W x one, to the cores)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from torchvision import transforms

from examples.shapes import generate
from launcher.data import ShardedIterableDataset, make_loader
from launcher.tarshards import DecodeImage, open_shards, read_tar

from .common import alternate, timed


def run() -> list[dict[str, object]]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    generate(tmp, train=4000, val=8, size=64, per_shard=250)
    paths, sizes, _ = open_shards(tmp / "train")
    dec = DecodeImage(transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor()]))
    n = sum(sizes)

    def plain() -> float:
        return n / timed(lambda: [dec(s) for p in paths for s in read_tar(p)])

    def loader(workers: int) -> float:
        ds = ShardedIterableDataset(paths, read_tar, sizes=sizes, batch_size=50, transform=dec, rank=0,
                                    world_size=1)
        return n / timed(lambda: list(make_loader(ds, num_workers=workers)))

    cores = len(os.sched_getaffinity(0))
    out = []
    for w in (1, 2, 4):
        r = alternate(plain, lambda w=w: loader(w), rounds=3)
        expected = 0.9 * min(w, cores)
        out.append({"name": f"tar shards, {w} worker(s) / one plain loop (samples/s, 64px PNG decode)",
                    "value": r["ratio"], "target": f">= {expected:.2f} (0.9 x min(W, {cores} cores))",
                    "ok": r["ratio"] >= expected,
                    "detail": f"plain {r['a']:.0f}/s, loader {r['b']:.0f}/s"})
    return out
