"""SyncBatchNorm cost: a 2-rank CPU step with launcher.SyncBatchNorm vs plain BatchNorm (target <= 1.3)."""

from __future__ import annotations

import functools

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


def example_resnet() -> nn.Module:
    from examples.classify import small_resnet

    torch.manual_seed(0)
    return small_resnet(4, width=16, depth=1)


ROUNDS = 9

MODELS = {
    # name: (model, input shape, steps per measurement: about a second each)
    "3-layer CNN, 32px, batch 32/rank": (cnn, (32, 3, 32, 32), 30),
    "the example's ResNet (classify.yaml), 64px, batch 32/rank": (example_resnet, (32, 3, 64, 64), 6),
}


def _steps(model: nn.Module, shape: tuple[int, ...], n: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(*shape), torch.randint(0, 4, (shape[0],))

    def run() -> None:
        for _ in range(n):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    launcher.barrier()
    return timed(run) / n


def measure() -> dict[str, dict[str, float]]:
    # Each side runs about a second per round: rounds of a few steps are too short on a shared machine, where
    # one preempted round moves the ratio (see benchmarks/RESULTS.md).
    out = {}
    for name, (make, shape, n) in MODELS.items():
        plain = launcher.wrap_model(make(), sync_batchnorm=False)
        sync = launcher.wrap_model(make(), sync_batchnorm=True)
        _steps(plain, shape, 3), _steps(sync, shape, 3)  # warm-up
        out[name] = alternate(
            functools.partial(_steps, plain, shape, n),
            functools.partial(_steps, sync, shape, n),
            rounds=ROUNDS,
        )
    return out


def run() -> list[dict[str, object]]:
    results = run_distributed(measure, world_size=2, timeout_s=600)[0]
    return [
        {
            "name": f"SyncBatchNorm step / plain BatchNorm step (2 CPU ranks, {name})",
            "value": r["ratio"],
            "target": "<= 1.3",
            "ok": r["ratio"] <= 1.3,
            "detail": f"plain {r['a'] * 1e3:.1f} ms, sync {r['b'] * 1e3:.1f} ms per step "
            f"(median of {ROUNDS})",
        }
        for name, r in results.items()
    ]
