"""Fault injection: the rank that broke is named within seconds, and nothing is left behind.

Each test starts the tiny job with long epochs (DataLoader workers stay up), injects one fault, and asserts
the time bound, the rank and cause named in the report, and that no process of the run remains.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

import examples.tiny

from .conftest import children_of, cmdline, comm, descendants, left_behind, wait_until
from .test_cli import ranks_running, start_long_job

LONG_EPOCHS = ("args.num_samples=200000",)  # an epoch outlasts every test: workers are not restarted


def worker_server_and_workers(rank: int) -> tuple[int, list[int]] | None:
    """A rank's DataLoader fork server and the workers it forked, once both workers run."""
    for child in children_of(rank):
        # forked from the rank (launcher.data.workerserver.start_early), or a fresh interpreter
        if comm(child).startswith("launcher-data") or "forkserver" in cmdline(child):
            workers = children_of(child)
            return (child, workers) if len(workers) == 2 else None
    return None


@pytest.mark.parametrize("victim", ["worker", "worker server"])
def test_a_dead_dataloader_worker_fails_its_rank_within_5s(run_root, victim):
    proc = start_long_job(run_root, *LONG_EPOCHS)
    try:
        ranks = wait_until(lambda: ranks_running(proc), 90)
        assert ranks, "ranks did not start"
        found = wait_until(lambda: worker_server_and_workers(ranks[1]), 30)
        assert found, "no DataLoader workers"
        server, workers = found
        # the workers' server is a fork of its rank, made before the process group (not a fresh interpreter)
        assert comm(server) == "launcher-data1" and cmdline(server) == cmdline(ranks[1]), cmdline(server)
        tree = descendants(proc.pid)
        os.kill(workers[1] if victim == "worker" else server, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(timeout=60)
        elapsed = time.monotonic() - killed
        _, err = proc.communicate()
        assert proc.returncode == 1, err
        print(f"fault {victim}: job gone {elapsed:.2f} s after the kill")  # pytest -s shows it
        assert elapsed < 5, (elapsed, err)
        assert "rank 1 failed first" in err and "rank 1: DataLoader worker" in err, err
        assert "killed by SIGKILL" in err and "HINT" in err, err
        if victim == "worker":
            assert f"(pid {workers[1]})" in err
        assert wait_until(lambda: not left_behind(tree, ranks), 5), "processes left behind"
    finally:
        proc.kill()


def test_a_stopped_rank_is_named_and_the_job_ends_within_the_timeout_plus_5s(run_root):
    timeout_s = 6
    proc = start_long_job(run_root, *LONG_EPOCHS, f"distributed.timeout_s={timeout_s}")
    try:
        ranks = wait_until(lambda: ranks_running(proc), 90)
        assert ranks, "ranks did not start"
        assert wait_until(lambda: any((run_root / "tiny" / "logs").glob("heartbeat-*/rank1")), 60)
        time.sleep(1.5)  # past the first step: the step timeout applies
        tree = descendants(proc.pid)
        os.kill(ranks[1], signal.SIGSTOP)
        stopped = time.monotonic()
        proc.wait(timeout=timeout_s + 60)
        elapsed = time.monotonic() - stopped
        _, err = proc.communicate()
        print(f"fault SIGSTOP: job gone {elapsed:.2f} s after the stop (timeout_s={timeout_s})")
        assert proc.returncode == 1, err
        assert "rank 1 stopped making progress (last step" in err and "process stopped" in err, err
        assert elapsed < timeout_s + 5, (elapsed, err)
        assert "Terminating process" not in err
        assert wait_until(lambda: not left_behind(tree, ranks), 5), "processes left behind"
    finally:
        proc.kill()


def test_the_stall_report_reads_exception_messages_not_code_lines(tmp_path):
    from launcher.errors import Failure
    from launcher.launching.failures import stall_report

    (tmp_path / "rank0").write_text("12 0.0")
    (tmp_path / "rank1").write_text("40 0.0")
    worker_death = Failure(rank=1, host="h", exitcode=1, signal=None, timestamp=0, message="", traceback=(
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
        "    self._try_get_data(self._timeout)\n"
        "RuntimeError: rank 1: DataLoader worker 1 (pid 7) killed by SIGKILL"))
    assert stall_report([worker_death], tmp_path, {0: "S", 1: "Z"}) == ""
    gloo = Failure(rank=1, host="h", exitcode=1, signal=None, timestamp=0, message="", traceback=(
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    work.wait()\n"
        "RuntimeError: [../unbound_buffer.cc:129] Timed out waiting 6000ms for send operation to complete"))
    report = stall_report([gloo], tmp_path, {0: "S", 1: "S"})
    assert report.startswith("rank 0 stopped making progress (last step 12")


def test_on_a_second_machine_the_stall_report_names_global_ranks(tmp_path):
    """The agent of a machine that holds ranks 2-3 notes its ranks' process states by global rank, as the
    failures and heartbeats are keyed: rank 3 (stopped, oldest heartbeat) is named, not a local number."""
    import signal
    import subprocess
    import time

    from launcher.errors import Failure
    from launcher.launching.failures import stall_report
    from launcher.launching.local import _Agent

    ranks = [subprocess.Popen(["sleep", "30"], start_new_session=True) for _ in range(2)]
    try:
        ranks[1].send_signal(signal.SIGSTOP)
        time.sleep(0.2)
        agent = _Agent.__new__(_Agent)  # the state _note_states reads, without an elastic agent around it
        agent.states_at_failure, agent.global_ranks, agent.stacks_dir = {}, [2, 3], None
        agent._note_states([p.pid for p in ranks])
        assert set(agent.states_at_failure) == {2, 3} and agent.states_at_failure[2] == "S"
        assert ranks[1].wait(timeout=5) == -signal.SIGKILL  # a stopped rank is killed at once
    finally:
        for p in ranks:
            p.kill()
            p.wait()
    (tmp_path / "rank2").write_text("40 0.0")
    (tmp_path / "rank3").write_text("12 0.0")
    gloo = Failure(rank=2, host="h", exitcode=1, signal=None, timestamp=0, message="", traceback=(
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    work.wait()\n"
        "RuntimeError: [../unbound_buffer.cc:129] Timed out waiting 6000ms for recv operation to complete"))
    report = stall_report([gloo], tmp_path, agent.states_at_failure)
    assert report.startswith("rank 3 stopped making progress (last step 12"), report


FILL_THE_DISK = """
mount -t tmpfs -o size=3m tmpfs "$1"
{launcher} run jobs/tiny.yaml output_dir="$1" args.max_steps=100000 args.epochs=1000 args.step_sleep=0.01 \\
  checkpoint.every_steps=20 data.num_workers=0 2> "$2" &
for i in $(seq 600); do [ -e "$1/tiny/checkpoints/latest" ] && break; sleep 0.1; done
dd if=/dev/zero of="$1/filler" bs=64k count=100 2>/dev/null
wait $!
"""


def test_a_full_disk_under_the_run_directory_is_reported_as_such(tmp_path):
    """The disk fills while the job runs: the failing rank's error file (in the run directory's logs) is
    empty, and torch's agent used to crash reading it (a JSONDecodeError traceback, no rank named)."""
    import shutil
    import subprocess

    from .conftest import ROOT, launcher_cmd

    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private tmpfs")
    (tmp_path / "small").mkdir()
    err = tmp_path / "err"
    script = FILL_THE_DISK.format(launcher=launcher_cmd()[0])
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                        str(tmp_path / "small"), str(err)], cwd=ROOT, capture_output=True, text=True,
                       timeout=180, check=False)
    said = err.read_text()
    assert r.returncode == 1, (r.returncode, r.stderr, said)
    assert "no space left on the device that holds the run directory" in said and "HINT" in said, said
    assert re.search(r"rank [01] failed first", said) and "Traceback" not in said, said


def exit_early(job, args: examples.tiny.TinyArgs):
    """Entry point: rank 1 leaves with sys.exit(0) before training while rank 0 trains."""
    import sys

    import launcher

    if launcher.get_rank() == 1:
        sys.exit(0)
    return examples.tiny.main(job, args)


def test_a_rank_that_exits_0_early_is_named_not_its_healthy_peer(run_root):
    from .conftest import run_cli

    r = run_cli("run", "jobs/tiny.yaml", f"output_dir={run_root}", "entry=tests.test_faults:exit_early",
                "data.num_workers=0", "distributed.timeout_s=30")
    assert r.returncode == 1, r.stderr
    first = r.stderr.split("launcher: job failed: ", 1)[1].splitlines()[0]
    assert first.startswith("rank 1 ended its work without an error before its first step"), r.stderr
