"""Every private attribute of CPython or torch that the launcher relies on still exists.

They are all listed in :data:`launcher.internals.REQUIRED`; an upgrade that removes one fails here, naming it,
instead of somewhere deep inside a run.
"""

import importlib
from pathlib import Path

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


#: Names with a leading underscore that are public API all the same (namedtuple's ``_fields``).
PUBLIC_UNDERSCORED = {"os._exit", "_fields"}


def _private(name: str) -> bool:
    return len(name) > 1 and name[0] == "_" and name[1] != "_" and name not in PUBLIC_UNDERSCORED


def test_no_private_attribute_is_touched_outside_internals():
    """Private names of CPython and torch are used in launcher/internals.py only (listed in REQUIRED): an
    attribute with a leading underscore on anything but ``self``/``cls`` elsewhere fails here, as does a
    string naming one (``getattr(x, "_y")``). Overriding a private method is allowed when REQUIRED lists
    it."""
    import ast
    from pathlib import Path

    required = {path.rsplit(".", 1)[-1] for _, path in internals.REQUIRED}
    package = Path(internals.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "internals.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = None
            if isinstance(node, ast.Attribute) and _private(node.attr):
                base = ast.unparse(node.value)
                allowed = base in ("self", "cls") or (base == "super()" and node.attr in required)
                if not allowed and f"{base}.{node.attr}" not in PUBLIC_UNDERSCORED:
                    name = f"{base}.{node.attr}"
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                if _private(node.value) and node.value.isidentifier():
                    name = repr(node.value)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                name = next((f"{node.module}.{a.name}" for a in node.names if _private(a.name)), None)
            if name:
                found.append(f"{path.relative_to(package.parent)}:{node.lineno}: {name}")
    assert not found, "private names outside launcher/internals.py:\n" + "\n".join(found)


def test_a_worker_whose_rank_stopped_while_it_started_prints_no_traceback(capsys):
    """Ctrl-C as an epoch's DataLoader workers start: the rank deletes its queues' semaphores on the way out,
    and a worker still unpickling them failed with a FileNotFoundError traceback beside the rank's own line
    (tests/test_cli.py::test_signal_to_launcher_stops_every_rank, once in four parallel runs). The fork
    servers' excepthook keeps that one quiet, and only that one."""
    import multiprocessing.synchronize as ms

    from launcher.rank.process import quiet_when_withdrawn

    lock = ms.Lock.__new__(ms.Lock)
    with pytest.raises(FileNotFoundError) as withdrawn:
        lock.__setstate__((0, 1, 1, "/mp-launcher-test-gone"))
    quiet_when_withdrawn(withdrawn.type, withdrawn.value, withdrawn.tb)
    with pytest.raises(FileNotFoundError) as other:
        Path("/nonexistent/launcher-test-file").read_text()
    quiet_when_withdrawn(other.type, other.value, other.tb)
    err = capsys.readouterr().err
    assert err.count("Traceback") == 1 and "launcher-test-file" in err and "mp-launcher-test-gone" not in err


class _InterruptedWhenSentTwice:
    """A dataset whose sending to a second worker is interrupted, as by Ctrl-C while the workers start."""

    sent = 0

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        return i

    def __reduce__(self):
        type(self).sent += 1
        if type(self).sent == 2:
            raise KeyboardInterrupt
        return (_InterruptedWhenSentTwice, ())


def test_a_dataloader_iterator_interrupted_in_its_init_stops_its_workers_quietly():
    """The same Ctrl-C inside the iterator's __init__: torchdata's __del__ raised AttributeError on the
    status list it had not set yet ("Exception ignored in ... __del__" and a traceback), and left the worker
    already started to the parent-death signal."""
    import gc
    import multiprocessing
    import sys

    from torchdata.stateful_dataloader import StatefulDataLoader

    loader = StatefulDataLoader(_InterruptedWhenSentTwice(), num_workers=2, multiprocessing_context="spawn")
    unraisable: list = []
    old, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        with pytest.raises(KeyboardInterrupt):
            internals.stateful_workers_iterator(loader, 5.0)
        gc.collect()  # the traceback held the iterator
    finally:
        sys.unraisablehook = old
    assert not unraisable, [u.exc_value for u in unraisable]
    assert not multiprocessing.active_children(), "the worker started before the interrupt still runs"


def _numbers(shard):
    import torch

    return [{"x": torch.tensor(shard * 10 + i)} for i in range(8)]


_FORGOTTEN: list[int] = []  # id of the iterator each worker of the second loader collects


def _collect_garbage(worker_id):
    import gc

    from torch.utils.data._utils import signal_handling

    gc.collect()
    try:
        signal_handling._remove_worker_pids(_FORGOTTEN[0])
    except ValueError:  # "Cannot find worker information": forgotten at its collection, as it should be
        return
    raise AssertionError("the iterator collected here is still in this worker's registry of worker pids")


def test_an_iterator_left_to_the_collector_is_shut_down_only_where_it_was_made(capfd):
    """An iterator dropped mid-epoch in a reference cycle waits for the garbage collector, and a loader
    started meanwhile forks a copy of it into each of its workers. A collection there ran torch's shutdown
    in the worker: "Exception ignored ... can only test a child process" on the user's console, and the
    first iterator's workers told to stop under it."""
    import gc
    import time
    import weakref

    from launcher.data import ShardedIterableDataset, make_loader

    gc.disable()  # the collector runs when allocations say: here, only when the test says
    try:
        first = make_loader(ShardedIterableDataset([0, 1], _numbers, batch_size=2), num_workers=1, timeout=30)
        it = iter(first)
        next(it)
        made = weakref.ref(internals.dataloader_iterator(first))
        _FORGOTTEN[:] = [id(made())]
        workers = internals.dataloader_workers(made())
        cycle: list = [first, it]
        cycle.append(cycle)
        del first, it, cycle
        second = make_loader(ShardedIterableDataset([2, 3], _numbers, batch_size=2), num_workers=2,
                             timeout=30, worker_init_fn=_collect_garbage)
        assert len(list(second)) == 8
        time.sleep(1)  # a worker told to stop ends at its next look at the queue (torch: 5 s at most)
        err = capfd.readouterr().err
        assert "Exception ignored" not in err, err[-3000:]
        assert [w.is_alive() for w in workers] == [True], "the first iterator's worker was stopped"
    finally:
        left = made()
        if left is not None:
            left.stop_workers()  # torch's shutdown at the collection would wait 5 s for it
        del left
        gc.enable()
        gc.collect()
    assert made() is None and not [w.pid for w in workers if w.is_alive()]
