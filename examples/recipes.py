"""Training practices the examples use, each small and unit-tested (tests/test_recipes.py)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

import launcher


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weights only: biases and normalization parameters (all 1-D tensors) get none."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """LR multiplier: linear warm-up from 1/warmup to 1 over ``warmup`` steps, then cosine to ``floor``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def mixup(
    x: torch.Tensor, y: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Mixup (Zhang et al. 2018): ``(mixed x, y, y of the partner, lambda)``; alpha 0 returns the batch as is.

    Uses torch's global RNG, which checkpoints save and restore, so a resumed run mixes identically.
    """
    if alpha <= 0:
        return x, y, y, 1.0
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.shape[0], device=x.device)
    return lam * x + (1 - lam) * x[perm], y, y[perm], lam


def mixed_loss(
    logits: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor, lam: float, smoothing: float
) -> torch.Tensor:
    """Cross-entropy with label smoothing, mixed between the two targets of a mixup batch."""
    ce = nn.functional.cross_entropy
    return lam * ce(logits, ya, label_smoothing=smoothing) + (1 - lam) * ce(
        logits, yb, label_smoothing=smoothing
    )


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``C[i, j]``: samples of class i predicted as j."""
    idx = target.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def classification_report(conf: torch.Tensor) -> dict[str, Any]:
    """*Collective*: sums every rank's confusion matrix, then accuracy and per-class precision/recall."""
    total = launcher.dist.all_reduce_sum(conf.to(launcher.get_device(), torch.float64)).cpu()
    tp = total.diag()
    predicted, actual = total.sum(0), total.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    return {
        "accuracy": float(tp.sum() / total.sum().clamp(min=1)),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "samples": int(total.sum()),
    }
