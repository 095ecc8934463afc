"""SyncBatchNorm cost: a 2-rank CPU training step with launcher.SyncBatchNorm vs plain BatchNorm (target <= 1.3)."""

from __future__ import annotations

import torch
from torch import nn

import launcher
from launcher.testing import run_distributed

from .common import alternate, timed


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def _steps(model: nn.Module, n: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))

    def run() -> None:
        for _ in range(n):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    run()  # warm-up
    launcher.barrier()
    return timed(run) / n


def measure() -> dict[str, float]:
    plain = launcher.wrap_model(cnn(), sync_batchnorm=False)
    sync = launcher.wrap_model(cnn(), sync_batchnorm=True)
    return alternate(lambda: _steps(plain, 10), lambda: _steps(sync, 10), rounds=5)


def run() -> dict[str, object]:
    r = run_distributed(measure, world_size=2, timeout_s=300)[0]
    return {"name": "SyncBatchNorm step / plain BatchNorm step (2 CPU ranks, 3-layer CNN, batch 32/rank)",
            "value": r["ratio"], "target": "<= 1.3", "ok": r["ratio"] <= 1.3,
            "detail": f"plain {r['a'] * 1e3:.1f} ms, sync {r['b'] * 1e3:.1f} ms per step (median of 5)"}
