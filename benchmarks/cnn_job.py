"""The benchmark CNN job through the launcher: the loop of ``plain_cnn.py`` written with launcher's pieces.

Model wrapping, the sharded dataset with its StatefulDataLoader, the checkpointer (resume=never, no saves),
``ckpt.step`` every step: what a launcher user's loop carries. Run with ``launcher run jobs/bench_cnn.yaml``;
its ``args`` are :class:`CnnArgs`.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

import launcher

BATCH = 32
IMAGE_SIZE = 32
WARMUP = 5
SHARDS = 8
SAMPLES = 4096


def make_model(name: str = "cnn") -> nn.Module:
    """The CPU benchmarks' small CNN, or torchvision's ResNet-18 (classify.yaml's ``args.model=resnet18``)."""
    if name == "resnet18":
        from torchvision.models import resnet18

        return resnet18(num_classes=10)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(64, 10))


def samples(seed: int, n: int, size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


@functools.cache
def read_shard(shard: int, size: int = IMAGE_SIZE) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Synthetic shard, generated once (the plain script also builds its tensors before the loop)."""
    x, y = samples(shard, SAMPLES // SHARDS, size)
    return list(zip(x, y))


@dataclass
class CnnArgs:
    """The benchmark job's settings."""

    max_steps: int = 50
    """Steps to run (the first WARMUP are not timed)."""
    model: Literal["cnn", "resnet18"] = "cnn"
    """The CPU benchmarks' small CNN, or the example job's GPU model."""
    image_size: int = IMAGE_SIZE
    """Side of the square synthetic images."""
    batch: int = BATCH
    """Samples per rank per step."""
    amp: Literal["off", "bf16", "fp16"] = "off"
    """Mixed precision on GPU."""


def main(job: launcher.Job, args: CnnArgs) -> float:
    steps, name, size, batch = args.max_steps, args.model, args.image_size, args.batch
    device = launcher.get_device()
    dtype = launcher.autocast_dtype(args.amp, device)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = launcher.wrap_for_job(make_model(name), job)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    read = functools.partial(read_shard, size=size)
    ds = launcher.ShardedIterableDataset(list(range(SHARDS)), read, sizes=[SAMPLES // SHARDS] * SHARDS,
                                batch_size=batch, seed=job.seed)
    for shard in range(SHARDS):
        read(shard)
    loader = launcher.make_loader(ds, job=job)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    ckpt = launcher.Checkpointer(job.checkpoint_dir, job=job, per_rank={"data": loader}, model=model,
                                 optimizer=opt)
    state = ckpt.resume("never")
    start = 0.0
    while state.step < steps:
        ds.set_epoch(state.epoch)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            state.step += 1
            ckpt.step(state)
            if state.step == 1 and launcher.is_main_process():
                print(f"FIRST_STEP {time.time()}", flush=True)
            if state.step == WARMUP:
                _sync(device)
                start = time.perf_counter()
            if state.step >= steps:
                break
        else:
            state.epoch += 1
    _sync(device)
    rate = (steps - WARMUP) * batch * launcher.get_world_size() / (time.perf_counter() - start)
    ckpt.close()
    if launcher.is_main_process():
        print(f"THROUGHPUT {rate}", flush=True)
    return rate


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
