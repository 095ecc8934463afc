"""launcher.SyncBatchNorm equals BatchNorm over the concatenated global batch, on CPU/Gloo ranks."""

import copy
import inspect
import itertools

import pytest
import torch
import torch.distributed as tdist
from torch import nn

import launcher
from launcher import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm
from launcher.testing import run_distributed

REF = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
SPATIAL = {2: (), 3: (5,), 4: (3, 4), 5: (2, 3, 2)}


def cases(world):
    sizes = {2: [(4, 4), (3, 5), (0, 6)], 3: [(2, 3, 4), (2, 0, 5), (1, 1, 0)]}[world]
    for i, (dim, affine, track, momentum, dtype, split) in enumerate(
        itertools.product(
            [2, 3, 4, 5], [True, False], [True, False], [0.1, None], ["float64", "float32"], sizes
        )
    ):
        yield {"seed": i, "dim": dim, "affine": affine, "track": track, "momentum": momentum, "dtype": dtype,
               "split": split}


def compare_cases(world, device="cpu"):
    """On every rank: run each case on its slice; return the largest error per dtype (``device="cuda"``:
    the GPU check, tests/gpu.py)."""
    rank = launcher.get_rank()
    worst = {"float64": 0.0, "float32": 0.0}
    for case in cases(world):
        dtype = getattr(torch, case["dtype"])
        c = 3
        torch.manual_seed(case["seed"])
        ref = REF[case["dim"]](c, momentum=case["momentum"], affine=case["affine"],
                               track_running_stats=case["track"]).to(device, dtype)
        if case["affine"]:
            with torch.no_grad():
                ref.weight.uniform_(0.5, 1.5)
                ref.bias.uniform_(-0.5, 0.5)
        sync = convert_sync_batchnorm(copy.deepcopy(ref))
        assert isinstance(sync, SyncBatchNorm)
        split = case["split"]
        lo, hi = sum(split[:rank]), sum(split[: rank + 1])
        for _ in range(2):  # two steps: running statistics accumulate (momentum None = cumulative average)
            x = (torch.randn(sum(split), c, *SPATIAL[case["dim"]], dtype=dtype) * 3 + 1).to(device)
            r = torch.randn_like(x)
            xr = x.clone().requires_grad_()
            yr = ref(xr)
            (yr * r).sum().backward()
            xs = x[lo:hi].clone().requires_grad_()
            ys = sync(xs)
            (ys * r[lo:hi]).sum().backward()
            errs = [(ys - yr[lo:hi]).abs().max() if hi > lo else torch.tensor(0.0, device=device),
                    (xs.grad - xr.grad[lo:hi]).abs().max() if hi > lo else torch.tensor(0.0, device=device)]
            if case["affine"]:
                for p, q in ((sync.weight, ref.weight), (sync.bias, ref.bias)):
                    g = p.grad.clone()
                    tdist.all_reduce(g)  # weight/bias gradients are local sums, as DDP expects
                    errs.append((g - q.grad).abs().max())
                    p.grad = None
                    q.grad = None
            if case["track"]:
                errs += [(sync.running_mean - ref.running_mean).abs().max(),
                         (sync.running_var - ref.running_var).abs().max()]
                assert int(sync.num_batches_tracked) == int(ref.num_batches_tracked)
            worst[case["dtype"]] = max(worst[case["dtype"]], max(float(e.detach()) for e in errs))
    return worst


@pytest.mark.parametrize("world", [2, 3])
def test_matches_batchnorm_on_the_global_batch(world):
    out = run_distributed(compare_cases, world, world_size=world)
    for rank, worst in out.items():
        assert worst["float64"] < 1e-10, (rank, worst)
        assert worst["float32"] < 1e-5, (rank, worst)


def half_precision_errors(device="cpu"):
    """bfloat16/float16 input (as under autocast): the output and input gradient keep the dtype and match
    float32 BatchNorm on the global batch to within the half type's precision (statistics are computed in
    float32). channels_last input matches too."""
    rank = launcher.get_rank()
    torch.manual_seed(0)
    x, r = (torch.randn(8, 3, 4, 4) * 3 + 1).to(device), torch.randn(8, 3, 4, 4).to(device)
    ref = nn.BatchNorm2d(3).to(device)
    xr = x.clone().requires_grad_()
    yr = ref(xr)
    (yr * r).sum().backward()
    part = slice(4 * rank, 4 * rank + 4)
    out = {}
    for dtype in (torch.bfloat16, torch.float16):
        xs = x[part].to(dtype).requires_grad_()
        ys = SyncBatchNorm(3).to(device)(xs)
        (ys.float() * r[part]).sum().backward()
        out[str(dtype)] = (ys.dtype == dtype and xs.grad.dtype == dtype,
                           float((ys.detach().float() - yr[part]).abs().max() / yr.abs().max()),
                           float((xs.grad.float() - xr.grad[part]).abs().max() / xr.grad.abs().max()))
    # channels_last input and gradient (float32): the same numbers as contiguous ones
    xs = x[part].contiguous(memory_format=torch.channels_last).requires_grad_()
    ys = SyncBatchNorm(3).to(device)(xs)
    (ys * r[part].contiguous(memory_format=torch.channels_last)).sum().backward()
    out["channels_last"] = (True, float((ys.detach() - yr[part]).abs().max() / yr.abs().max()),
                            float((xs.grad - xr.grad[part]).abs().max() / xr.grad.abs().max()))
    return out


#: Largest relative error of half-precision input (and channels_last) against float32 BatchNorm.
HALF_TOLERANCE = (("torch.bfloat16", 2 ** -7), ("torch.float16", 2 ** -10), ("channels_last", 1e-6))


def test_half_precision_and_channels_last_input():
    for rank, out in run_distributed(half_precision_errors, world_size=2).items():
        for dtype, tol in HALF_TOLERANCE:
            kept, err_y, err_grad = out[dtype]
            assert kept and err_y < tol and err_grad < tol, (rank, dtype, out[dtype])


def make_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4),
    ).double()


def batches(steps, n):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g))
        for _ in range(steps)
    ]


def train(model, data, rank=0, world=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in data:
        b = len(x) // world
        loss = nn.functional.cross_entropy(model(x[rank * b:(rank + 1) * b]), y[rank * b:(rank + 1) * b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in launcher.unwrap(model).state_dict().items()}


def ddp_train():
    model = launcher.wrap_model(make_cnn())
    assert isinstance(model, nn.parallel.DistributedDataParallel)
    assert any(isinstance(m, SyncBatchNorm) for m in model.modules())
    return train(model, batches(3, 8), launcher.get_rank(), launcher.get_world_size())


def test_ddp_training_with_sync_bn_equals_one_process_on_the_full_batch():
    single = train(make_cnn(), batches(3, 8))
    out = run_distributed(ddp_train, world_size=2)
    for rank in range(2):
        for k, v in single.items():
            assert torch.allclose(out[rank][k].double(), v.double(), atol=1e-10), (rank, k)


class WithOwnBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = make_cnn()
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x):
        return self.net(x)


# torch 2.14 renamed DDP's broadcast_buffers to forward_sync_buffers (the old one warns); 2.11 has the old.
_BUFFER_SYNC_KWARG = ("forward_sync_buffers" if "forward_sync_buffers" in
                      inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
                      else "broadcast_buffers")


def buffer_sync_choices():
    return {
        "sync_bn_only": launcher.wrap_model(make_cnn()).broadcast_buffers,
        "own_buffer": launcher.wrap_model(WithOwnBuffer()).broadcast_buffers,
        "plain_bn": launcher.wrap_model(make_cnn(), sync_batchnorm=False).broadcast_buffers,
        "asked_for": launcher.wrap_model(make_cnn(), **{_BUFFER_SYNC_KWARG: True}).broadcast_buffers,
        # synchronized over another group than DDP's: not known to be equal on all of DDP's ranks
        "other_group": launcher.wrap_model(convert_sync_batchnorm(make_cnn(), tdist.new_group([0, 1])))
        .broadcast_buffers,
    }


def test_buffers_are_broadcast_before_forward_only_where_they_can_differ():
    # SyncBatchNorm's running statistics are equal on every rank (the training test above compares them with
    # one process), so DDP's per-forward broadcast is skipped for them; any other buffer keeps it.
    out = run_distributed(buffer_sync_choices, world_size=2)
    assert out[0] == {"sync_bn_only": False, "own_buffer": True, "plain_bn": True, "asked_for": True,
                      "other_group": True}


def resnet_step():
    import torchvision

    model = launcher.wrap_model(torchvision.models.resnet18(num_classes=5))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    n_sync = sum(isinstance(m, SyncBatchNorm) for m in model.modules())
    return float(loss), n_sync


def test_torchvision_resnet18_converts_and_trains_a_step():
    out = run_distributed(resnet_step, world_size=2)
    assert out[0][1] == 20 and all(torch.isfinite(torch.tensor(v[0])) for v in out.values())


def test_convert_revert_round_trip_keeps_everything():
    model = make_cnn()
    model[1].weight.requires_grad_(False)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    synced = convert_sync_batchnorm(model)
    assert sum(isinstance(m, SyncBatchNorm) for m in synced.modules()) == 2
    assert not synced[1].weight.requires_grad and not synced.training
    assert synced.state_dict().keys() == before.keys()
    reverted = revert_sync_batchnorm(synced)
    assert type(reverted[1]) is nn.BatchNorm2d and type(reverted[6]) is nn.BatchNorm1d
    for k, v in reverted.state_dict().items():
        assert torch.equal(v, before[k])
    # checkpoints of either load into the other
    fresh = convert_sync_batchnorm(make_cnn())
    fresh.load_state_dict(before)
    make_cnn().load_state_dict(fresh.state_dict())


def test_single_process_and_eval_behave_like_batchnorm():
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(4)
    sync = convert_sync_batchnorm(copy.deepcopy(ref))
    x = torch.randn(6, 4, 3, 3)
    assert torch.equal(sync(x), ref(x))
    sync.eval()
    ref.eval()
    assert torch.equal(sync(x), ref(x))
    with pytest.raises(ValueError, match="2D to 5D"):
        SyncBatchNorm(4)(torch.randn(4))


def test_cuda_input_goes_to_torch_fused_kernels_with_the_layer_state(monkeypatch):
    """On CUDA the layer calls torch's fused SyncBatchNorm function (measured faster there by make gpu-check)
    with its own running buffers and momentum; CPU keeps the plain-op implementation. The CUDA numbers are
    checked by tests/gpu.py (syncbn-cuda); here the choice and the arguments are."""
    from launcher import syncbn

    assert syncbn.uses_torch_kernels(torch.device("cuda", 1))
    assert not syncbn.uses_torch_kernels(torch.device("cpu"))
    calls = []

    class Fused:
        @staticmethod
        def apply(x, weight, bias, running_mean, running_var, eps, momentum, group, world):
            calls.append((running_mean, running_var, eps, momentum, group, world))
            return x * 2

    monkeypatch.setattr(syncbn, "uses_torch_kernels", lambda device: True)
    monkeypatch.setattr(syncbn, "_torch_fused", lambda: Fused)
    monkeypatch.setattr(SyncBatchNorm, "_group_size", lambda self: 4)
    for momentum, track, factors in ((0.3, True, [0.3, 0.3]), (None, True, [1.0, 0.5]), (0.1, False, [0.1])):
        calls.clear()
        bn = SyncBatchNorm(3, eps=1e-3, momentum=momentum, track_running_stats=track, process_group="g")
        x = torch.randn(4, 3, 2)
        for _ in factors:
            assert torch.equal(bn(x), x * 2)
        assert [c[3] for c in calls] == factors
        for running_mean, running_var, eps, _, group, world in calls:
            assert (running_mean is bn.running_mean and running_var is bn.running_var) if track else (
                running_mean is None and running_var is None)
            assert (eps, group, world) == (1e-3, "g", 4)
    bn.eval()
    assert not torch.equal(bn(x), x * 2)  # eval: plain BatchNorm, no synchronization
