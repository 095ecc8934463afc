"""The Python API: launch(fn) in N Gloo ranks, results, failures with tracebacks, collective timeouts."""

import os
import sys
import time

import pytest
import torch
import torch.distributed as tdist

import launcher
from launcher.testing import run_distributed


def rank_info(scale):
    t = torch.tensor([float(launcher.get_rank() + 1)])
    tdist.all_reduce(t)
    return {"rank": launcher.get_rank(), "world": launcher.get_world_size(), "sum": t.item() * scale}


def raise_on_rank_one():
    launcher.note_step(5)
    if launcher.get_rank() == 1:
        raise ValueError("boom from rank one")
    time.sleep(30)  # the other rank must be stopped, not waited for


def stall_rank_one():
    launcher.note_step(1)  # after the first step the short timeout applies
    if launcher.get_rank() == 1:
        time.sleep(60)
    tdist.all_reduce(torch.ones(1))


def object_collectives():
    gathered = launcher.all_gather_object({"r": launcher.get_rank()})
    value = launcher.broadcast_object(f"from {launcher.get_rank()}", src=1)
    launcher.barrier()
    return gathered, value


def test_launch_returns_per_rank_results():
    out = launcher.launch(rank_info, nproc=3, backend="gloo", args=(2.0,))
    assert out == {r: {"rank": r, "world": 3, "sum": 12.0} for r in range(3)}


def test_object_collectives(distributed):
    out = distributed(object_collectives, world_size=2)
    for r in range(2):
        assert out[r] == ([{"r": 0}, {"r": 1}], "from 1")


def test_rank_helpers_when_not_distributed():
    assert launcher.get_rank() == 0 and launcher.get_world_size() == 1 and launcher.is_main_process()
    assert launcher.all_gather_object(5) == [5] and launcher.broadcast_object("x") == "x"
    launcher.barrier()


def test_raising_rank_fails_the_job_quickly_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(launcher.RankFailure) as e:
        run_distributed(raise_on_rank_one, world_size=2)
    elapsed = time.monotonic() - start
    assert elapsed < 20, elapsed
    msg = str(e.value)
    assert e.value.first.rank == 1
    assert "ValueError: boom from rank one" in msg and "[rank1]" in msg
    assert "rank 1 on" in msg and "after step 5" in msg  # the note added by the worker


def test_stalled_collective_times_out_naming_rank_and_step():
    start = time.monotonic()
    with pytest.raises(launcher.RankFailure) as e:
        launcher.launch(stall_rank_one, nproc=2, backend="gloo", timeout_s=3, startup_timeout_s=60)
    elapsed = time.monotonic() - start
    assert elapsed < 30, elapsed
    msg = str(e.value)
    assert e.value.first.rank == 0 and "after step 1" in msg
    assert "timed out" in msg.lower() or "timeout" in msg.lower()


def test_local_functions_are_refused_with_a_hint():
    def local():
        return 1

    with pytest.raises(ValueError, match="module level"):
        launcher.launch(local, nproc=1)


def test_root_cause_is_reported_before_ranks_stopped_because_of_it():
    from launcher.errors import Failure, RankFailure

    stopped = Failure(
        rank=0, host="h", exitcode=-15, signal="SIGTERM", timestamp=100, message="", traceback=""
    )
    peer = Failure(rank=2, host="h", exitcode=1, signal=None, timestamp=100, message="",
                   traceback="RuntimeError: Connection closed by peer")
    killed = Failure(rank=1, host="h", exitcode=-9, signal="SIGKILL", timestamp=101, message="", traceback="")
    err = RankFailure([stopped, peer, killed])
    assert err.first.rank == 1 and "rank 1 failed first" in str(err) and "signal SIGKILL" in str(err)


def num_threads():
    return torch.get_num_threads()


def test_ranks_share_the_cores_instead_of_oversubscribing(monkeypatch):
    from launcher.launching.rankserver import threads_per_rank

    assert threads_per_rank(2, cores=2) == 1 and threads_per_rank(1, cores=2) == 2
    assert threads_per_rank(3, cores=16) == 5 and threads_per_rank(8, cores=4) == 1
    expected = threads_per_rank(2)
    assert launcher.launch(num_threads, nproc=2, backend="gloo") == {0: expected, 1: expected}
    mine = 1 if expected != 1 else 2  # the user's setting wins (torch caps it at the core count)
    monkeypatch.setenv("OMP_NUM_THREADS", str(mine))
    assert launcher.launch(num_threads, nproc=2, backend="gloo") == {0: mine, 1: mine}


def process_view():
    import multiprocessing
    import os
    import sys

    import numpy as np

    return {
        "test": os.environ.get("PYTEST_CURRENT_TEST"),
        "mark": os.environ.get("LAUNCHER_TEST_MARK"),
        "rank": os.environ["RANK"],
        "cwd": os.getcwd(),
        "path0": sys.path[0],
        "start_method": multiprocessing.get_start_method(allow_none=True),
        "own_session": os.getsid(0) == os.getpid(),
        "name": open("/proc/self/comm").read().strip(),
        "numpy": int(np.random.randint(2**31)),
    }


def test_ranks_see_the_launcher_as_it_is_when_they_start(tmp_path, monkeypatch):
    """Ranks are forks of a server started earlier: they must still get the launcher's present environment,
    working directory and sys.path, a fresh process's start method and numpy stream, and their own session
    (killed as a group)."""
    launcher.launch(num_threads, nproc=1, backend="gloo")  # the server runs from here on, with today's state
    monkeypatch.setenv("LAUNCHER_TEST_MARK", "set after the server started")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = launcher.launch(process_view, nproc=2, backend="gloo")
    test = os.environ["PYTEST_CURRENT_TEST"]
    assert out[0].pop("numpy") != out[1].pop("numpy")  # not both the server's global numpy stream
    for r in range(2):
        assert out[r] == {"test": test, "mark": "set after the server started", "rank": str(r),
                          "cwd": str(tmp_path), "path0": str(tmp_path), "start_method": None,
                          "own_session": True, "name": f"launcher-rank{r}"}


def exit_zero():
    import sys

    sys.exit(0)


def test_a_target_that_exits_with_0_counts_as_done_without_a_result():
    assert launcher.launch(exit_zero, nproc=2, backend="gloo") == {0: None, 1: None}


def test_more_ranks_than_the_fork_server_can_pass_start_with_spawn(monkeypatch):
    """Above MAX_FORKED_RANKS (torch's process context sends every rank all result queues, and the fork
    server passes at most 256 file descriptors: 126 ranks failed with "too many fds") ranks start with the
    spawn method, as under torchrun. Lowered to 1 here so that 2 ranks take that path."""
    from launcher.launching import local

    monkeypatch.setattr(local, "MAX_FORKED_RANKS", 1)
    started = []
    real = local.rankserver.start
    monkeypatch.setattr(local.rankserver, "start", lambda n: started.append(n) or real(n))
    assert launcher.launch(rank_info, nproc=2, backend="gloo", args=(1.0,))[1]["sum"] == 3.0
    assert started == []  # the fork server was not used


def torch_seed():
    return torch.initial_seed()


def _store_holders() -> list[str]:
    """Objects of this process that hold a c10d store in an attribute."""
    import gc

    return [f"{type(o).__name__}.{name}" for o in gc.get_objects() if not isinstance(o, type)
            for name, value in (getattr(o, "__dict__", None) or {}).items() if isinstance(value, tdist.Store)]


def test_two_launches_in_one_process_draw_apart_and_leave_no_store_to_a_fork():
    """Each rank is a fork of one server: without a reseed all would draw the same numbers (a fresh process,
    as under torchrun, starts from a random seed).

    launch() leaves nothing a later fork of this process can trip on: its agent held the rendezvous store,
    whose server runs a thread, until the garbage collector freed it; a DataLoader worker forked before then
    collected its copy and died of SIGSEGV joining that thread, which a fork does not copy (1 to 3 loaders
    in 20 after an in-process launch; the flaky test_smalltensors failure of issue #41)."""
    import gc
    import multiprocessing

    gc.disable()  # the first run's leftovers stay until a collection: here, the forked child's
    try:
        first = launcher.launch(torch_seed, nproc=2, backend="gloo")
        second = launcher.launch(torch_seed, nproc=2, backend="gloo")
        assert not _store_holders()
        child = multiprocessing.get_context("fork").Process(target=gc.collect)
        child.start()
        child.join(30)
    finally:
        gc.enable()
    assert child.exitcode == 0, f"a process forked after launch() died collecting: exit code {child.exitcode}"
    assert first[0] != first[1] and len({*first.values(), *second.values()}) == 4


def optimizer_module_was_there():
    there = "torch._dynamo" in sys.modules
    torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)  # imports it if it is not (1.3 s of CPU)
    return there


def test_what_every_rank_imports_anyway_is_imported_once_by_the_fork_server():
    """Every optimizer imports torch._dynamo (internals.LAZY_TORCH_MODULES): the ranks find it imported."""
    assert launcher.launch(optimizer_module_was_there, nproc=2, backend="gloo") == {0: True, 1: True}
