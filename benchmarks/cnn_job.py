"""The benchmark CNN job through the launcher: the loop of ``plain_cnn.py`` written with launcher's pieces.

Model wrapping, the sharded dataset with its StatefulDataLoader, the checkpointer (resume=never, no saves),
``note_step`` and ``stop_if_requested`` every step: what a launcher user's loop carries. Run with
``launcher run jobs/tiny.yaml entry=benchmarks.cnn_job:main distributed.sync_batchnorm=false ...``.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import nn

import launcher
from launcher.checkpoint import Checkpointer
from launcher.data import ShardedIterableDataset, make_loader

BATCH = 32
WARMUP = 5
SHARDS = 8


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(64, 10))


def samples(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


@functools.lru_cache(maxsize=None)
def read_shard(shard: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Synthetic shard, generated once (the plain script also builds its tensors before the loop)."""
    x, y = samples(shard, 4096 // SHARDS)
    return list(zip(x, y))


def main(job: launcher.Job) -> float:
    steps = job.train.max_steps or 50
    torch.manual_seed(0)
    model = launcher.wrap_for_job(make_cnn(), job)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ds = ShardedIterableDataset(list(range(SHARDS)), read_shard, sizes=[4096 // SHARDS] * SHARDS,
                                batch_size=BATCH, seed=job.seed)
    for shard in range(SHARDS):
        read_shard(shard)
    loader = make_loader(ds, num_workers=job.data.num_workers)
    ckpt = Checkpointer(job.checkpoint_dir, job=job, per_rank={"data": loader}, model=model, optimizer=opt)
    state = ckpt.resume("never")
    start = 0.0
    while state.step < steps:
        ds.set_epoch(state.epoch)
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            state.step += 1
            launcher.note_step(state.step)
            ckpt.stop_if_requested(state)
            if state.step == 1 and launcher.is_main_process():
                print(f"FIRST_STEP {time.time()}", flush=True)
            if state.step == WARMUP:
                start = time.perf_counter()
            if state.step >= steps:
                break
        else:
            state.epoch += 1
    ckpt.close()
    rate = (steps - WARMUP) * BATCH * launcher.get_world_size() / (time.perf_counter() - start)
    if launcher.is_main_process():
        print(f"THROUGHPUT {rate}", flush=True)
    return rate
