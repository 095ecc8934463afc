"""Whether a checkpoint may be resumed by this job: what changed since it was written, which changes break
exact resume, and the optimizer hyperparameters a job changed on purpose (no collectives, no files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import dist
from .files import FORMAT, CheckpointError


def apply_changed_hyperparameters(built: dict[str, list[dict[str, Any]]], objects: dict[str, Any],
                                  saved: dict[str, Any], log: Any = print) -> None:
    """An optimizer built with other hyperparameters than the checkpoint's run (``lr`` 0.01 -> 0.2 in the
    job) gets the new ones, scaled onto the restored values so a schedule goes on from where it was;
    restoring the optimizer's state would otherwise silently keep the old ones."""
    for name, groups in built.items():
        obj: Any = objects.get(name)
        old_groups = saved.get(name)
        if obj is None or not isinstance(old_groups, list) or len(old_groups) != len(groups):
            continue
        for i, (new, old) in enumerate(zip(groups, old_groups)):
            for key, value in new.items():
                before = old.get(key)
                if before == value or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                group = obj.param_groups[i]
                scale = value / before if isinstance(before, (int, float)) and before else None
                group[key] = group[key] * scale if scale is not None else value
                if key == "lr" and "initial_lr" in group:
                    group["initial_lr"] = value
                    for other in objects.values():  # schedulers compute lr from base_lrs
                        sched: Any = other
                        if getattr(sched, "optimizer", None) is obj and hasattr(sched, "base_lrs"):
                            sched.base_lrs[i] = value
                log(f"[launcher] applied on resume: {name} group {i} {key} {before} -> {value}")


def check_compatible(job: Any, path: Path, data: dict[str, Any], log: Any = print) -> bool:
    """Compare the saved run with this one; raise on changes that break exact resume unless allowed.

    Returns whether per-rank state (RNG, data position) can be restored.
    """
    if data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a launcher checkpoint (format {data.get('format')!r})")
    import torch

    written_by = (data.get("versions") or {}).get("torch")
    if written_by and written_by != str(torch.__version__):
        log(f"[launcher] warning: {path.name} was written by torch {written_by}, this run has "
            f"{torch.__version__}: the state loads; numerics and sharded layouts may differ from that run")
    saved, now = data.get("job") or {}, job_dict(job) or {}
    # An ``args`` key absent on one side means its default, which the entry's dataclass says: the change
    # list shows that value, not None.
    defaults = _args_defaults(job)
    for side in (saved, now):
        if defaults and isinstance(side.get("args"), dict):
            side["args"] = {**defaults, **side["args"]}
    exact, ignored = _resume_keys(job)
    changes = _diff(saved, now, ignored)
    if data.get("world_size") != dist.get_world_size():
        changes.insert(0, f"world size: {data.get('world_size')} -> {dist.get_world_size()}")
    breaking = [c for c in changes if c.split(":")[0] in exact or c.startswith("world size")]
    if changes:
        log("[launcher] the job changed since the checkpoint was written:\n  " + "\n  ".join(changes))
    if breaking:
        allowed = bool(job and job.checkpoint.allow_changes)
        if not allowed:
            raise CheckpointError(
                f"{path}: these changes break exact resume: {'; '.join(breaking)}\n"
                "HINT: undo them, start a new run (checkpoint.resume=never or a new name), or pass "
                "checkpoint.allow_changes=true to resume anyway (a sharded dataset's epoch goes on with "
                "the samples not yet seen; other data order and RNG streams will differ)"
            )
        return False
    return True


def hyperparameters(objects: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Each optimizer's param-group settings as built (numbers only; ``initial_lr`` where a scheduler set
    it stands for the built ``lr``)."""
    out = {}
    for name, obj in objects.items():
        groups = getattr(obj, "param_groups", None)
        if isinstance(groups, list) and hasattr(obj, "step"):
            out[name] = [{k: g.get("initial_lr", v) if k == "lr" else v for k, v in g.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "initial_lr"}
                         for g in groups]
    return out


def _args_defaults(job: Any) -> dict[str, Any]:
    """The defaults of the entry's ``args`` dataclass ({} without a job, an entry or a dataclass)."""
    if job is None or not getattr(job, "entry", ""):
        return {}
    import dataclasses

    from ..config import ConfigError
    from ..entry import args_class, resolve_entry

    try:
        cls = args_class(resolve_entry(job))
    except ConfigError:
        return {}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls) if cls is not None else ():
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _resume_keys(job: Any) -> tuple[set[str], set[str]]:
    """Keys that break exact resume, and keys not compared (declared on the fields, the entry's too)."""
    if job is None:
        return set(), set()
    from ..entry import resume_keys

    return resume_keys(job, "exact"), resume_keys(job, "ignore")


def _diff(old: dict[str, Any], new: dict[str, Any], ignored: set[str], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        key = f"{prefix}{k}"
        a, b = old.get(k), new.get(k)
        if key in ignored:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, ignored, key + ".")
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def job_dict(job: Any) -> dict[str, Any] | None:
    if job is None:
        return None
    from ..config import to_dict

    return to_dict(job)
