"""Training-practice helpers of the examples, with known answers."""

import math

import pytest
import torch
from torch import nn

from examples import recipes
from launcher.testing import run_distributed


def test_param_groups_exclude_biases_and_norms_from_weight_decay():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decay, no_decay = recipes.param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert len(no_decay["params"]) == 4  # conv bias, BN weight, BN bias, linear bias


def test_warmup_cosine_schedule():
    assert recipes.warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert recipes.warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert recipes.warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert recipes.warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert recipes.warmup_cosine(100, 10, 100) == pytest.approx(0.0, abs=1e-12)
    assert recipes.warmup_cosine(100, 0, 100, floor=0.1) == pytest.approx(0.1)


def test_mixup_and_label_smoothing():
    x, y = torch.arange(8.0).reshape(4, 2), torch.tensor([0, 1, 2, 3])
    assert recipes.mixup(x, y, 0.0) == (x, y, y, 1.0)
    torch.manual_seed(0)
    mx, ya, yb, lam = recipes.mixup(x, y, 0.4)
    assert 0 <= lam <= 1 and torch.equal(ya, y) and sorted(yb.tolist()) == [0, 1, 2, 3]
    perm = [y.tolist().index(v) for v in yb.tolist()]
    assert torch.allclose(mx, lam * x + (1 - lam) * x[perm])
    logits = torch.tensor([[2.0, 0.0]])
    # smoothing 0.2 over 2 classes: target (0.9, 0.1)
    expected = -(0.9 * torch.log_softmax(logits, 1)[0, 0] + 0.1 * torch.log_softmax(logits, 1)[0, 1])
    got = recipes.mixed_loss(logits, torch.tensor([0]), torch.tensor([0]), 1.0, 0.2)
    assert got.item() == pytest.approx(expected.item())


def test_confusion_and_report_single_process():
    conf = recipes.confusion(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 3)
    assert conf.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    rep = recipes.classification_report(conf)
    assert rep["accuracy"] == 0.75 and rep["samples"] == 4
    assert rep["precision"] == [1.0, 0.5, 1.0] and rep["recall"] == [1.0, 1.0, 0.5]


def report_over_ranks():
    import launcher

    if launcher.get_rank() == 0:
        conf = recipes.confusion(torch.tensor([0, 1]), torch.tensor([0, 1]), 2)
    else:
        conf = recipes.confusion(torch.tensor([1, 1]), torch.tensor([0, 1]), 2)
    return recipes.classification_report(conf)


def test_report_is_gathered_over_ranks():
    out = run_distributed(report_over_ranks, world_size=2)
    assert out[0] == out[1]
    assert (
        out[0]["accuracy"] == 0.75 and out[0]["precision"] == [1.0, 2 / 3] and out[0]["recall"] == [0.5, 1.0]
    )
    assert not math.isnan(out[0]["accuracy"])
