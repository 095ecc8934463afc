"""A user's bad day (issue 41): a shared checkpoint folder, a read-only or full disk, a broken environment,
a closed pipe, a stop while a checkpoint is being written. Each through the installed ``launcher`` command.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import examples.tiny

from .conftest import ROOT, killable_env, launcher_cmd, long_tmpdir, run_cli, wait_until
from .test_cli import start_long_job

#: Seconds the slowed checkpoint writer of :func:`slow_writes` takes per checkpoint.
SLOW_WRITE_S = 2.5


def slow_writes(job, args: examples.tiny.TinyArgs):
    """Entry point: the tiny job whose background checkpoint writes take :data:`SLOW_WRITE_S` each, saying
    when one starts (a stop can then land while a write is in flight)."""
    from launcher.checkpoint import checkpointer

    write = checkpointer.Checkpointer._write

    def slow(self, path, payload, is_best):
        print(f"[test] writing {path.name}", flush=True)
        time.sleep(SLOW_WRITE_S)
        return write(self, path, payload, is_best)

    checkpointer.Checkpointer._write = slow  # type: ignore[method-assign]
    return examples.tiny.main(job, args)


def _needs_private_mounts():
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private tmpfs")


def _in_private_mount(script: str, *args: str, timeout: float = 120,
                      env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``script`` (sh) in a mount namespace of its own: its tmpfs mounts vanish with it."""
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False, env=env)


def test_two_jobs_sharing_a_checkpoint_folder_are_refused_while_one_runs(tmp_path):
    shared = tmp_path / "shared-checkpoints"
    first = start_long_job(tmp_path / "runs", "name=a", f"checkpoint.dir={shared}",
                           "checkpoint.every_steps=5")
    try:
        assert wait_until(lambda: (shared / "latest").exists(), 90), "the first job saved nothing"
        r = run_cli("run", "jobs/tiny.yaml", f"output_dir={tmp_path / 'runs'}", "name=b",
                    f"checkpoint.dir={shared}", timeout=120)
        assert r.returncode == 2, r.stdout + r.stderr
        said = f"the checkpoint folder {shared} is in use by another job (pid {first.pid}"
        assert said in r.stderr, r.stderr
        assert "HINT: give each job a checkpoint.dir of its own" in r.stderr and "Traceback" not in r.stderr
        assert "starting" not in r.stderr  # refused before any rank started or resumed anything
        # `launcher submit` refuses at once too (not hours later in the queue)
        from launcher import config, rundir
        from launcher.errors import UsageError

        job = config.load(ROOT / "jobs" / "tiny.yaml", [f"output_dir={tmp_path / 'runs'}", "name=c",
                                                         f"checkpoint.dir={shared}"])
        with pytest.raises(UsageError, match="checkpoint folder .* is in use by another job"):
            rundir.check_job_free(job)
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
    # once the first job has ended, the second takes the folder and resumes from the first's checkpoint
    r = run_cli("run", "jobs/tiny.yaml", f"output_dir={tmp_path / 'runs'}", "name=b",
                f"checkpoint.dir={shared}", "checkpoint.allow_changes=true", "args.max_steps=100000",
                "args.epochs=1", timeout=180)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout + r.stderr


READ_ONLY = """
mount -t tmpfs -o ro,size=1m tmpfs "$1"
exec {launcher} run jobs/tiny.yaml output_dir="$2" checkpoint.dir="$1/ck" checkpoint.every_steps=100000
"""
FULL = """
mount -t tmpfs -o size=64k tmpfs "$1"
dd if=/dev/zero of="$1/filler" bs=4k count=100 2>/dev/null
{launcher} run jobs/tiny.yaml output_dir="$1" "$2"
code=$?; ls -A "$1"; exit $code
"""


@pytest.mark.parametrize("case", ["read-only checkpoint.dir", "full disk", "full disk under torchrun"])
def test_a_disk_that_cannot_be_written_is_refused_before_the_start(tmp_path, case):
    _needs_private_mounts()
    (tmp_path / "mnt").mkdir()
    if case == "read-only checkpoint.dir":
        r = _in_private_mount(READ_ONLY.format(launcher=launcher_cmd()[0]), str(tmp_path / "mnt"),
                              str(tmp_path / "runs"))
        named = f"checkpoint.dir: cannot make {tmp_path / 'mnt' / 'ck'} ({tmp_path / 'mnt'} is on a read-only"
    else:
        r = _in_private_mount(FULL.format(launcher=launcher_cmd()[0]), str(tmp_path / "mnt"), "name=d")
        named = "output_dir: no space left on the device"
        if case == "full disk under torchrun":  # the rank takes the run directory itself
            r = _in_private_mount(FULL.format(launcher=f"{Path(launcher_cmd()[0]).with_name('torchrun')} "
                                              "--standalone --nproc-per-node 1 -m launcher"),
                                  str(tmp_path / "mnt"), "name=d",
                                  env=killable_env(tmp_path))  # torchrun's log folder: not in /tmp
    assert r.returncode == 2 or (case.endswith("torchrun") and r.returncode == 1), r.stdout + r.stderr
    assert named in r.stderr and "HINT" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr or case.endswith("torchrun"), r.stderr  # torchrun prints its own
    assert "starting" not in r.stdout + r.stderr
    if case == "full disk":
        assert r.stdout.split() == ["filler"], r.stdout  # no run directory, lock or temp file left
    if case == "read-only checkpoint.dir":
        assert not (tmp_path / "runs").exists()


def test_a_cleanup_error_never_hides_the_error_it_cleans_up_after(tmp_path, monkeypatch):
    """The temp file of a failed save cannot be removed (EROFS): the save's own error is the one raised."""
    from launcher.checkpoint import files

    def fail_save(obj, path):
        raise OSError(30, "Read-only file system", path)

    def fail_unlink(self, missing_ok=False):
        raise OSError(30, "Read-only file system", str(self))

    monkeypatch.setattr(files.torch, "save", fail_save)
    monkeypatch.setattr(Path, "unlink", fail_unlink)
    with pytest.raises(OSError) as e:
        files.atomic_write_bytes(tmp_path / "step_00000001.pt", obj={"a": 1})
    assert e.value.errno == 30 and e.value.filename.endswith(".tmp") and e.value.__context__ is None


def test_every_kind_of_bad_omp_num_threads_is_told_from_a_thread_count():
    from launcher import env

    bad = ["", " ", "abc", "0", "-1", "1e9", "4.0", "99999", str(env.MAX_THREADS + 1)]
    assert [env.thread_count(v) for v in bad] == [None] * len(bad)
    assert [env.thread_count(v) for v in ("1", " 8 ", str(env.MAX_THREADS))] == [1, 8, env.MAX_THREADS]


# End to end, a value that does not parse and one too large (it failed at the fork); the others: above.
# Each with a TMPDIR too long for a socket path in it: every start failed with "AF_UNIX path too long" (the
# fork servers of the ranks and of their DataLoader workers; torchrun's spawned ranks need no socket).
@pytest.mark.parametrize("value", ["abc", "99999"])
def test_a_bad_omp_num_threads_or_a_long_tmpdir_is_no_reason_to_fail(tmp_path, value):
    env = {**os.environ, "OMP_NUM_THREADS": value, "TMPDIR": str(long_tmpdir(tmp_path))}
    r = run_cli("run", "jobs/tiny.yaml", f"output_dir={tmp_path}", "args.max_steps=2", "data.num_workers=1",
                env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"warning: OMP_NUM_THREADS={value!r} is not a thread count" in r.stderr, r.stderr
    assert r.stderr.count("[launcher] warning: OMP_NUM_THREADS") == 1, r.stderr  # once, not per rank


def test_a_stop_waits_for_the_checkpoint_write_in_flight_and_the_rerun_resumes_from_it(tmp_path):
    """Ctrl-C or SIGTERM while the background write runs: the rank says so, waits for it (bounded by
    distributed.stop_grace_s), and the rerun resumes from that checkpoint instead of the one before."""
    worst = 0.0
    for sig in (signal.SIGINT, signal.SIGTERM):
        run_root = tmp_path / sig.name
        proc = start_long_job(run_root, "entry=tests.test_bad_day:slow_writes", "checkpoint.every_steps=30",
                              "data.num_workers=0")
        try:
            line = ""
            assert proc.stdout is not None
            while "[test] writing step_00000030.pt" not in line:  # without the wait: no checkpoint at all
                line = proc.stdout.readline()
                assert line, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.5)
            proc.send_signal(sig)
            sent = time.monotonic()
            _, err = proc.communicate(timeout=60)
            took = time.monotonic() - sent
            worst = max(worst, took)
        finally:
            proc.kill()
        assert proc.returncode == 128 + sig, (proc.returncode, err)
        assert "waiting for the checkpoint write in flight (step_00000030.pt)" in err, err
        assert "step_00000030.pt is on disk" in err, err
        assert took < SLOW_WRITE_S + 5, took  # waited for the write, not for the SIGKILL
        ckpts = run_root / "tiny" / "checkpoints"
        assert (ckpts / "latest").read_text() == "step_00000030.pt"
        r = run_cli("run", "jobs/tiny.yaml", f"output_dir={run_root}", "args.max_steps=31",
                    "args.epochs=100000", "data.num_workers=0")
        assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout + r.stderr
        assert "(step 30," in r.stdout, r.stdout
    print(f"stop with a write in flight: worst {worst:.2f} s to exit")


def test_the_change_list_on_resume_shows_the_default_an_absent_args_key_takes(tmp_path):
    r = run_cli("run", "jobs/tiny.yaml", f"output_dir={tmp_path}", "args.step_sleep=0.001",
                "args.max_steps=4", "data.num_workers=0", "checkpoint.every_steps=2")
    assert r.returncode == 0, r.stderr
    r = run_cli("run", "jobs/tiny.yaml", f"output_dir={tmp_path}", "args.max_steps=6", "data.num_workers=0",
                "checkpoint.every_steps=2")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout + r.stderr
    assert "args.step_sleep: 0.001 -> 0.0" in r.stdout and "None" not in r.stdout, r.stdout


@pytest.mark.parametrize("streams", ["stdout", "stdout and stderr"])
def test_a_reader_that_stops_reading_is_not_a_failed_job(tmp_path, streams):
    """``launcher run ... | head -3``: the job goes on to its end, exit 0, its checkpoints all written."""
    both = "2>&1" if streams == "stdout and stderr" else f"2> {tmp_path / 'err'}"
    script = (f"{launcher_cmd()[0]} run jobs/tiny.yaml output_dir={tmp_path} args.log_every=1 "
              f"args.max_steps=60 args.epochs=20 data.num_workers=0 {both} | head -3; "
              "exit ${PIPESTATUS[0]}")
    r = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=180,
                       check=False)
    err = (tmp_path / "err").read_text() if (tmp_path / "err").exists() else ""
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr, err)
    assert len(r.stdout.splitlines()) == 3 and "Traceback" not in err + r.stderr, (r.stdout, err)
    assert (tmp_path / "tiny" / "checkpoints" / "latest").read_text() == "step_00000060.pt"


def _states(pids: list[int]) -> set[str]:
    from launcher.launching.failures import process_state

    return {process_state(p) for p in pids}


def rank_one_slower(job, args: examples.tiny.TinyArgs):
    """Entry point: the tiny job with rank 1's forward 0.2 s slower: rank 0 is nearly always waiting for it
    in a collective."""
    import launcher

    if launcher.get_rank() == 1:
        forward = torch.nn.Sequential.forward

        def slower(self, x):
            time.sleep(0.2)
            return forward(self, x)

        torch.nn.Sequential.forward = slower  # type: ignore[method-assign]
    return examples.tiny.main(job, args)


def test_ctrl_z_stops_the_ranks_with_the_launcher_and_fg_continues_them(tmp_path):
    from .conftest import descendants, left_behind, rank_pids

    # A stop longer than the collective timeout while rank 0 waits for rank 1 in a collective: without the
    # ranks stopping at one step boundary first, rank 0's wait timed out right after `fg`.
    proc = start_long_job(tmp_path / "runs", "checkpoint.every_steps=5", "distributed.timeout_s=4",
                          "entry=tests.test_bad_day:rank_one_slower")
    ckpts = tmp_path / "runs" / "tiny" / "checkpoints"
    try:
        assert wait_until(lambda: (ckpts / "latest").exists(), 90), "no checkpoint"
        ranks = rank_pids(proc.pid)
        tree = [p for p in descendants(proc.pid) if p not in ranks]
        proc.send_signal(signal.SIGTSTP)  # what the terminal sends on Ctrl-Z
        assert wait_until(lambda: _states([proc.pid, *ranks]) == {"T"}, 5), _states([proc.pid, *ranks])
        logs = tmp_path / "runs" / "tiny" / "logs"
        waiting = [p.read_text() for p in sorted(logs.glob("heartbeat-*/paused-rank*"))]
        assert len(waiting) == 2 and waiting[0] == waiting[1], waiting  # both after the same step
        latest = (ckpts / "latest").read_text()
        time.sleep(9)
        assert (ckpts / "latest").read_text() == latest, "the ranks trained on while the launcher was stopped"
        assert "R" not in _states(tree), "a worker ran on"
        proc.send_signal(signal.SIGCONT)  # `fg`
        assert wait_until(lambda: (ckpts / "latest").read_text() != latest, 30), "the ranks did not go on"
        # Ctrl-Z again, then `kill -9 %1`: nothing of the job may stay behind, stopped or not (each rank's
        # watcher used to be stopped with its group, and kept what the rank had started, stopped, for good)
        proc.send_signal(signal.SIGTSTP)
        assert wait_until(lambda: _states([proc.pid, *ranks]) == {"T"}, 5), _states([proc.pid, *ranks])
        tree = descendants(proc.pid)
        proc.kill()
        _, err = proc.communicate(timeout=60)
        assert wait_until(lambda: not left_behind(tree, ranks), 5), [(p, _states([p])) for p in
                                                                     left_behind(tree, ranks)]
        assert "Timed out" not in err and "stopped making progress" not in err, err
    finally:
        proc.kill()


def test_a_run_directory_removed_under_a_running_job_is_made_again_and_the_job_goes_on(tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    proc = start_long_job(tmp_path / "runs", "checkpoint.every_steps=10")
    try:
        assert wait_until(lambda: (run_dir / "checkpoints" / "latest").exists(), 90), "no checkpoint"
        shutil.rmtree(run_dir)
        assert wait_until(lambda: (run_dir / "checkpoints" / "latest").exists(), 30), "no checkpoint after"
        saved = (run_dir / "checkpoints" / "latest").read_text()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "was removed while this job ran: the job goes on" in err, err
    finally:
        proc.kill()
    r = run_cli("run", "jobs/tiny.yaml", f"output_dir={tmp_path / 'runs'}",
                f"args.max_steps={int(saved[5:13])}", "args.epochs=100000")
    assert r.returncode == 0 and f"resumed from {run_dir / 'checkpoints' / saved}" in r.stdout, r.stdout


def test_a_job_whose_run_directory_another_job_took_while_it_was_stopped_stops(tmp_path):
    """Ctrl-Z, the run directory removed, a second job of the same name started: on ``fg`` the first job
    finds its folder taken and stops its ranks, exit 1, instead of both jobs writing one folder."""
    from .conftest import left_behind, rank_pids

    run_dir = tmp_path / "runs" / "tiny"
    first = start_long_job(tmp_path / "runs", "checkpoint.every_steps=10")
    second = None
    try:
        assert wait_until(lambda: (run_dir / "checkpoints" / "latest").exists(), 90), "no checkpoint"
        ranks = rank_pids(first.pid)
        first.send_signal(signal.SIGTSTP)
        assert wait_until(lambda: _states([first.pid]) == {"T"}, 5)
        shutil.rmtree(run_dir)
        second = start_long_job(tmp_path / "runs", "checkpoint.every_steps=10")
        assert wait_until(lambda: (run_dir / "checkpoints" / "latest").exists(), 90), "second: no checkpoint"
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=60)
        assert first.returncode == 1, err
        assert f"the run directory {run_dir} was removed while this job ran, and it could not be taken" in err
        assert "another job holds it now; this job's ranks were stopped" in err and "HINT" in err, err
        assert wait_until(lambda: not left_behind([], ranks), 5)
        assert second.poll() is None, "the second job must go on"
    finally:
        first.kill()
        if second is not None:
            second.send_signal(signal.SIGINT)
            second.communicate(timeout=60)


def fails_in_a_removed_run_directory(job, args: examples.tiny.TinyArgs):
    """Entry point: rank 0 removes the run directory, then raises."""
    import launcher

    launcher.barrier()
    if launcher.get_rank() == 0:
        shutil.rmtree(job.run_dir)
        raise RuntimeError("boom after the run directory went")
    launcher.barrier()


def test_a_failure_in_a_removed_run_directory_is_reported_with_its_traceback(tmp_path):
    r = run_cli("run", "jobs/tiny.yaml", f"output_dir={tmp_path}", "data.num_workers=0",
                "entry=tests.test_bad_day:fails_in_a_removed_run_directory", "distributed.timeout_s=30")
    assert r.returncode == 1, r.stderr
    assert "RuntimeError: boom after the run directory went" in r.stderr, r.stderr
    assert "To enable traceback" not in r.stderr, r.stderr


def test_under_ci_a_cluster_that_cannot_start_fails_instead_of_skipping(monkeypatch):
    """A bad package mirror made ``slurm/cluster.sh`` exit 3 and every cluster test a skip of a green run."""
    from .conftest import cluster_cannot_run

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI: the SLURM cluster could not start: apt-get"):
        cluster_cannot_run("apt-get install failed")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        cluster_cannot_run("no root")


def test_a_stop_landing_in_torchs_metrics_wrapper_stays_a_stop(monkeypatch):
    """torch elastic's ``prof`` wrapper reads ``start`` in a ``finally``: a SignalException raised before
    ``start`` is set became an UnboundLocalError (a stopped job exited 1 with a traceback)."""
    import signal as signals

    from torch.distributed.elastic.metrics import api
    from torch.distributed.elastic.multiprocessing import SignalException

    from launcher.launching.local import stop_behind

    def stopped() -> float:
        raise SignalException("launcher got SIGINT", sigval=signals.SIGINT)

    import types

    # the signal lands on the wrapper's first line (the module's own `time`, not the process-wide one)
    monkeypatch.setattr(api, "time", types.SimpleNamespace(time=stopped))
    with pytest.raises(UnboundLocalError) as e:
        api.prof(lambda: None)()
    assert isinstance(stop_behind(e.value), SignalException)  # the trap is still there, and handled
    assert stop_behind(UnboundLocalError("mine")).args == ("mine",)
