"""A rank's DataLoader workers start from a fork server of its own when the dataset can be sent there."""

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import __main__
from launcher.data import ShardedIterableDataset, make_loader
from launcher.data import workerserver as forkserver
from launcher.testing import run_distributed
from tests.conftest import ROOT


def read_parent(shard):
    """Samples that say which process started the worker reading them."""
    return [{"ppid": torch.tensor(os.getppid())} for _ in range(shard)]


def workers_parents():
    ds = ShardedIterableDataset([4, 4, 4, 4], read_parent, batch_size=2)
    parents = {int(p) for batch in make_loader(ds, num_workers=2) for p in batch["ppid"]}
    return os.getpid(), parents


def test_workers_of_a_rank_are_not_forks_of_the_rank():
    out = run_distributed(workers_parents, world_size=2, timeout_s=60)
    for rank_pid, parents in out.values():
        assert len(parents) == 1, parents  # one server forks both workers
        assert rank_pid not in parents


def in_fresh_interpreter(name: str) -> Any:
    """What this module's function ``name`` returns when called in a new Python process (its repr)."""
    code = f"from tests.test_forkserver import {name} as f; print(repr(f()))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr
    return ast.literal_eval(r.stdout.strip().splitlines()[-1])


def forked_workers_parents() -> tuple[bool, set[int], int]:
    ds = ShardedIterableDataset([2, 2], read_parent, batch_size=2, rank=0, world_size=1)
    parents = {int(p) for batch in make_loader(ds, num_workers=2) for p in batch["ppid"]}
    return forkserver.for_workers(ds) is None, parents, os.getpid()


def test_outside_a_process_group_workers_are_forked_as_usual():
    # In a fresh interpreter: a fork of the test process, after a few hundred tests left their threads in it,
    # once died of SIGSEGV in CI (a fork copies a process whose other threads may hold locks).
    no_server, parents, pid = in_fresh_interpreter("forked_workers_parents")
    assert no_server and parents == {pid}


def test_what_cannot_go_through_a_server_is_recognised(monkeypatch):
    ds = ShardedIterableDataset([2, 2], read_parent, batch_size=2, rank=0, world_size=1)
    modules = forkserver._modules_if_importable((ds,))
    assert modules is not None and "tests.test_forkserver" in modules and "launcher.data.dataset" in modules
    # tensors travel through shared memory: they do not count towards the size limit
    big_tensor = torch.zeros(forkserver.WORKER_PICKLE_LIMIT)
    assert forkserver._modules_if_importable((ds, big_tensor)) is not None
    assert forkserver._modules_if_importable((ds, b"x" * (forkserver.WORKER_PICKLE_LIMIT + 1))) is None
    assert forkserver._modules_if_importable((lambda shard: [],)) is None  # does not pickle
    # a class of the script being run pickles in this process but not in the server
    in_main = type("Dataset", (), {"__module__": "__main__"})
    monkeypatch.setattr(__main__, "Dataset", in_main, raising=False)
    assert forkserver._modules_if_importable((in_main,)) is None


def server_signal_mask() -> tuple[bool, bool, bool]:
    """In a 1-rank process group with the SLURM stop handlers installed: are SIGTERM and USR2 blocked in the
    workers' server, and is USR2 blocked or ignored in multiprocessing's resource tracker?"""
    import signal
    from multiprocessing import resource_tracker

    import torch.distributed as tdist

    from launcher.internals import forkserver_pid
    from launcher.rank import stop

    def mask(pid: int, field: str) -> int:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith(field)).split()[1], 16)

    tdist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    stop.install(0)
    assert forkserver.for_workers(ShardedIterableDataset([2], read_parent, batch_size=2)) is not None
    server = forkserver_pid()
    assert server is not None
    blocked = mask(server, "SigBlk")
    tracker = resource_tracker._resource_tracker._pid  # type: ignore[attr-defined]
    usr2 = 1 << (signal.SIGUSR2 - 1)
    return (bool(blocked & (1 << (signal.SIGTERM - 1))), bool(blocked & usr2),
            bool((mask(tracker, "SigBlk") | mask(tracker, "SigIgn")) & usr2))


def test_under_slurm_the_workers_server_outlives_the_stop_signals():
    # SLURM signals every process of the job step: a time limit's USR2 killed the tracker, and the
    # relaunched one printed a KeyError traceback for each semaphore the workers then unregistered.
    assert in_fresh_interpreter("server_signal_mask") == (True, True, True)
