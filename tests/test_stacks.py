"""Where is every rank (issue 39): stacks on demand (``launcher stacks RUN_DIR``) and in a stall's report,
through the installed ``launcher`` command."""

from __future__ import annotations

import re
import signal
import subprocess
import time

from .conftest import ROOT, cmdline, killable_env, launcher_cmd, run_cli, wait_until
from .test_cli import start_long_job

SCRIPTS = ROOT / "tests" / "scripts"


def wait_forever() -> None:
    time.sleep(1000)  # the line a stall's report must name


def stalls_in_rank_one(job) -> None:
    """Entry point: three steps in step, then rank 1 stops in :func:`wait_forever` while rank 0 waits for it
    in a collective (each rank's DataLoader workers idle, waiting for the next request)."""
    import torch
    import torch.distributed as tdist

    import launcher

    data = launcher.ShardedIterableDataset([256], _read, sizes=[256], batch_size=4, shuffle=False)
    batches = iter(launcher.make_loader(data, job=job))
    for step in range(1, 4):
        next(batches)
        tdist.all_reduce(torch.ones(1))
        launcher.note_step(step)
    if launcher.get_rank() == 1:
        wait_forever()
    tdist.all_reduce(torch.ones(1))


def test_a_stall_report_names_the_line_where_the_stalled_rank_is(tmp_path):
    started = time.monotonic()
    r = run_cli("run", "jobs/tiny.yaml", f"output_dir={tmp_path}",
                "entry=tests.test_stacks:stalls_in_rank_one", "distributed.timeout_s=3", "data.num_workers=1")
    took = time.monotonic() - started
    assert r.returncode == 1, r.stderr
    assert "rank 1 stopped making progress" in r.stderr, r.stderr
    line = wait_forever.__code__.co_firstlineno + 1
    assert f"rank 1 was at {__file__}:{line} in wait_forever" in r.stderr, r.stderr
    # idle, waiting for a request: Python's own frame (the console script is not the user's code)
    assert "its DataLoader worker 0 was at " in r.stderr and "bin/launcher:" not in r.stderr, r.stderr
    assert (tmp_path / "tiny" / "logs" / "stacks" / "rank1.txt").read_text().count("wait_forever") >= 1
    print(f"stall reported {took:.1f} s after the start (timeout 3 s)")


def test_launcher_stacks_prints_every_live_rank_within_5s(tmp_path):
    # long epochs: the tiny job's own (16 steps) spend much of their time starting the next epoch's workers
    proc = start_long_job(tmp_path / "runs", "checkpoint.every_steps=0", "args.num_samples=200000")
    try:
        stacks = tmp_path / "runs" / "tiny" / "logs" / "stacks"
        # 2 ranks, 2 DataLoader workers each
        assert wait_until(lambda: len(list(stacks.glob("*.pid"))) == 6, 90), "the ranks did not start"
        time.sleep(1)
        started = time.monotonic()
        r = run_cli("stacks", str(tmp_path / "runs" / "tiny"), timeout=30)
        took = time.monotonic() - started
        assert r.returncode == 0, r.stderr
        titles = re.findall(r"^== (rank \d(?:, DataLoader worker \d)?) \(pid", r.stdout, re.MULTILINE)
        assert titles == ["rank 0", "rank 0, DataLoader worker 0", "rank 0, DataLoader worker 1", "rank 1",
                          "rank 1, DataLoader worker 0", "rank 1, DataLoader worker 1"], r.stdout
        assert "Current thread" in r.stdout, r.stdout
        assert "examples/tiny.py" in r.stdout, r.stdout  # the training loop, where the main thread is
        assert "in _worker_loop" in r.stdout.split("DataLoader worker 0 (pid")[1], r.stdout  # its own stack
        assert took < 5, took
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    r = run_cli("stacks", str(tmp_path / "runs" / "tiny"), timeout=30)
    assert r.returncode == 1 and "no rank of" in r.stderr, r.stderr  # the job has ended: said, no wait


def pause_here() -> None:
    time.sleep(7)  # the line the early warning must name


def _read(n: int):
    return range(n)


_seen = [0]  # samples this DataLoader worker has made


def _sample(x: int):
    """A sample of :func:`pauses_in_rank_one`'s data: rank 1's DataLoader worker pauses in
    :func:`pause_here` at its 13th sample (the rank's 4th batch of 4)."""
    import os

    import torch

    _seen[0] += 1
    if os.environ.get("RANK") == "1" and _seen[0] == 13:
        pause_here()
    return torch.tensor([float(x)])


def pauses_in_rank_one(job) -> str:
    """Entry point: rank 1's DataLoader worker pauses 7 s in :func:`pause_here` after three batches, then
    both ranks go on and finish 6 steps."""
    import torch
    import torch.distributed as tdist

    import launcher

    data = launcher.ShardedIterableDataset([256], _read, sizes=[256], batch_size=4,
                                           transform=_sample, shuffle=False)
    for step, _batch in enumerate(launcher.make_loader(data, job=job), start=1):
        tdist.all_reduce(torch.ones(1))
        launcher.note_step(step)
        if step == 6:
            break
        time.sleep(0.2)
    return "done"


def test_a_rank_without_a_step_for_a_while_gets_its_stack_printed_once_and_the_job_goes_on(tmp_path):
    r = run_cli("run", "jobs/tiny.yaml", f"output_dir={tmp_path}",
                "entry=tests.test_stacks:pauses_in_rank_one", "distributed.stall_warning_s=2",
                "distributed.timeout_s=30", "data.num_workers=1")
    assert r.returncode == 0, r.stderr
    line = pause_here.__code__.co_firstlineno + 1
    assert r.stderr.count("made no step for") == 1, r.stderr
    # the step said is the last one its heartbeat (written at most once a second) shows
    said = r"\[launcher\] rank 1 made no step for \d+ s \(last step [1-6]\); the job goes on"
    assert re.search(said, r.stderr), r.stderr
    loop = f"{__file__}:{pauses_in_rank_one.__code__.co_firstlineno + 10} in pauses_in_rank_one"
    assert f"It is at {loop}" in r.stderr, r.stderr  # the rank waits for its batch, in the user's loop
    assert f"Its DataLoader worker 0 is at {__file__}:{line} in pause_here" in r.stderr, r.stderr
    assert "rank(s) 0 wait for it in a collective" in r.stderr, r.stderr


def test_launcher_stacks_shows_the_workers_of_a_scripts_own_dataloader(tmp_path):
    """A torchrun script's own DataLoader (torch's, forked workers): each worker's stack, where it reads;
    a helper program the rank forked and ran (it lost the handler: the signal would end it) is left alone."""
    proc = subprocess.Popen(launcher_cmd("run", "--nproc-per-node", "2", str(SCRIPTS / "stuck_loader.py")),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=killable_env(tmp_path))
    try:
        run_dir = tmp_path / "runs" / "stuck_loader"
        stacks = run_dir / "logs" / "stacks"
        # 2 ranks, 2 workers each, and the helpers' files (written before they ran `sleep`)
        assert wait_until(lambda: len(list(stacks.glob("rank*-pid*.pid"))) == 6, 60), "no workers started"
        time.sleep(1)
        children = [int(p.name.split("-pid")[1][:-4]) for p in stacks.glob("rank*-pid*.pid")]
        helpers = [pid for pid in children if cmdline(pid).startswith("sleep 300")]
        assert len(helpers) == 2, [cmdline(pid) for pid in children]
        started = time.monotonic()
        r = run_cli("stacks", str(run_dir), timeout=30)
        took = time.monotonic() - started
        assert r.returncode == 0, r.stderr
        titles = re.findall(r"^== (rank \d(?:, \D+)?) \(pid", r.stdout, re.MULTILINE)
        assert titles == ["rank 0", "rank 0, DataLoader worker", "rank 0, DataLoader worker", "rank 1",
                          "rank 1, DataLoader worker", "rank 1, DataLoader worker"], r.stdout
        workers = r.stdout.split("DataLoader worker (pid")[1:]
        assert all("in slow_read" in w.split("== rank")[0] for w in workers), r.stdout
        assert all(cmdline(pid).startswith("sleep 300") for pid in helpers), "a helper was signalled"
        assert took < 5, took
        print(f"launcher stacks with a script's own workers: {took:.2f} s")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert not any(cmdline(pid) for pid in helpers), "a helper outlived its rank"
