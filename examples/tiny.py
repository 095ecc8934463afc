"""The tiny job: a small MLP with BatchNorm on synthetic sharded data; seconds on CPU.

It exercises every capability the way a real job does: synchronized BatchNorm through the model wrapper, a
sharded IterableDataset read by DataLoader workers, periodic checkpoints and automatic resume.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

import launcher
from launcher.checkpoint import Checkpointer
from launcher.data import ShardedIterableDataset, make_loader


def read_shard(shard: tuple[int, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A synthetic shard: ``n`` samples drawn from a generator seeded by the shard id."""
    shard_id, n = shard
    g = torch.Generator().manual_seed(1000 + shard_id)
    x = torch.randn(n, 8, generator=g)
    y = ((x[:, 0] + 0.5 * x[:, 1]) > 0).long()
    return list(zip(x, y))


def shards(num_samples: int, num_shards: int = 7) -> tuple[list[tuple[int, int]], list[int]]:
    """Uneven shard sizes on purpose (the case that makes naive sharding hang DDP)."""
    weights = [1 + (i % 3) for i in range(num_shards)]
    sizes = [num_samples * w // sum(weights) for w in weights]
    return [(i, n) for i, n in enumerate(sizes)], sizes


def main(job: launcher.Job) -> dict[str, Any]:
    torch.manual_seed(job.seed)  # the same initial weights everywhere (DDP would broadcast rank 0's anyway)
    model: nn.Module = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2))
    model = launcher.wrap_for_job(model, job)
    opt = torch.optim.SGD(model.parameters(), lr=job.train.lr, momentum=job.train.momentum)
    shard_list, sizes = shards(job.data.num_samples)
    ds = ShardedIterableDataset(shard_list, read_shard, sizes=sizes, batch_size=job.train.batch_size,
                                seed=job.seed, uneven=job.data.uneven, shuffle_buffer=job.data.shuffle_buffer)
    loader = make_loader(ds, num_workers=job.data.num_workers)
    ckpt = Checkpointer.for_job(job, per_rank={"data": loader}, model=model, optimizer=opt)
    state = ckpt.resume(job.checkpoint.resume)
    max_steps = job.train.max_steps or 10**12
    sleep = float(job.args.get("step_sleep", 0.0))
    loss = torch.tensor(0.0)
    while state.epoch < job.train.epochs and state.step < max_steps:
        ds.set_epoch(state.epoch)
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            state.step += 1
            launcher.note_step(state.step)
            if job.checkpoint.every_steps and state.step % job.checkpoint.every_steps == 0:
                ckpt.save(state)
            ckpt.stop_if_requested(state)  # SLURM preemption / time limit: save, requeue, exit
            time.sleep(sleep)
            if state.step >= max_steps:
                break
        else:
            state.epoch += 1
    ckpt.save(state, per_rank=False)
    ckpt.close()
    return {"rank": launcher.get_rank(), "world_size": launcher.get_world_size(), "step": state.step,
            "epoch": state.epoch, "loss": loss.item()}
