"""What a rank measures for the launcher's figures (:mod:`launcher.perf`), no collective added.

- The time it waits for the other ranks: under DDP a comm hook that does what the reducer does without
  one, timed; under FSDP each unit's all-gathers (of its parameters, in the forward and the backward) and
  reduce-scatters (of its gradients), timed. Under either strategy a slow rank shows as the *others'*
  longer wait, since the collectives make every rank's step equal.
- The FLOPs of one sample, counted once (torch's ``FlopCounterMode`` on the first forward: three times the
  forward's, the backward costing about twice the forward), and the device's peak, for the MFU.

All of it is noted in :mod:`launcher.dist` and leaves in the heartbeat. ``distributed.progress_s: 0`` turns
it off (:func:`enable`): DDP then runs its own built-in all-reduce, and nothing is counted.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from .. import dist

_on = [True]
_peak: list[float | None] = [None]  # distributed.peak_flops


def enable(on: bool, peak: float | None = None) -> None:
    """Whether models wrapped from now on are timed and counted, and the device's peak FLOP/s when the job
    gives it (the rank's spec says, from the job)."""
    _on[0], _peak[0] = on, peak


def watch_ddp(ddp: Any, group: Any) -> None:
    """At the first forward, unless the user registered a comm hook of their own (DDP takes one), time the
    gradient all-reduce; and count the FLOPs of that forward. Registered then, not now, so that a user's
    ``register_comm_hook`` after wrapping still works."""
    if not _on[0]:
        return
    own: list[Any] = []
    register = ddp.register_comm_hook

    def users_hook(state: object, hook: Any) -> None:
        own.append(hook)
        register(state, hook)

    def first_forward(module: nn.Module, args: Any) -> None:
        handle.remove()
        if not own:
            register(group, _timed_allreduce)

    ddp.register_comm_hook = users_hook  # type: ignore[method-assign]
    handle = ddp.register_forward_pre_hook(first_forward)
    _count_flops_once(ddp)


def _timed_allreduce(group: Any, bucket: Any) -> Any:
    """What DDP does without a hook, timed from start to end (:func:`launcher.dist.note_sync`): gradients
    scaled by 1/W as the reducer scales them (the same bits as without a hook), then summed over the ranks."""
    started = time.perf_counter()
    buffer = bucket.buffer()
    buffer.mul_(1.0 / tdist.get_world_size(group))

    def ended(fut: Any) -> Any:
        dist.note_sync(started, time.perf_counter())
        return fut.value()[0]

    return tdist.all_reduce(buffer, group=group, async_op=True).get_future().then(ended)


# DDP checks a hook's annotations against the classes themselves (this module's are strings)
_timed_allreduce.__annotations__.update(bucket=tdist.GradBucket)
_timed_allreduce.__annotations__["return"] = torch.futures.Future[torch.Tensor]


def watch_fsdp(model: nn.Module) -> nn.Module:
    """Time each FSDP unit's all-gathers (forward and backward) and reduce-scatters (its gradients), by
    wrapping the collectives it runs (torch's, or the user's: ``set_custom_all_gather``); and count the FLOPs
    of the first forward."""
    from torch.distributed.fsdp import FSDPModule

    from .. import internals

    if not _on[0]:
        return model
    for module in model.modules():
        if isinstance(module, FSDPModule) and (comms := internals.fsdp_comms(module)) is not None:
            # duck-typed: torch's AllGather and ReduceScatter classes are in a private module
            module.set_custom_all_gather(_Timed(comms[0]))  # type: ignore[arg-type]
            module.set_custom_reduce_scatter(_Timed(comms[1]))  # type: ignore[arg-type]
    _count_flops_once(model)
    return model


class _Timed:
    """An FSDP collective (the interface of ``set_custom_all_gather``: ``allocate`` and a call), run as it
    was and timed when it blocks (:func:`launcher.dist.note_sync`): Gloo's do, until every rank's part is
    in. An async one (``unshard_async_op``) returns its work unwaited and is not timed."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm

    def allocate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.comm.allocate(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        work = self.comm(*args, **kwargs)
        if work is None:
            dist.note_sync(started, time.perf_counter())
        return work


def _count_flops_once(model: nn.Module) -> None:
    """Count the first forward's FLOPs (``FlopCounterMode``, entered before every other pre-forward hook and
    left after every forward hook, errors included) and note them per sample, times three."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)

    def enter(module: nn.Module, args: Any, kwargs: Any) -> None:
        first.remove()
        counter.__enter__()
        samples.append(_batch_size(args, kwargs))

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        last.remove()
        counter.__exit__(None, None, None)
        if samples[0]:
            dist.note_flops(3 * counter.get_total_flops() / samples[0], peak_flops())

    samples: list[int] = []
    first = model.register_forward_pre_hook(enter, prepend=True, with_kwargs=True)
    last = model.register_forward_hook(leave, always_call=True)


def _batch_size(args: Any, kwargs: Any) -> int:
    """The leading dimension of the forward's first tensor argument, in a list or dict too (0: none)."""
    for arg in (*args, *kwargs.values()):
        inner = arg.values() if isinstance(arg, dict) else arg if isinstance(arg, (list, tuple)) else [arg]
        for t in inner:
            if isinstance(t, torch.Tensor) and t.dim():
                return int(t.shape[0])
    return 0


#: Dense bf16 peak FLOP/s of one device, by a part of its name (the vendors' data sheets; SXM parts).
PEAK_BF16 = {"B200": 2250e12, "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10G": 70e12, "V100": 125e12}


def peak_flops() -> float:
    """This rank's device's peak FLOP/s: the job's ``distributed.peak_flops``, else the bf16 dense peak of a
    GPU in :data:`PEAK_BF16`; 0 when not known (CPUs, an unlisted GPU)."""
    if _peak[0]:
        return _peak[0]
    device = dist.get_device()
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in PEAK_BF16.items() if part in name), 0.0)
