"""The CLI end to end on the tiny job: runs, failures, signals, concurrency, torchrun in place."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import examples.tiny

from .conftest import (
    ROOT,
    children_of,
    cmdline,
    descendants,
    killable_env,
    launcher_cmd,
    left_behind,
    rank_pids,
    run_cli,
    semaphores,
    semaphores_open_in,
    wait_until,
)


def test_the_tiny_job_runs_on_two_ranks_shows_progress_and_run_again_says_so(run_root):
    r = run_cli("run", "jobs/tiny.yaml", f"output_dir={run_root}", "args.max_steps=20", "args.log_every=10")
    assert r.returncode == 0, r.stderr
    assert "finished on 2 rank(s)" in r.stderr and "finished on" not in r.stdout  # the launcher's: stderr
    assert len(list((run_root / "tiny" / "logs").rglob("stdout.log"))) == 2  # one per rank
    assert (run_root / "tiny" / "job.yaml").exists()
    assert "[rank0]:epoch 0 step 10 loss" in r.stdout and "[rank0]:epoch 1 step 20 loss" in r.stdout
    again = run_cli("run", "jobs/tiny.yaml", f"output_dir={run_root}", "args.max_steps=20")
    assert again.returncode == 0, again.stderr
    assert "already finished: resumed at step 20" in again.stdout and "'loss': None" in again.stderr
    # run ids sort by start time: the second run's logs come last (stacks/ beside them is not a run)
    runs = sorted(p.name for p in (run_root / "tiny" / "logs").iterdir() if p.name[:8].isdigit())
    assert len(runs) == 2 and runs[0] < runs[1] and runs[0][:8].isdigit()


def start_long_job(run_root, *extra, start_new_session=False):
    """The tiny job until it is stopped (its own 2 epochs end after about a second: a signal sent later found
    the job finished, and rank 0's log without a stop line). Short epochs: DataLoader workers start often."""
    return subprocess.Popen(
        launcher_cmd("run", "jobs/tiny.yaml", f"output_dir={run_root}", "args.max_steps=100000",
                     "args.epochs=100000", "args.step_sleep=0.01", "data.num_workers=2", *extra),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=killable_env(run_root.parent), start_new_session=start_new_session,
    )


def ranks_running(proc):
    """The rank processes, once both have DataLoader workers running (children of the rank's fork server)."""
    ranks = rank_pids(proc.pid)
    if len(ranks) == 2 and all(len(descendants(r)) >= 3 for r in ranks):
        return ranks
    return None


def test_sigkill_of_one_rank_ends_the_job_within_5s_without_orphans(run_root):
    proc = start_long_job(run_root)
    try:
        ranks = wait_until(lambda: ranks_running(proc), 90)
        assert ranks, "ranks did not start"
        tree = descendants(proc.pid)
        os.kill(ranks[1], signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(timeout=30)
        elapsed = time.monotonic() - killed
        _, err = proc.communicate()
        assert proc.returncode == 1, err
        assert elapsed < 5, elapsed
        assert "rank 1 failed first" in err and "SIGKILL" in err
        assert wait_until(lambda: not left_behind(tree, ranks), 5), "orphan processes left behind"
    finally:
        proc.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_launcher_stops_every_rank(run_root, sig):
    proc = start_long_job(run_root)
    try:
        ranks = wait_until(lambda: ranks_running(proc), 90)
        assert ranks, "ranks did not start"
        tree = descendants(proc.pid)
        server = [p for p in children_of(proc.pid) if set(children_of(p)) & set(ranks)]  # ranks' fork server
        assert len(server) == 1, server
        # a fork of the launcher (torch imported once), not a fresh interpreter importing torch again
        assert cmdline(server[0]) == cmdline(proc.pid), cmdline(server[0])
        proc.send_signal(sig)
        proc.wait(timeout=30)
        # the ranks' fork server ends with the launcher, not after it (parent-death signal)
        assert not left_behind(server, []), "the fork server outlived the launcher"
        _, err = proc.communicate()
        assert proc.returncode == 128 + sig, (proc.returncode, err)
        assert wait_until(lambda: not left_behind(tree, ranks), 5), "orphan processes left behind"
        # A stop is no failure: one line per console rank, no traceback (Python's KeyboardInterrupt, or the
        # Gloo error of a rank whose peer stopped first), no warning from the agent nor from multiprocessing's
        # resource tracker (which removes the stopped ranks' semaphores).
        assert "Traceback" not in err and "death signal" not in err and "leaked" not in err, err
        assert f"stopped by {sig.name}; all ranks were stopped" in err, err
        if sig == signal.SIGINT:
            # The rank handles the stop itself. Its line reaches the console in most runs; in about 1 of 15
            # under load it was in the rank's log file only (known, not yet explained): check the log.
            logs = list((run_root / "tiny" / "logs").glob("*/attempt_0/0/stderr.log"))
            # DataLoader workers start before the first step: a signal in between is "before the first step".
            assert logs and re.search(r"rank 0 stopped by SIGINT (after step \d+|before the first step)",
                                      logs[0].read_text()), err
    finally:
        proc.kill()


def with_a_helper(job, args: examples.tiny.TinyArgs):
    """Entry point: the tiny job, each rank first starting a helper process of its own (a logging service,
    say) with ``subprocess``, as user code does; its pid goes to ``RUN_DIR/helperRANK.pid``."""
    helper = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL)
    # what torch leaves when a process of the rank is killed while it shares a tensor (made, not yet unlinked)
    Path(f"/dev/shm/torch_{helper.pid}_0_0").touch()
    (job.run_dir / f"helper{os.environ['RANK']}.pid").write_text(str(helper.pid))
    return examples.tiny.main(job, args)


#: Launcher SIGKILLs per case of the test below, each at another moment: a leak that happens 1 time in 15
#: passed one kill 93% of the time.
KILLS = 3


@pytest.mark.parametrize("group, workers", [(True, 2), (False, 0)], ids=["process group, workers", "pid"])
def test_sigkill_of_the_launcher_ends_every_rank_and_worker_within_3s(run_root, group, workers):
    """``kill -9`` of the launcher (or of its process group, as a job controller does): the ranks used to
    train on for up to 75 s, past the run directory's lock, and the group kill left the DataLoader queues'
    semaphores in /dev/shm for good (the resource tracker died with the group). A helper a rank started
    with ``subprocess`` goes too, and multiprocessing's socket folder in the temp directory. Killed
    :data:`KILLS` times at different moments; each rerun resumes from the last checkpoint written."""
    worst, step = 0.0, ""
    for kill in range(KILLS):
        elapsed, killed_after, log = _kill_the_launcher_once(run_root, group, workers)
        worst = max(worst, elapsed)
        # the same data settings: each run resumes from the last checkpoint the killed one wrote
        if step:
            assert _resumed_from(run_root, step) in log, (kill, log[-3000:])
        step = killed_after
    rerun = run_cli("run", "jobs/tiny.yaml", f"output_dir={run_root}", "args.max_steps=1",
                    f"data.num_workers={workers}", "args.epochs=100000", "checkpoint.every_steps=5")
    assert rerun.returncode == 0, rerun.stderr
    assert _resumed_from(run_root, step) in rerun.stdout, rerun.stdout
    print(f"every rank, worker and helper gone at worst {worst:.2f} s after the launcher's SIGKILL "
          f"({KILLS} kills)")


def _resumed_from(run_root, step: str) -> str:
    """What rank 0 says when it resumes from checkpoint ``step`` (``step_00000015.pt``)."""
    return f"resumed from {run_root / 'tiny' / 'checkpoints' / step} (step {int(step[5:-3])},"


def _kill_the_launcher_once(run_root, group: bool, workers: int) -> tuple[float, str, str]:
    """Start the job, SIGKILL its launcher at a random moment after a checkpoint, check that nothing of it
    remains; returns the seconds until all was gone, the last checkpoint's name and rank 0's output."""
    import random

    before = _last_step(run_root)
    proc = start_long_job(run_root, f"data.num_workers={workers}", "entry=tests.test_cli:with_a_helper",
                          "checkpoint.every_steps=5", start_new_session=group)
    try:
        assert wait_until(lambda: len(rank_pids(proc.pid)) == 2 and (
            workers == 0 or ranks_running(proc)), 90), "ranks did not start"
        assert wait_until(lambda: _last_step(run_root) != before, 60), "no checkpoint written"
        time.sleep(random.uniform(0, 1.5))  # another moment of the job each time
        helpers = wait_until(lambda: [int(p.read_text()) for p in (run_root / "tiny").glob("helper*.pid")
                                      if p.read_text()], 30)
        tree = descendants(proc.pid)
        ranks = rank_pids(proc.pid)
        assert len(helpers) == 2 and set(helpers) <= set(tree), (helpers, tree)
        # this job's semaphores only: tests running beside it make their own
        mine = semaphores_open_in(tree)
        assert mine or not workers, "no semaphore of the DataLoader queues found"
        os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()
        killed = time.monotonic()
        gone = wait_until(lambda: not left_behind(tree + helpers, ranks), 3, interval=0.02)
        elapsed = time.monotonic() - killed
        assert gone, [cmdline(p) for p in left_behind(tree + helpers, ranks)]
        # the resource tracker (alone in its group) unlinks them once the last process of the job is gone,
        # and removes multiprocessing's socket folder
        assert wait_until(lambda: not semaphores() & mine, 5), semaphores() & mine
        tmp = run_root.parent / "tmp"
        assert wait_until(lambda: not list(tmp.glob("pymp-*")), 5), list(tmp.glob("pymp-*"))
        # each rank's watcher removes the shared-memory files of its group's processes (the helper's here)
        shm = [Path(f"/dev/shm/torch_{pid}_0_0") for pid in helpers]
        assert wait_until(lambda: not any(p.exists() for p in shm), 5), shm
        step = _last_step(run_root)
        time.sleep(1)
        assert _last_step(run_root) == step, "a rank trained on"
        for p in (run_root / "tiny").glob("helper*.pid"):
            p.unlink()
        newest = max(p for p in (run_root / "tiny" / "logs").iterdir() if p.name[:8].isdigit())
        return elapsed, step, (newest / "attempt_0" / "0" / "stdout.log").read_text()
    finally:
        proc.kill()
        proc.communicate()
        for p in (run_root / "tiny").glob("helper*.pid"):  # a failed run: its fake files go anyway
            Path(f"/dev/shm/torch_{p.read_text()}_0_0").unlink(missing_ok=True)


def _last_step(run_root) -> str:
    """The newest complete checkpoint (its manifest written: a kill during a save leaves a .pt without it,
    which a rerun rightly refuses)."""
    done = (run_root / "tiny" / "checkpoints").glob("step_*.json")
    return max((p.with_suffix(".pt").name for p in done), default="")


def test_ctrl_c_after_the_job_finished_keeps_its_exit_code(run_root):
    # The launcher's shutdown takes a while (torch loaded): a Ctrl-C then used to kill it by SIGINT (-2).
    proc = subprocess.Popen(
        launcher_cmd("run", "jobs/tiny.yaml", f"output_dir={run_root}", "args.max_steps=3"),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        said = []
        for line in proc.stderr:
            said.append(line)
            if "finished on 2 rank(s)" in line:
                proc.send_signal(signal.SIGINT)
                break
        _, err = proc.communicate(timeout=60)
        err = "".join(said) + err
        assert proc.returncode == 0, err
        assert "Traceback" not in err, err
    finally:
        proc.kill()


def test_four_concurrent_jobs_all_succeed(run_root):
    # Two of them with DataLoader workers (their fork servers side by side), two without: on 2 cores each
    # worker server's torch import costs seconds, and what is shared here is ports, folders and names.
    procs = [
        subprocess.Popen(
            launcher_cmd(
                "run", "jobs/tiny.yaml", f"output_dir={run_root}", f"name=job{i}", "args.max_steps=3",
                f"data.num_workers={2 if i < 2 else 0}",
            ),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    results = [p.communicate(timeout=240) + (p.returncode,) for p in procs]
    for out, err, rc in results:
        assert rc == 0, err


def test_torchrun_runs_the_same_job_in_place(run_root):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    r = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "launcher",
            "run",
            "jobs/tiny.yaml",
            f"output_dir={run_root}",
            "args.max_steps=40",
            "args.step_sleep=0.05",
            "distributed.progress_s=0.5",  # no launcher process watches: rank 0 runs the progress line
            "distributed.peak_flops=2e6",  # the MFU on a CPU: a peak given (the tiny model's FLOP/s are ~1e6)
            # With the job's 2 DataLoader workers per rank. One full-suite run once hung here silently: most
            # likely a worker forked from the rank deadlocked (see launcher.data.workerserver). Tight
            # timeouts turn any stuck wait (rendezvous, collective, batch from a worker) into the launcher's
            # own error, with its traceback, well before this test's timeout.
            "distributed.startup_timeout_s=60",
            "distributed.timeout_s=30",
        ],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
        env=killable_env(run_root.parent),
    )
    assert r.returncode == 0, r.stderr
    # In place: no "starting 2 rank(s)" from a nested spawner, and the run directory was written once.
    assert "starting" not in r.stdout + r.stderr
    assert (run_root / "tiny" / "job.yaml").exists()
    # A rank in place leaves at once when done (launcher.rank.process.exit_now): what multiprocessing made is
    # gone first, the socket folder of the workers' fork server included.
    assert not list((run_root.parent / "tmp").glob("pymp-*"))
    # The progress line and perf.jsonl, from rank 0; the ranks' heartbeat folder removed at the end.
    logs = run_root / "tiny" / "logs"
    windows = [json.loads(line) for line in (logs / "perf.jsonl").read_text().splitlines()]
    assert any(len(w["ranks"]) == 2 and w["samples_per_s"] > 0 for w in windows), windows
    measured = [w for w in windows if w["flops_per_s"]]
    assert measured and all(w["mfu"] == round(w["flops_per_s"] / 2e6, 4) for w in measured), windows
    assert "| MFU " in r.stderr and "no MFU" not in r.stderr, r.stderr
    assert "[launcher] step " in r.stderr and " ETA " in r.stderr, r.stderr
    assert not list(logs.glob("heartbeat-*")), list(logs.iterdir())


def fail_once(job, args: "examples.tiny.TinyArgs"):
    """Entry point: the first attempt trains 15 steps, then rank 1 fails; the restarted attempt resumes."""
    import dataclasses

    import launcher

    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        examples.tiny.main(job, dataclasses.replace(args, max_steps=15))
        if launcher.get_rank() == 1:
            raise RuntimeError("first attempt fails on purpose")
        launcher.barrier()  # rank 0 waits here until the agent stops it
    return examples.tiny.main(job, args)


def test_max_restarts_restarts_all_ranks_which_resume(run_root):
    r = run_cli("run", "jobs/tiny.yaml", f"output_dir={run_root}", "entry=tests.test_cli:fail_once",
                "args.max_steps=30", "args.epochs=100", "distributed.max_restarts=1")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and "step_00000015.pt" in r.stdout
    assert "'step': 30" in r.stderr
    no_restart = run_cli(
        "run",
        "jobs/tiny.yaml",
        f"output_dir={run_root}/b",
        "entry=tests.test_cli:fail_once",
        "args.max_steps=30",
        "args.epochs=100",
    )
    assert no_restart.returncode == 1 and "first attempt fails on purpose" in no_restart.stderr
