"""The job's entry point: found and checked before any rank starts, called in each rank as it asks.

An entry point declares its own settings as a dataclass, the annotation of its second parameter
(``def main(job: launcher.Job, args: MyArgs)``); the job's ``args:`` section is built into it with the same
strict errors as the launcher's own keys. Field metadata ``launcher.config.EXACT`` marks settings whose change
breaks exact resume, as on the job's own fields.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
import typing
from typing import Any

from .config import ConfigError, Job
from .typed import build


def resolve_entry(job: Job) -> Any:
    """Import ``job.entry`` (``module:qualname``); ConfigError naming the entry and the import path if not."""
    module_name, _, qualname = job.entry.partition(":")
    where = f"{job.source}: entry {job.entry!r}"
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ConfigError(f"{where}: importing {module_name} failed: {e}\nHINT: install {e.name}") \
                from None
        path = ", ".join(p or "." for p in sys.path[:4])
        raise ConfigError(
            f"{where}: no module named {e.name!r} (looked in the working directory {os.getcwd()} and {path}, "
            f"...)\nHINT: run the command from the folder that holds {module_name.split('.')[0]}/, or "
            "install "
            "that package in this environment"
        ) from None
    except Exception as e:  # noqa: BLE001 - the user's module failed while importing: say how
        raise ConfigError(f"{where}: importing {module_name} raised {type(e).__name__}: {e}\n"
                          f"HINT: python -c 'import {module_name}' shows the traceback") from None
    for part in qualname.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n)))
            raise ConfigError(f"{where}: {obj.__name__} has no attribute {part!r}\n"
                              f"HINT: callables there: {', '.join(names[:12]) or 'none'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{where}: {type(obj).__name__} is not callable\n"
                          "HINT: name a function: module:function")
    return obj


def args_class(fn: Any) -> type | None:
    """The dataclass an entry point declares for its ``args`` (the annotation of its second parameter)."""
    params = list(inspect.signature(fn).parameters)
    if len(params) < 2:
        return None
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: the args stay a plain mapping
        return None
    cls = hints.get(params[1])
    return cls if isinstance(cls, type) and dataclasses.is_dataclass(cls) else None


def entry_args(fn: Any, job: Job) -> Any:
    """``job.args`` built into the entry's dataclass, with the strict errors of the job's own keys."""
    cls = args_class(fn)
    if cls is None:
        return dict(job.args)
    return build(cls, dict(job.args), "args", job.source)


def call_entry(fn: Any, job: Job) -> Any:
    """Call an entry point as it asks: ``fn(job, args)``, ``fn(job)`` or ``fn()``."""
    n = len(inspect.signature(fn).parameters)
    if n == 0:
        return fn()
    if n == 1:
        return fn(job)
    return fn(job, entry_args(fn, job))


def check_entry(job: Job) -> None:
    """Before any rank starts: the entry imports, is callable, and ``args`` fits its dataclass."""
    if job.script is None:
        entry_args(resolve_entry(job), job)


def resume_keys(job: Job, kind: str) -> set[str]:
    """Dotted keys whose field metadata says ``resume: kind`` (``exact``, ``ignore``), the entry's too."""
    out: set[str] = set()

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("resume") == kind:
                out.add(prefix + f.name)
            if isinstance(hints.get(f.name), type) and dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")

    walk(Job, "")
    if job.entry:
        try:
            cls = args_class(resolve_entry(job))
        except ConfigError:
            cls = None
        if cls is not None:
            walk(cls, "args.")
    return out
