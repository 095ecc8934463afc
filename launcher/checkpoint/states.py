"""The state_dicts of a checkpoint's objects, whatever the strategy: a model and its optimizers through
torch's ``get_state_dict``/``set_state_dict`` (sharded under FSDP, plain under DDP), anything else through its
own ``state_dict``. Rank-local, except where marked collective."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import sharded
from .files import CheckpointError

MODEL, OPTIMIZER, EMPTY_OPTIMIZER, OBJECT = "model", "optimizer", "optimizer-without-state", "object"


def _model_of(opt: torch.optim.Optimizer, objects: dict[str, Any]) -> nn.Module:
    """The registered model whose parameters ``opt`` updates."""
    first = next((p for g in opt.param_groups for p in g["params"]), None)
    for obj in objects.values():
        if isinstance(obj, nn.Module) and any(p is first for p in obj.parameters()):
            return obj
    raise CheckpointError("a sharded checkpoint saves an optimizer with its model: register the model it "
                          "updates too (model=...)")


def kinds(objects: dict[str, Any]) -> dict[str, str]:
    out = {}
    for k, obj in objects.items():
        if isinstance(obj, nn.Module):
            out[k] = MODEL
        elif isinstance(obj, torch.optim.Optimizer):
            # torch's get_optimizer_state_dict takes a zero-lr step on an optimizer without state to create
            # it (Adam's step count became 1 on the live optimizer): one without state is saved as it is.
            out[k] = OPTIMIZER if obj.state else EMPTY_OPTIMIZER
        else:
            out[k] = OBJECT
    return out


def state_dicts(objects: dict[str, Any], kind: dict[str, str]) -> dict[str, Any]:
    """Every object's state_dict, models and optimizers keyed by parameter names (DTensor shards under FSDP;
    collective under FSDP only where torch's functions are)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    out: dict[str, Any] = {}
    for k, obj in objects.items():
        if kind[k] == MODEL:
            out[k] = get_model_state_dict(obj)
        elif kind[k] == OPTIMIZER:
            out[k] = get_optimizer_state_dict(_model_of(obj, objects), obj)
        else:
            out[k] = obj.state_dict()
    return out


def load_state_dicts(objects: dict[str, Any], saved_kind: dict[str, str], states: dict[str, Any]) -> None:
    """Give each object its state, resharded onto this run's ranks."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    for k, obj in objects.items():
        if saved_kind.get(k) == MODEL:
            set_model_state_dict(obj, states[k])
        elif saved_kind.get(k) == OPTIMIZER:
            set_optimizer_state_dict(_model_of(obj, objects), obj, states[k])
        elif saved_kind.get(k) == EMPTY_OPTIMIZER:
            pass  # saved before its first step: this run's optimizer is as fresh as that one was
        else:
            obj.load_state_dict(states[k])


def templates(objects: dict[str, Any], saved_kind: dict[str, str]) -> dict[str, Any]:
    """What a sharded load fills: this run's state_dicts, shaped and sharded as this run's objects are."""
    mine = {k: (OBJECT if saved_kind.get(k) == EMPTY_OPTIMIZER else saved_kind.get(k, OBJECT))
            for k in objects}
    return state_dicts({k: v for k, v in objects.items() if k in saved_kind}, mine)


def load_sharded(objects: dict[str, Any], path: Any, data: dict[str, Any], group: Any) -> None:
    """*Collective.* Each rank reads its shards of the saved tensors, whatever the saved world size, and the
    objects take them with the saved non-tensor state."""
    saved = {k: e["kind"] for k, e in data["objects"].items()}
    _, tensors = sharded.split(templates(objects, saved))
    sharded.load(path, tensors, group)
    try:
        loaded = {k: sharded.merge(data["objects"][k]["rest"], tensors, (k,)) for k in objects}
    except KeyError as e:
        raise CheckpointError(f"{path}: holds {e} that this run's objects do not have\nHINT: register the "
                              "same model and optimizer as when saving") from None
    load_state_dicts(objects, saved, loaded)


def load_full_into_fsdp(objects: dict[str, Any], data: dict[str, Any]) -> None:
    """*Collective.* A full checkpoint (one file, plain tensors) into sharded objects: each rank keeps its
    shards of the whole tensors it read."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True)
    for k, obj in objects.items():
        if isinstance(obj, nn.Module):
            set_model_state_dict(obj, data[k], options=full)
        elif isinstance(obj, torch.optim.Optimizer):
            model = _model_of(obj, objects)
            if data[k].get("state"):
                set_optimizer_state_dict(model, obj, by_names(data[k], model, obj), options=full)
        else:
            obj.load_state_dict(data[k])


def by_names(osd: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` (parameters numbered in the optimizer's order) keyed by parameter names."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    return {"state": {order[i]: v for i, v in osd["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in osd["param_groups"]]}


def by_numbers(osd: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`by_names`: the shape ``torch.optim.Optimizer.state_dict()`` has."""
    order = [n for g in osd["param_groups"] for n in g["params"]]
    index = {n: i for i, n in enumerate(order)}
    return {"state": {index[n]: v for n, v in osd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]}


def consolidate(path: Any, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """A sharded checkpoint folder as one dict of the shape of a full checkpoint: plain tensors, the model a
    plain state_dict, an optimizer numbered as ``optimizer.state_dict()`` is (no process group). ``data``:
    the folder's :func:`.sharded.read`, when read already."""
    data = dict(data) if data is not None else sharded.read(path)
    tensors = sharded.load_all(path)
    objects = data.pop("objects")
    for k, entry in objects.items():
        state = sharded.merge(entry["rest"], tensors, (k,))
        data[k] = by_numbers(state) if entry["kind"] == OPTIMIZER else state
    data.pop("sharded", None)
    return data
