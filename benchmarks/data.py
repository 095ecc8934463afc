"""Sharded tar reading: W DataLoader workers vs one worker (target >= 0.9 x W up to the core count), then the
rows of :mod:`benchmarks.data_scale` (plan cost, memory, bytes read, WebDataset side by side).

Rates are steady-state samples/s: the clock starts when the first batch arrives, so worker start-up (paid once
per epoch) does not count. One worker against a plain loop in the main process is reported as well.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

from torchvision import transforms

from examples.shapes import generate
from launcher.data import ShardedIterableDataset, make_loader
from launcher.data.tar import DecodeImage, open_shards, read_tar

from . import data_scale
from .common import alternate

SAMPLES = 12000
BATCH = 50


def run() -> list[dict[str, object]]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        return _run(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(tmp: Path) -> list[dict[str, object]]:
    generate(tmp, train=SAMPLES, val=8, size=64, per_shard=250)
    paths, sizes, _ = open_shards(tmp / "train")
    dec = DecodeImage(transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor()]))

    def plain() -> float:
        it = (dec(s) for p in paths for s in read_tar(p))
        next(it)
        t, n = time.perf_counter(), sum(1 for _ in it)
        return n / (time.perf_counter() - t)

    def loader(workers: int) -> float:
        ds = ShardedIterableDataset(paths, read_tar, sizes=sizes, batch_size=BATCH, transform=dec, rank=0,
                                    world_size=1)
        with warnings.catch_warnings():  # 4 workers on 2 cores is the point of the 4-worker row
            warnings.filterwarnings("ignore", message="This DataLoader will create")
            it = iter(make_loader(ds, num_workers=workers))
        next(it)
        t, n = time.perf_counter(), sum(len(y) for _, y in it)
        return n / (time.perf_counter() - t)

    cores = len(os.sched_getaffinity(0))
    base = alternate(plain, lambda: loader(1), rounds=5)
    out = [{"name": "tar shards, 1 worker / plain loop in the main process (samples/s, 64px PNG decode)",
            "value": base["ratio"], "target": "reported (IPC cost of a worker)", "ok": True,
            "detail": f"plain {base['a']:.0f}/s, 1 worker {base['b']:.0f}/s"}]
    for w in (2, 4):
        r = alternate(functools.partial(loader, 1), functools.partial(loader, w), rounds=5)
        expected = 0.9 * min(w, cores)
        out.append({"name": f"tar shards, {w} workers / 1 worker (steady-state samples/s)",
                    "value": r["ratio"], "target": f">= {expected:.2f} (0.9 x min(W, {cores} cores))",
                    "ok": r["ratio"] >= expected,
                    "detail": f"1 worker {r['a']:.0f}/s, {w} workers {r['b']:.0f}/s"})
    return out + data_scale.run(tmp / "train", dec, BATCH)
