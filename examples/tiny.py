"""The tiny job: a small MLP with BatchNorm on synthetic data; finishes in seconds on CPU."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import launcher


def main(job: launcher.Job) -> dict[str, Any]:
    torch.manual_seed(job.seed)  # same initial weights on every rank
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    model = torch.nn.parallel.DistributedDataParallel(model) if launcher.get_world_size() > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=job.train.lr)
    g = torch.Generator().manual_seed(job.seed + launcher.get_rank())
    step = 0
    for step in range(1, (job.train.max_steps or 10) + 1):
        x = torch.randn(job.train.batch_size, 8, generator=g)
        y = (x[:, 0] > 0).long()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        launcher.note_step(step)
    return {"rank": launcher.get_rank(), "world_size": launcher.get_world_size(), "steps": step}
