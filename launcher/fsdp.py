"""FSDP2 (torch's ``fully_shard``): shard a model over the ranks, and materialize a model built on the meta
device shard by shard. Runs in a rank; :func:`check` also runs on the launching side, before anything starts.

Every option is torch's; this module adds what torch leaves to the caller: an explicit device mesh (torch's
default follows the machine's accelerator, not the job's backend: a Gloo job on a GPU host got a CUDA mesh),
rank 0's weights on every rank (as DDP broadcasts them), and refusals of combinations that fail later and
far from their cause.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import dist
from .typed import ConfigError


def check(cfg: Any, backend: str, cuda: bool, source: str = "") -> None:
    """Refuse the settings of ``distributed.fsdp`` that cannot work with ``backend`` on this machine (no
    combination depends on the backend today: a divide factor on Gloo is made to work, see :func:`shard`)."""
    where = f"{source}: " if source else ""
    if cfg.cpu_offload and cfg.offload_pin_memory and not cuda:
        raise ConfigError(
            f"{where}distributed.fsdp.offload_pin_memory: pinned memory needs CUDA, and this machine has none"
            "\nHINT: distributed.fsdp.offload_pin_memory=false, or distributed.fsdp.cpu_offload=false (on a "
            "CPU job the parameters are in host memory already)")


def mesh() -> Any:
    """A 1-D mesh over every rank, of this rank's device type (``cuda`` with NCCL, ``cpu`` with Gloo)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(dist.get_device().type, (dist.get_world_size(),))


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def shard(model: nn.Module, cfg: Any, *, sync_batchnorm: bool = True) -> nn.Module:
    """``fully_shard`` each shard unit of ``model`` then the model itself, with ``cfg``'s policies.

    Shard units are the modules whose class name is in ``cfg.shard_classes``; without any, each child of the
    root that holds parameters. A model built on the meta device is materialized shard by shard (see
    :func:`materialize`); any other model gets rank 0's weights first, so the run starts where a DDP run
    starts. Not distributed: the model is only moved (and materialized).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    device = dist.get_device()
    on_meta = any(t.is_meta for t in _tensors(model))
    if not dist.is_initialized():
        if on_meta:
            model.to_empty(device=device)
            _reset_each(model, device, lambda full, _orig: full)
        return model.to(device)
    check(cfg, _backend(), torch.cuda.is_available())
    if not on_meta:
        model.to(device)
        _broadcast_from_rank0(model)
    if sync_batchnorm:
        from .syncbn import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    names = set(cfg.shard_classes)
    units = [m for m in model.modules() if type(m).__name__ in names] if names else [
        c for c in model.children() if any(True for _ in c.parameters())]
    missing = names - {type(m).__name__ for m in model.modules()}
    if missing:
        raise ConfigError(f"distributed.fsdp.shard_classes: no module of the model is a {sorted(missing)}; "
                          f"its classes are {sorted({type(m).__name__ for m in model.modules()})}\n"
                          "HINT: name the class of the repeated block (a transformer layer), or leave the "
                          "list empty")
    kwargs: dict[str, Any] = {
        "mesh": mesh(),
        "reshard_after_forward": cfg.reshard_after_forward,
        "mp_policy": MixedPrecisionPolicy(param_dtype=_dtype(cfg.param_dtype),
                                          reduce_dtype=_dtype(cfg.reduce_dtype)),
        "offload_policy": CPUOffloadPolicy(pin_memory=cfg.offload_pin_memory) if cfg.cpu_offload
        else OffloadPolicy(),
    }
    for unit in units:
        if unit is not model:
            fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    if cfg.gradient_divide_factor is not None:
        gloo = _backend() == "gloo"
        for m in model.modules():  # torch sets each unit's own factor (not its submodules')
            if is_fsdp(m):
                m.set_gradient_divide_factor(cfg.gradient_divide_factor)  # type: ignore[operator]
                # a factor other than the world size reduces with PREMUL_SUM, which Gloo lacks (the first
                # backward failed): sum, and divide apart
                m.set_force_sum_reduction_for_comms(gloo)  # type: ignore[operator]
    if on_meta:
        materialize(model, device)
    return model


def _backend() -> str:
    import torch.distributed as tdist

    return str(tdist.get_backend())


def _tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()


def _broadcast_from_rank0(model: nn.Module) -> None:
    import torch.distributed as tdist

    with torch.no_grad():
        for t in _tensors(model):
            tdist.broadcast(t, src=0)


def materialize(model: nn.Module, device: torch.device) -> None:
    """*Collective.* Give a sharded model built on the meta device its initial weights, module by module.

    Each module's ``reset_parameters`` runs on full-size tensors of that module alone, drawn from rank 0's
    random generator (the global one is left as it was), and each rank keeps its shard: the weights are the
    ones the same model built on the CPU after the same seed would have, whatever the world size, and a
    rank's memory holds its shards plus one module at full size.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    model.to_empty(device=device)
    state = dist.broadcast_object(torch.get_rng_state())

    def keep_shard(full: torch.Tensor, orig: torch.Tensor) -> torch.Tensor:
        if isinstance(orig, DTensor):
            return distribute_tensor(full, orig.device_mesh, orig.placements, src_data_rank=None).to_local()
        return full

    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(state)
        _reset_each(model, device, keep_shard)


def _reset_each(model: nn.Module, device: torch.device, keep: Any) -> None:
    """Run every module's ``reset_parameters`` on full-size tensors, in the order of ``model.modules()``, and
    copy ``keep(full, original)`` into each original tensor."""
    from torch.distributed.tensor import DTensor

    missing = [f"{name or 'the model'} ({type(m).__name__})" for name, m in model.named_modules()
               if _direct(m) and not callable(getattr(m, "reset_parameters", None))]
    if missing:
        raise ConfigError(
            "a model built on the meta device needs reset_parameters() on every module that holds "
            f"parameters or buffers; these have none: {', '.join(missing[:5])}\nHINT: give them a "
            "reset_parameters() that initializes their tensors, or build the model on the CPU")
    with torch.no_grad():
        for m in model.modules():
            direct = _direct(m)
            if not direct:
                continue
            full = {name: torch.empty(t.shape, dtype=t.dtype, device=device) for name, t, _ in direct}
            for name, _t, is_param in direct:  # setattr replaces a registered parameter or buffer
                setattr(m, name, nn.Parameter(full[name]) if is_param else full[name])
            try:
                m.reset_parameters()  # type: ignore[operator]
            finally:
                for name, t, _ in direct:
                    setattr(m, name, t)
            for name, t, _ in direct:
                target = t.to_local() if isinstance(t, DTensor) else t
                target.copy_(keep(full[name], t))


def _direct(m: nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    """``(name, tensor, is_parameter)`` of the module's own parameters and buffers (not its children's)."""
    return [(n, t, True) for n, t in m.named_parameters(recurse=False)] + \
        [(n, t, False) for n, t in m.named_buffers(recurse=False)]


def is_fsdp(model: nn.Module) -> bool:
    """True for a model sharded by ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """*Collective under FSDP.* The model's whole state_dict on the CPU, plain tensors, on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if is_fsdp(model):
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    else:
        from .wrap import unwrap

        sd = unwrap(model).state_dict()
    return {k: v.detach().cpu() for k, v in sd.items() if isinstance(v, torch.Tensor)}
