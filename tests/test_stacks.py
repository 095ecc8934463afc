"""Where is every rank (issue 39): stacks on demand (``launcher stacks RUN_DIR``) and in a stall's report,
through the installed ``launcher`` command."""

from __future__ import annotations

import signal
import time

from .conftest import run_cli, wait_until
from .test_cli import start_long_job


def wait_forever() -> None:
    time.sleep(1000)  # the line a stall's report must name


def stalls_in_rank_one(job) -> None:
    """Entry point: three steps in step, then rank 1 stops in :func:`wait_forever` while rank 0 waits for it
    in a collective."""
    import torch
    import torch.distributed as tdist

    import launcher

    for step in range(1, 4):
        tdist.all_reduce(torch.ones(1))
        launcher.note_step(step)
    if launcher.get_rank() == 1:
        wait_forever()
    tdist.all_reduce(torch.ones(1))


def test_a_stall_report_names_the_line_where_the_stalled_rank_is(tmp_path):
    started = time.monotonic()
    r = run_cli("run", "jobs/tiny.yaml", f"output_dir={tmp_path}",
                "entry=tests.test_stacks:stalls_in_rank_one", "distributed.timeout_s=3", "data.num_workers=0")
    took = time.monotonic() - started
    assert r.returncode == 1, r.stderr
    assert "rank 1 stopped making progress" in r.stderr, r.stderr
    line = wait_forever.__code__.co_firstlineno + 1
    assert f"rank 1 was at {__file__}:{line} in wait_forever" in r.stderr, r.stderr
    assert (tmp_path / "tiny" / "logs" / "stacks" / "rank1.txt").read_text().count("wait_forever") >= 1
    print(f"stall reported {took:.1f} s after the start (timeout 3 s)")


def test_launcher_stacks_prints_every_live_rank_within_5s(tmp_path):
    proc = start_long_job(tmp_path / "runs", "checkpoint.every_steps=0")
    try:
        stacks = tmp_path / "runs" / "tiny" / "logs" / "stacks"
        assert wait_until(lambda: len(list(stacks.glob("*.pid"))) == 2, 90), "the ranks did not start"
        time.sleep(1)
        started = time.monotonic()
        r = run_cli("stacks", str(tmp_path / "runs" / "tiny"), timeout=30)
        took = time.monotonic() - started
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("== rank ") == 2 and "Current thread" in r.stdout, r.stdout
        assert "examples/tiny.py" in r.stdout, r.stdout  # the training loop, where the main thread is
        assert took < 5, took
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    r = run_cli("stacks", str(tmp_path / "runs" / "tiny"), timeout=30)
    assert r.returncode == 1 and "no rank of" in r.stderr, r.stderr  # the job has ended: said, no wait
