"""The tiny job: a small MLP with BatchNorm on synthetic sharded data; seconds on CPU.

It exercises every capability the way a real job does: synchronized BatchNorm through the model wrapper, a
sharded IterableDataset read by DataLoader workers, periodic checkpoints and automatic resume.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

import launcher
from launcher import EXACT, at_least


@dataclass
class TinyArgs:
    """The tiny job's own settings (the ``args:`` section of ``jobs/tiny.yaml``)."""

    epochs: int = field(default=2, metadata=at_least(1))
    """Passes over the data."""
    max_steps: int | None = field(default=None, metadata=at_least(1))
    """Stop after this many steps in total (null: run every epoch)."""
    batch_size: int = field(default=16, metadata=at_least(1, **EXACT))
    """Samples per rank per step."""
    lr: float = field(default=0.1, metadata=at_least(0))
    """SGD learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    num_samples: int = field(default=512, metadata=at_least(1))
    """Size of the synthetic data set."""
    log_every: int = field(default=10, metadata=at_least(0))
    """Print a progress line on rank 0 every this many steps (0: never)."""
    step_sleep: float = field(default=0.0, metadata=at_least(0))
    """Seconds to sleep after each step (tests use it to keep a job running)."""
    deterministic: bool = False
    """``torch.use_deterministic_algorithms(True)``: bit-exact resume on GPUs too (set CUBLAS_WORKSPACE_CONFIG
    as torch asks)."""


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


def main(job: launcher.Job, args: TinyArgs) -> dict[str, Any]:
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    device = launcher.get_device()  # cuda:LOCAL_RANK with NCCL, else the CPU
    torch.manual_seed(job.seed)  # the same initial weights everywhere (DDP would broadcast rank 0's anyway)
    model: nn.Module = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2))
    model = launcher.wrap_for_job(model, job)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    shard_list, sizes = shards(args.num_samples)
    ds = launcher.ShardedIterableDataset.for_job(job, shard_list, read_shard, sizes=sizes,
                                                 batch_size=args.batch_size)
    loader = launcher.make_loader(ds, job=job)
    ckpt = launcher.Checkpointer.for_job(job, per_rank={"data": loader}, model=model, optimizer=opt)
    state = ckpt.resume()
    max_steps = args.max_steps or 10**12
    launcher.set_total_steps(min(max_steps, args.epochs * ds.batches_per_rank(job.data.num_workers)))  # ETA
    if state.epoch >= args.epochs or state.step >= max_steps:
        launcher.log(f"already finished: resumed at step {state.step}, epoch {state.epoch}; nothing to train "
                     "(start over with checkpoint.resume=never or another name)")
        ckpt.close()
        return {"rank": launcher.get_rank(), "step": state.step, "epoch": state.epoch, "loss": None}
    loss = torch.tensor(float("nan"))
    while state.epoch < args.epochs and state.step < max_steps:
        ds.set_epoch(state.epoch)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            state.step += 1
            ckpt.step(state)  # save every checkpoint.every_steps; SLURM preemption: save, requeue, exit
            if args.log_every and state.step % args.log_every == 0:
                launcher.log(f"epoch {state.epoch} step {state.step} loss {loss.item():.4f}")
            time.sleep(args.step_sleep)
            if state.step >= max_steps:
                break
        else:
            state.epoch += 1
    ckpt.finish(state)
    # the weights' checksum, bit for bit: the same on every rank, and after a resume as without one
    weights = hashlib.sha256(b"".join(t.numpy().tobytes() for t in launcher.full_state_dict(model).values()))
    return {"rank": launcher.get_rank(), "world_size": launcher.get_world_size(), "step": state.step,
            "epoch": state.epoch, "loss": loss.item(), "weights": weights.hexdigest()[:16],
            "device": str(device), "backend": tdist.get_backend() if tdist.is_initialized() else None}
