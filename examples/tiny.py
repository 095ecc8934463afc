"""The tiny job: a small MLP with BatchNorm on synthetic data; finishes in seconds on CPU."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import launcher


def main(job: launcher.Job) -> dict[str, Any]:
    torch.manual_seed(job.seed)  # same initial weights on every rank
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    model = torch.nn.parallel.DistributedDataParallel(model) if launcher.get_world_size() > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=job.train.lr)
    g = torch.Generator().manual_seed(job.seed + launcher.get_rank())
    x = torch.randn(job.data.num_samples, 8, generator=g)
    loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=job.train.batch_size,
                        num_workers=job.data.num_workers, drop_last=True)
    step = 0
    sleep = float(job.args.get("step_sleep", 0.0))
    while step < (job.train.max_steps or 10):
        for xb, yb in loader:
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            launcher.note_step(step)
            time.sleep(sleep)
            if step >= (job.train.max_steps or 10):
                break
    return {"rank": launcher.get_rank(), "world_size": launcher.get_world_size(), "steps": step}
