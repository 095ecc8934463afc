"""Model wrapping: move to the rank's device, convert BatchNorm to SyncBatchNorm, wrap in DDP or shard with
FSDP2 (:mod:`launcher.fsdp`); and back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import dist
from .rank import figures
from .syncbn import SyncBatchNorm, convert_sync_batchnorm

_BUFFER_SYNC_KWARGS = ("broadcast_buffers", "forward_sync_buffers")


def wrap_model(
    model: nn.Module,
    *,
    sync_batchnorm: bool = True,
    find_unused_parameters: bool = False,
    static_graph: bool = False,
    process_group: Any = None,
    **ddp_kwargs: Any,
) -> nn.Module:
    """Prepare ``model`` for this rank: device, synchronized BatchNorm, DDP (when more than one rank).

    Works on CPU/Gloo as well as CUDA/NCCL. With one rank (or no process group) the model is only moved, so
    the same code runs undistributed. Use :func:`unwrap` to reach the plain module for saving.

    When every buffer of the model belongs to a :class:`SyncBatchNorm` over DDP's process group, DDP's
    broadcast of buffers from rank 0 before each forward is turned off: those running statistics come out the
    same on every rank by construction, and the broadcast cost a 2-rank CPU step of a small CNN about a tenth
    of its time. Buffers are still synchronized once, when DDP is built. Pass ``broadcast_buffers`` or
    ``forward_sync_buffers`` to decide yourself.
    """
    device = dist.get_device()
    model = model.to(device)
    if dist.get_world_size() == 1:
        return model
    if sync_batchnorm:
        model = convert_sync_batchnorm(model, process_group)
    ddp = DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
        static_graph=static_graph,
        process_group=process_group,
        **ddp_kwargs,
    )
    if not any(k in ddp_kwargs for k in _BUFFER_SYNC_KWARGS) and _buffers_all_synced(model, process_group):
        ddp.broadcast_buffers = False  # set after construction: the initial sync has run (any torch version)
    figures.watch_ddp(ddp, process_group)  # the launcher's figures: all-reduce wait, FLOPs
    return ddp


def _buffers_all_synced(model: nn.Module, group: Any) -> bool:
    """True when the model has buffers and each belongs to a SyncBatchNorm over DDP's whole group.

    Those are equal on all of DDP's ranks by construction; one synchronized over another group is not.
    """
    synced = {id(b) for m in model.modules() if isinstance(m, SyncBatchNorm) and m.process_group is group
              for b in m.buffers(recurse=False)}
    buffers = [id(b) for b in model.buffers()]
    return bool(buffers) and all(b in synced for b in buffers)


def wrap_for_job(model: nn.Module, job: Any) -> nn.Module:
    """:func:`wrap_model` with the options of ``job.distributed``; with ``strategy: fsdp``, the model is
    sharded instead (:func:`launcher.fsdp.shard`; a model built on the meta device is materialized)."""
    d = job.distributed
    if d.strategy == "fsdp":
        from . import fsdp

        return figures.watch_fsdp(fsdp.shard(model, d.fsdp, sync_batchnorm=d.sync_batchnorm))
    return wrap_model(
        model,
        sync_batchnorm=d.sync_batchnorm,
        find_unused_parameters=d.find_unused_parameters,
        static_graph=d.static_graph,
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (or the model itself: FSDP2 shards a module in place; its
    ``state_dict()`` holds this rank's shards, :func:`launcher.full_state_dict` the whole)."""
    return model.module if isinstance(model, DDP) else model


@contextlib.contextmanager
def accumulate(model: nn.Module, sync: bool) -> Iterator[None]:
    """Gradient accumulation: ``with accumulate(model, sync=is_last_micro_batch): loss.backward()``.

    Skips DDP's gradient all-reduce (``no_sync``), or FSDP's reduce-scatter, on all but the last
    micro-batch of an optimizer step.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, DDP) and not sync:
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule) and not sync:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield
