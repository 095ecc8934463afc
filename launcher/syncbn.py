"""Synchronized BatchNorm on every device, CPU/Gloo included.

``torch.nn.SyncBatchNorm`` refuses CPU (DDP raises ``SyncBatchNorm layers only work with GPU modules`` and its
kernels are CUDA-only; pytorch PR 78078, which would have fixed it, was closed unmerged). This module computes
the statistics itself with plain tensor ops and collectives, so it runs wherever the process group does:

* forward: each rank computes (count, mean, M2) of its part in two vectorized passes (a sum, then the sum of
  squares of ``x - mean``); one ``all_gather`` of ``1 + 2C`` numbers and a Chan et al. merge give the global
  mean and variance (stable, and exact with zero samples on a rank); torch's inference kernel then normalizes
  with them;
* backward: the two per-channel reductions ``sum(dy)`` and ``sum(dy * (x - mean))`` (one pass) are gathered
  once and summed; the input gradient is then exactly BatchNorm's over the concatenated global batch. Weight
  and bias gradients stay local sums, which DDP averages like every other parameter gradient.

On CPU this takes less time than torch's own BatchNorm kernels (whose statistics pass alone is 5 times
slower); what a step pays on top is the two small collectives per layer.

On CUDA the same layer calls torch's fused kernels (the autograd function behind ``torch.nn.SyncBatchNorm``),
which ``make gpu-check`` measured faster than the code here on a GPU (syncbn-speed); both compute the same
statistics, so the module, its ``state_dict`` and its checkpoints are the same on either device.

Eval mode, a single rank and no process group use ``F.batch_norm`` unchanged. The class deliberately does not
subclass ``torch.nn.SyncBatchNorm`` (DDP rejects that class on CPU); it has the same constructor and
``state_dict`` keys as ``torch.nn.BatchNorm*d``, so checkpoints move freely between the two.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from . import internals
from .dist import note_sync

_BatchNorm: Any = internals.batchnorm_base()

_HALF = (torch.float16, torch.bfloat16)


def _dims(x: torch.Tensor) -> list[int]:
    """Every dimension but the channel one (what BatchNorm reduces over)."""
    return [0, *range(2, x.dim())]


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))


# Newer torch renamed all_gather_into_tensor to all_gather_single (the old name warns on every call); older
# releases have only the old one.
_all_gather_flat: Any = getattr(tdist, "all_gather_single", None) or tdist.all_gather_into_tensor


class _Gather:
    """Every rank's ``t`` as rows of one tensor, gathered in the background until :meth:`wait`.

    (Gloo answers a small all_gather in about half the time of an all_reduce, which runs more rounds; the sum
    over ranks is then a local op.)
    """

    def __init__(self, t: torch.Tensor, world: int, group: Any) -> None:
        self.started = time.perf_counter()
        self.out = t.new_empty(world * t.numel())
        work = _all_gather_flat(self.out, t, group=group, async_op=True)
        assert work is not None  # async_op=True always returns a handle
        self.work = work
        self.world = world

    def wait(self) -> torch.Tensor:
        self.work.wait()
        note_sync(self.started, time.perf_counter())  # a slower peer shows as this rank's wait (straggler)
        return self.out.view(self.world, -1)


def _channel_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel ``sum(a)`` and ``sum(a * b)`` in one vectorized pass (torch's BatchNorm-backward reduction
    kernel, with mean 0 and invstd 1). On CPU, ``batch_norm_update_stats`` took 5 times as long for the
    statistics (sum, subtraction and this pass together), ``var_mean`` over dims (0, 2, ...) 20 times."""
    if a.device.type != "cpu":  # (CUDA's kernel needs a weight; there torch's fused kernels run anyway)
        return a.sum(_dims(a)), (a * b).sum(_dims(a))
    c = a.shape[1]
    _, sum_ab, sum_a = torch.ops.aten.native_batch_norm_backward(
        a, b, None, None, None, b.new_zeros(c), b.new_ones(c), True, 0.0, [False, True, True]
    )
    return sum_a, sum_ab


class _SyncBatchNormFn(torch.autograd.Function):
    # Few passes over the activations (they dominate on CPU): forward = sum, x - local mean, sum of squares,
    # output; backward = both reductions in one pass, then three elementwise passes. ``x - local mean`` is
    # kept for backward (it replaces x, so no extra memory), and the global mean enters as a per-channel
    # offset ``delta`` (a few global standard deviations at most: errors stayed at 3e-7 in float32 with two
    # ranks' means 60 local standard deviations apart, the same as with x - global mean).

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        group: Any,
        world: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        half = x.dtype in _HALF
        xc = x.float() if half else x
        c = x.shape[1]
        n = x.numel() // c if c else 0
        if n > 0:
            mean_l = xc.sum(_dims(xc)) / n
            xmu = xc - _bcast(mean_l, xc)
            m2_l = _channel_sums(xmu, xmu)[1]
        else:
            mean_l = xc.new_zeros(c)
            m2_l = xc.new_zeros(c)
            xmu = xc
        packed = torch.cat([xc.new_full((1,), float(n)), mean_l, m2_l])
        stats = _Gather(packed, world, group).wait()
        counts, means, m2s = stats[:, :1], stats[:, 1 : 1 + c], stats[:, 1 + c :]
        total = counts.sum()
        if total.item() <= 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, "
                f"got {int(total.item())} over all ranks"
            )
        mean = (counts * means).sum(0) / total
        var = (m2s.sum(0) + (counts * (means - mean).square()).sum(0)) / total
        # The output pass is torch's own inference kernel with the global statistics (a vectorized per-channel
        # scale and shift; a broadcast addcmul took 5 times as long).
        y = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)
        # Half input: keep x (half the memory of a float32 x - mean) and recompute in backward.
        ctx.save_for_backward(x if half else xmu, weight, mean_l, mean - mean_l, torch.rsqrt(var + eps))
        ctx.half, ctx.total = half, total
        ctx.group, ctx.world = group, world
        unbiased_var = var * (total / (total - 1))
        ctx.mark_non_differentiable(mean, unbiased_var)
        return y, mean, unbiased_var

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_y: torch.Tensor, _gm: Any, _gv: Any
    ) -> tuple[Any, ...]:
        saved, weight, mean_l, delta, invstd = ctx.saved_tensors
        g = grad_y.float() if ctx.half else grad_y
        if saved.numel() > 0:
            xmu = saved.float() - _bcast(mean_l, saved) if ctx.half else saved  # x - local mean
            sum_dy, sum_dy_xmu_l = _channel_sums(g, xmu)
            sum_dy_xmu = sum_dy_xmu_l - delta * sum_dy  # sum(dy * (x - global mean))
        else:
            xmu = saved
            sum_dy = invstd.new_zeros(invstd.shape)
            sum_dy_xmu = invstd.new_zeros(invstd.shape)
        grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if weight is not None else None
        grad_bias = sum_dy.to(weight.dtype) if weight is not None else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            gathering = _Gather(torch.cat([sum_dy, sum_dy_xmu]), ctx.world, ctx.group)
            # grad_x = scale * (dy - mean(dy)) - k * (x - global mean), k = scale * invstd^2 * mean(dy * (x -
            # global mean)), means over all ranks. dy * scale runs while the gather is in flight.
            scale = invstd * weight.to(invstd.dtype) if weight is not None else invstd
            grad_x = g * _bcast(scale, g)
            both = gathering.wait().sum(0) / ctx.total
            c = sum_dy.numel()
            k = scale * invstd.square() * both[c:]
            grad_x.add_(_bcast(k * delta - scale * both[:c], g)).addcmul_(xmu, _bcast(-k, g))
            grad_x = grad_x.to(grad_y.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None


@functools.cache
def _torch_fused() -> Any:
    """torch's fused SyncBatchNorm function, with one change: a rank whose part of the batch is empty gets
    zero weight and bias gradients instead of None (torch's, which leaves DDP waiting for them)."""
    fused = internals.fused_sync_batchnorm()

    class _Fused(fused):  # type: ignore[misc, valid-type]
        @staticmethod
        def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
            grads = list(fused.backward(ctx, grad_output))
            saved_input, weight = ctx.saved_tensors[:2]
            for i, like in ((0, saved_input), (1, weight), (2, weight)):
                if grads[i] is None and ctx.needs_input_grad[i] and like is not None:
                    grads[i] = torch.zeros_like(like)
            return tuple(grads)

    return _Fused


def uses_torch_kernels(device: torch.device) -> bool:
    """Whether a training step on ``device`` goes to torch's fused SyncBatchNorm kernels (CUDA) rather than
    the plain-op implementation above (CPU and everything else)."""
    return device.type == "cuda"


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over the global batch of a process group, on CPU and GPU alike (2-D to 5-D input)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group
        #: The BatchNorm class this layer replaced (used by :func:`revert_sync_batchnorm`).
        self.original_cls: type[_BatchNorm] | None = None

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if not 2 <= input.dim() <= 5:
            raise ValueError(f"expected 2D to 5D input (got {input.dim()}D input)")

    def _group_size(self) -> int:
        if not (tdist.is_available() and tdist.is_initialized()):
            return 1
        return tdist.get_world_size(self.process_group)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        world = self._group_size()
        if not (self.training and bn_training and world > 1):
            return super().forward(input)  # plain BatchNorm: eval, one rank, no process group
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        group = self.process_group or tdist.group.WORLD
        if uses_torch_kernels(input.device):
            track = self.track_running_stats
            mean, var = (self.running_mean, self.running_var) if track else (None, None)
            if mean is None and input.dtype in _HALF:
                # torch's kernel takes the counts in the running statistics' dtype, else in the input's, and
                # rejects float counts with half input: throwaway float32 statistics (momentum 0) avoid that.
                mean, var = (input.new_zeros(input.shape[1], dtype=torch.float32),
                             input.new_ones(input.shape[1], dtype=torch.float32))
                factor = 0.0
            fused = _torch_fused()
            return fused.apply(input, self.weight, self.bias, mean, var, self.eps, factor, group, world)
        y, mean, var = _SyncBatchNormFn.apply(
            input, self.weight, self.bias, self.eps, group, world
        )
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(var.to(self.running_var.dtype), factor)
        return y


class _AnyDimBatchNorm(_BatchNorm):
    """Plain BatchNorm for 2-D to 5-D input: what a SyncBatchNorm of unknown origin reverts to."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if not 2 <= input.dim() <= 5:
            raise ValueError(f"expected 2D to 5D input (got {input.dim()}D input)")


def _copy_bn(src: _BatchNorm, dst: _BatchNorm) -> _BatchNorm:
    if src.affine:
        with torch.no_grad():
            dst.weight = src.weight
            dst.bias = src.bias
    dst.running_mean = src.running_mean
    dst.running_var = src.running_var
    dst.num_batches_tracked = src.num_batches_tracked
    dst.training = src.training
    if hasattr(src, "qconfig"):
        dst.qconfig = src.qconfig
    return dst


def _replace(module: nn.Module, fn: Any) -> nn.Module:
    out = fn(module)
    if out is not None:
        return out
    for name, child in module.named_children():
        new = _replace(child, fn)
        if new is not child:
            module.add_module(name, new)
    return module


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d (and torch's SyncBatchNorm) in ``module`` by :class:`SyncBatchNorm`.

    Parameters (with ``requires_grad``), buffers and train/eval mode are kept; returns the converted module.
    """

    def convert(m: nn.Module) -> nn.Module | None:
        if isinstance(m, _BatchNorm) and not isinstance(m, SyncBatchNorm):
            new = SyncBatchNorm(
                m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, process_group
            )
            new.original_cls = None if isinstance(m, (nn.SyncBatchNorm, _AnyDimBatchNorm)) else type(m)
            return _copy_bn(m, new)
        return None

    return _replace(module, convert)


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every :class:`SyncBatchNorm` (ours or torch's) back into plain BatchNorm, e.g. for export."""

    def revert(m: nn.Module) -> nn.Module | None:
        if isinstance(m, (SyncBatchNorm, nn.SyncBatchNorm)):
            cls = getattr(m, "original_cls", None) or _AnyDimBatchNorm
            new = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            return _copy_bn(m, new)
        return None

    return _replace(module, revert)
