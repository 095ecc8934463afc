"""Every private attribute of CPython or torch that the launcher relies on still exists.

They are all listed in :data:`launcher.internals.REQUIRED`; an upgrade that removes one fails here, naming it,
instead of somewhere deep inside a run.
"""

import importlib

import pytest

from launcher import internals


@pytest.mark.parametrize("module, path", internals.REQUIRED, ids=[f"{m}:{p}" for m, p in internals.REQUIRED])
def test_private_attribute_still_exists(module, path):
    obj = importlib.import_module(module)
    for part in path.split("."):
        if isinstance(obj, type) and part in getattr(obj, "__annotations__", {}):
            break  # an instance attribute declared on the class (set in __init__)
        if not hasattr(obj, part):
            # Instance attributes: look at what the constructor assigns.
            source = _init_source(obj)
            assert f"self.{part}" in source, (
                f"{module}.{path}: {part!r} is gone from this Python/torch; launcher/internals.py uses it"
            )
            break
        obj = getattr(obj, part)


def _init_source(obj):
    import inspect

    cls = obj if isinstance(obj, type) else type(obj)
    try:
        return "".join(inspect.getsource(c) for c in cls.__mro__ if c.__module__ != "builtins")
    except (OSError, TypeError):
        return ""


def test_accessors_work_in_this_process():
    assert internals.forkserver_pid() is None or isinstance(internals.forkserver_pid(), int)
    assert internals.batchnorm_base().__name__ == "_BatchNorm"
    assert internals.agent_processes(object()) == ({}, [])
