"""SLURM: job files to submitit parameters, stop requests, and end to end on the local one-node cluster.

The cluster tests run against the real SLURM daemons started by ``slurm/cluster.sh`` (see the ``slurm_env``
fixture); where the cluster cannot run here (no root, no packages) they are skipped with the script's reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import examples.tiny
import launcher
from launcher import config as config_mod
from launcher.checkpoint import load_checkpoint
from launcher.errors import EXIT_REQUEUE, StopForRequeue
from launcher.launching import slurm
from launcher.rank import stop

from .conftest import ROOT, cluster_cannot_run, cmdline, killable_env, launcher_cmd, wait_until

CLUSTER = ROOT / "slurm" / "cluster.sh"


def tiny(*overrides: str) -> config_mod.Job:
    return config_mod.load(ROOT / "jobs" / "tiny.yaml", list(overrides))


# ------------------------------------------------------------------------------------------ no cluster needed


def test_job_file_maps_to_submitit_parameters():
    job = tiny(
        "slurm.partition=gpu",
        "slurm.account=proj",
        "slurm.qos=high",
        "slurm.nodes=2",
        "slurm.time_min=30",
        "slurm.mem_gb=64",
        "slurm.constraint=a100",
        "slurm.exclusive=true",
        "slurm.comment=hello",
        "slurm.additional_parameters={reservation: big}",
        "slurm.srun_args=[--cpu-bind=none]",
        "slurm.setup=['module load cuda']",
        "slurm.signal_delay_s=120",
    )
    p = slurm.executor_parameters(job)
    assert slurm.srun_args(tiny("slurm.srun_args=[--kill-on-bad-exit=0]")) == ["--kill-on-bad-exit=0"]
    assert p["tasks_per_node"] == 2  # distributed.nproc_per_node on CPU
    assert p["nodes"] == 2 and p["timeout_min"] == 30 and p["mem_gb"] == 64
    assert p["slurm_partition"] == "gpu" and p["slurm_account"] == "proj" and p["slurm_qos"] == "high"
    assert p["slurm_constraint"] == "a100" and p["slurm_exclusive"] is True and p["slurm_comment"] == "hello"
    assert p["slurm_additional_parameters"] == {"reservation": "big"}
    assert p["slurm_srun_args"] == ["--kill-on-bad-exit=1", "--cpu-bind=none"]
    assert p["slurm_setup"] == ["module load cuda"]
    assert p["slurm_signal_delay_s"] == 120
    assert "gpus_per_node" not in p


def test_tasks_per_node_follow_gpus_then_explicit_value():
    assert slurm.tasks_per_node(tiny("slurm.gpus_per_node=4")) == 4
    assert slurm.tasks_per_node(tiny("slurm.gpus_per_node=4", "slurm.tasks_per_node=1")) == 1


def test_sbatch_script_rendered_by_submitit(tmp_path, monkeypatch):
    import submitit

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # no srun needed
    job = tiny(
        "slurm.partition=gpu", "slurm.time_min=30", "slurm.signal_delay_s=120", "slurm.gpus_per_node=2"
    )
    executor = slurm.make_executor(job, tmp_path)
    text = executor._executor._make_submission_file_text("CMD", "uid")
    for line in (
        "--partition=gpu",
        "--time=30",
        "--signal=USR2@120",
        "--ntasks-per-node=2",
        "--gpus-per-node=2",
        "--job-name=tiny",
    ):
        assert f"#SBATCH {line}" in text, text


def test_unknown_slurm_key_lists_valid_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "jobs" / "tiny.yaml").read_text() + "slurm:\n  partitoin: gpu\n")
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.load(bad)
    msg = str(e.value)
    assert str(bad) in msg and "slurm.partitoin" in msg and "partition" in msg and "max_requeues" in msg


def test_sweep_members_get_their_own_run_directories():
    job = tiny("output_dir=/tmp/x", "sweep=[{args.lr: 0.05}, {args.lr: 0.2, seed: 3}]")
    members = slurm.sweep_jobs(job)
    assert [m.args["lr"] for m in members] == [0.05, 0.2] and members[1].seed == 3
    assert [str(m.run_dir) for m in members] == ["/tmp/x/tiny/tiny-0", "/tmp/x/tiny/tiny-1"]
    assert all(m.sweep == [] for m in members)
    cli = slurm.sweep_jobs(job, ["args.lr=1.5", "args.lr=2.5 seed=7"])  # --sweep replaces the file's list
    assert [(m.args["lr"], m.seed) for m in cli] == [(1.5, 0), (2.5, 7)]
    with pytest.raises(config_mod.ConfigError, match="sweep member 1"):
        slurm.sweep_jobs(job, ["args.lr=1", "args.lrr=2"])


def test_a_run_ended_by_node_failure_or_preemption_ends_the_job_only_if_not_requeued(monkeypatch):
    class Job:  # submitit's job with one task that wrote no result
        job_id, num_tasks = "7", 1

        def task(self, rank):
            return type("T", (), {"paths": type("P", (), {"result_pickle": "/nonexistent"})})()

    since: dict[str, float] = {}
    assert not slurm._ended(Job(), {"7": "NODE_FAIL"}, since)  # SLURM requeues it in a moment
    assert not slurm._ended(Job(), {"7": "PENDING"}, since) and not since
    assert slurm._ended(Job(), {"7": "FAILED"}, since)
    monkeypatch.setattr(slurm, "_REQUEUE_WAIT_S", 0.0)
    for state in ("NODE_FAIL", "PREEMPTED"):  # never requeued (not requeueable, PreemptMode=CANCEL): ended
        assert not slurm._ended(Job(), {"7": state}, since)
        time.sleep(0.01)
        assert slurm._ended(Job(), {"7": state}, since)
        since.clear()


def test_submit_without_slurm_says_how_to_get_one(tmp_path, monkeypatch):
    import submitit

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: -1))
    with pytest.raises(launcher.LaunchError, match="slurm/cluster.sh up"):
        slurm.make_executor(tiny(), tmp_path)


def test_should_stop_is_free_outside_slurm():
    assert not stop.installed() and stop.should_stop() is False


@pytest.mark.parametrize("answers, expected", [
    (["fail", "PreemptTime=2026-12-03T07:11:00"], True),  # a controller too busy to answer once
    (["PreemptTime=None"], False),
    (["fail", "fail", "fail", "fail"], False),  # never an answer: said, then taken as not preempted
])
def test_preemption_is_asked_again_when_scontrol_gets_no_answer(tmp_path, monkeypatch, capsys, answers,
                                                                 expected):
    (tmp_path / "answers").write_text("\n".join(answers) + "\n")
    fake = tmp_path / "scontrol"  # each call takes the first answer left; "fail" is a timed-out controller
    fake.write_text(f"#!/bin/sh\na=$(head -1 {tmp_path}/answers); sed -i 1d {tmp_path}/answers\n"
                    'if [ "$a" = fail ] || [ -z "$a" ]; then\n'
                    '  echo "slurm_load_jobs error: Socket timed out" >&2; exit 1\nfi\n'
                    'echo "JobId=7 JobName=x $a"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert stop.preempted("7", timeout_s=3.5) is expected
    said = capsys.readouterr().err
    assert ("could not ask SLURM whether job 7 is preempted (slurm_load_jobs error: Socket timed out)" in said
            ) == (answers[-1] == "fail"), said


def _signal_rank_one_then_agree() -> dict:
    stop.install(max_requeues=0)
    try:
        if launcher.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGUSR2)
            wait_until(lambda: stop.received(), 5)
        agreed = stop.should_stop()
        try:
            stop.exit_for_requeue()
        except StopForRequeue as e:
            return {"agreed": agreed, "code": e.code, "received": sorted(stop.received())}
        return {"agreed": agreed, "code": None}
    finally:
        stop.uninstall()


def test_all_ranks_agree_to_stop_when_one_was_signalled():
    results = launcher.launch(_signal_rank_one_then_agree, nproc=2, backend="gloo")
    assert results[0] == {"agreed": True, "code": EXIT_REQUEUE, "received": []}
    assert results[1] == {"agreed": True, "code": EXIT_REQUEUE, "received": [int(signal.SIGUSR2)]}


# ------------------------------------------------------------------------------------- the local SLURM
# cluster


@pytest.fixture(scope="session")
def slurm_env():
    """Bring the local cluster up (installing packages when missing); remove it again if we started it."""
    was_up = subprocess.run(
        ["bash", str(CLUSTER), "status"], check=False, capture_output=True, text=True
    ).stdout
    already = "slurmctld: running" in was_up
    r = subprocess.run(["bash", str(CLUSTER), "up"], check=False, capture_output=True, text=True, timeout=600)
    if r.returncode == 3:
        cluster_cannot_run(f"no local SLURM cluster: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, f"slurm/cluster.sh up failed:\n{r.stderr}"
    conf = r.stdout.strip().split("=", 1)[1]
    env = {**os.environ, "SLURM_CONF": conf}
    yield env
    if not already:
        # Daemons and state.
        subprocess.run(["bash", str(CLUSTER), "clean"], check=False, capture_output=True, timeout=120)


@pytest.fixture
def job_env(slurm_env, tmp_path):
    """The cluster's environment with the jobs' temp files in the test's own folder: a rank that SLURM ends by
    signal cannot remove the socket folder of its DataLoader workers' fork server."""
    return {**slurm_env, "TMPDIR": killable_env(tmp_path)["TMPDIR"]}


def _processes_naming(folder: Path) -> list[str]:
    """Command lines of the running processes that name ``folder`` (a cluster's daemons name their state
    folder in their arguments or, for SLURM's, in the SLURM_CONF they were started with)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            environ = (proc / "environ").read_bytes().decode(errors="replace")
            if str(folder) in cmdline(int(proc.name)) + environ and proc.name != str(os.getpid()):
                found.append(f"{proc.name}: {cmdline(int(proc.name))}")
    return found


def _other_cluster(folder: Path) -> dict[str, str]:
    """The environment of a one-node cluster in ``folder``, with ports no other test's cluster uses."""
    base = 17817 + 4 * (os.getpid() % 50)
    return {**os.environ, "LAUNCHER_SLURM_DIR": str(folder), "LAUNCHER_SLURM_PORT_BASE": str(base)}


def _script(env: dict[str, str], command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CLUSTER), command], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_down_leaves_alone_a_process_that_took_a_dead_daemons_pid(tmp_path):
    """Pids wrap around at 32768 on the CI machines: the pid file of a daemon that died may name another
    process by now (one of a test's DataLoader workers, beside the cluster's tests), and ``down`` killed it.
    A pid file's process must have started before the file was written."""
    (tmp_path / "munge").mkdir()
    pidfile = tmp_path / "munge" / "munged.pid"
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        pidfile.write_text(f"{stranger.pid}\n")
        os.utime(pidfile, (time.time() - 60,) * 2)  # the daemon wrote it a minute before `sleep` started
        r = _script({**os.environ, "LAUNCHER_SLURM_DIR": str(tmp_path)}, "down")
        assert r.returncode == 0 and stranger.poll() is None, (r.stdout, r.stderr, stranger.returncode)
        # a daemon's own pid file (a process that is not this one's child, as daemons are): stopped as before
        started = ["bash", "-c", "sleep 60 > /dev/null 2>&1 & echo $!"]
        daemon = int(subprocess.run(started, capture_output=True, text=True, check=True).stdout)
        pidfile.write_text(f"{daemon}\n")
        r = _script({**os.environ, "LAUNCHER_SLURM_DIR": str(tmp_path)}, "down")
        assert r.returncode == 0 and not cmdline(daemon) and not pidfile.exists(), r.stderr
    finally:
        stranger.kill()
        stranger.wait()


def test_a_failed_up_stops_the_daemons_it_started_at_once(slurm_env, tmp_path):
    """MariaDB's port is taken: it exits at once, `up` fails at once (not after its 30-s wait) and stops the
    munge daemon it had started. Once the port is free `up` starts the cluster, and `down` (which takes the
    state folder's lock, held by no daemon) stops it."""
    env = {**_other_cluster(tmp_path / "cluster"), "LAUNCHER_SLURM_LOCK_WAIT_S": "5"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(env["LAUNCHER_SLURM_PORT_BASE"]) + 3))
        taken.listen()  # a client connecting here hangs unless it has a timeout
        started = time.monotonic()
        r = _script(env, "up")
        took = time.monotonic() - started
    assert r.returncode == 1, r.stderr
    assert "MariaDB exited; last lines of" in r.stderr and "Address already in use" in r.stderr, r.stderr
    assert "up failed: stopping what it started (munged.pid mariadb.pid)" in r.stderr, r.stderr
    assert took < 25, f"up took {took:.0f} s to fail"
    assert _processes_naming(tmp_path / "cluster") == []
    try:
        r = _script(env, "up")
        assert r.returncode == 0, r.stderr
    finally:
        r = _script(env, "down")
    assert r.returncode == 0, r.stderr
    assert _processes_naming(tmp_path / "cluster") == []


def test_up_waits_for_the_lock_of_its_state_folder_and_says_who_holds_it(slurm_env, tmp_path):
    folder = tmp_path / "cluster"
    folder.mkdir()
    env = {**_other_cluster(folder), "LAUNCHER_SLURM_LOCK_WAIT_S": "2"}
    with (folder / ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another `up` (or `down`) at work on this folder
        started = time.monotonic()
        r = _script(env, "up")
        took = time.monotonic() - started
    assert r.returncode == 1, r.stderr
    held_by_another = f"{folder} is in use by another cluster.sh (its lock {folder}/.lock was not free in 2s)"
    assert held_by_another in r.stderr, r.stderr
    assert 2 <= took < 10
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # nothing written, nothing started
    assert _processes_naming(folder) == []


def submit(env, run_root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        launcher_cmd("submit", "jobs/tiny.yaml", f"output_dir={run_root}", "slurm.time_min=5", *args),
        cwd=ROOT,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sacct(env, job_id: str, fields: str = "State,ExitCode") -> list[str]:
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-D", "-o", fields], env=env,
                         capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()


def job_id_of(output: str) -> str:
    m = re.search(r"submitted SLURM job (\d+)", output)
    assert m is not None, output
    return m.group(1)


def test_submit_wait_trains_on_two_tasks(job_env, run_root):
    r = submit(job_env, run_root, "args.max_steps=12", "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "finished on 2 rank(s)" in r.stdout and "'world_size': 2" in r.stdout and "'step': 12" in r.stdout
    assert (run_root / "tiny" / "slurm_logs" / f"{job_id_of(r.stdout)}_1_log.out").exists()  # rank 1 ran too
    ckpt = load_checkpoint(run_root / "tiny" / "checkpoints" / "step_00000012.pt")
    assert ckpt["world_size"] == 2


def test_srun_launcher_run_inside_an_allocation(job_env, run_root):
    r = subprocess.run(
        [
            "srun",
            "-n",
            "2",
            "--time=3",
            *launcher_cmd("run"),  # the README's `srun ... launcher run`: the installed command
            "jobs/tiny.yaml",
            f"output_dir={run_root}",
            "args.max_steps=6",
        ],
        cwd=ROOT,
        env=job_env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    ckpt = load_checkpoint(run_root / "tiny" / "checkpoints" / "step_00000006.pt")
    assert ckpt["world_size"] == 2


def test_external_requeue_saves_at_the_step_boundary_and_resumes(job_env, run_root):
    proc = subprocess.Popen(
        launcher_cmd(
            "submit",
            "jobs/tiny.yaml",
            f"output_dir={run_root}",
            "slurm.time_min=5",
            "args.max_steps=40",
            "args.epochs=100",
            "args.step_sleep=0.2",
            "checkpoint.every_steps=10",
            "distributed.strategy=fsdp",  # the sharded writer on the requeue path (DDP's: the next test)
            "--wait",
        ),
        cwd=ROOT,
        env=job_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ckpts = run_root / "tiny" / "checkpoints"
        assert wait_until(lambda: (ckpts / "latest").exists(), 120), "no first checkpoint"  # mid-run, step 10
        log = next((run_root / "tiny" / "slurm_logs").glob("*_0_log.out"))
        job_id = log.name.split("_")[0]
        subprocess.run(["scontrol", "requeue", job_id], env=job_env, check=True, timeout=30)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, out + err
    stopped = int(re.search(r"stop requested at step (\d+)", out).group(1))
    resumed = int(re.search(r"resumed from .*step_(\d+)\.dcp", out).group(1))
    assert 10 < stopped < 40 and resumed == stopped  # saved at the step boundary: nothing beyond it lost
    assert "'step': 40" in out
    # --wait returns once both ranks wrote their results; SLURM marks the job completed a moment later.
    assert wait_until(lambda: sacct(job_env, job_id)[-1].startswith("COMPLETED"), 60), sacct(
        job_env, job_id
    )
    assert sacct(job_env, job_id)[0].startswith("REQUEUED")


def test_time_limit_signal_requeues_until_max_requeues(job_env, run_root):
    # A 1-minute limit with the signal 15 s before it: USR2 arrives while training, not during start-up
    # (SLURM may send it early), before any handler exists. One requeue is allowed. The requeued run gets its
    # USR2 from `scancel --signal` instead of waiting out a second limit (the same signal to the same tasks).
    proc = subprocess.Popen(
        launcher_cmd("submit", "jobs/tiny.yaml", f"output_dir={run_root}", "slurm.time_min=1",
                     "slurm.signal_delay_s=15", "slurm.max_requeues=1", "args.max_steps=100000",
                     "args.epochs=100000", "args.step_sleep=0.3", "checkpoint.every_steps=10", "--wait"),
        cwd=ROOT, env=job_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        logs, latest = run_root / "tiny" / "slurm_logs", run_root / "tiny" / "checkpoints" / "latest"
        assert wait_until(lambda: any(logs.glob("*.requeues")), 150, interval=0.5), "no time-limit requeue"
        saved_at_stop = latest.read_text()
        # a checkpoint of the requeued run: it is training, with its stop handlers in place
        assert wait_until(lambda: latest.read_text() != saved_at_stop, 120, interval=0.5), saved_at_stop
        job_id = next(logs.glob("*.requeues")).name.split(".")[0]
        subprocess.run(["scancel", "--signal=USR2", job_id], env=job_env, check=True, timeout=30)
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_REQUEUE, out + err
    assert "SIGUSR2: state saved; requeued job" in err and "(1/1 for the time limit)" in err
    assert "NOT requeued" in err and "slurm.max_requeues=1" in err
    stops = [int(s) for s in re.findall(r"stop requested at step (\d+)", out)]
    resumed = [int(s) for s in re.findall(r"resumed from .*step_(\d+)\.pt", out)]
    assert len(stops) == 2 and resumed == stops[:1] and stops[1] > stops[0]
    assert f"step_{stops[1]:08d}.pt" in (run_root / "tiny" / "checkpoints" / "latest").read_text()


def fail_on_rank_one(job: config_mod.Job) -> str:
    """Entry point for the failure test: rank 1 raises, rank 0 returns."""
    if launcher.get_rank() == 1:
        raise ValueError("boom on rank 1")
    return "ok"


def test_failing_job_shows_its_traceback_and_is_not_requeued(job_env, run_root):
    started = time.monotonic()
    r = submit(job_env, run_root, "entry=tests.test_slurm:fail_on_rank_one", "--wait")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "ValueError: boom on rank 1" in r.stderr and "rank 1 failed first" in r.stderr
    job_id = job_id_of(r.stdout)
    # One row with duplicates shown (-D): the job ran once, never requeued.
    assert wait_until(lambda: sacct(job_env, job_id) == ["FAILED|1:0"], 60), sacct(job_env, job_id)
    assert time.monotonic() - started < 120


def raise_mid_training(job: config_mod.Job, args: examples.tiny.TinyArgs) -> object:
    """The tiny job, where rank 1 raises after step ``RAISE_AT`` (environment) with its DataLoader workers
    running."""
    import examples.tiny

    at = int(os.environ.get("RAISE_AT", "3"))
    if launcher.get_rank() == 1:
        real_step = launcher.Checkpointer.step

        def step(self, state, metric=None):
            real_step(self, state, metric)
            if state.step == at:
                raise RuntimeError(f"boom on rank 1 after step {at}")

        launcher.Checkpointer.step = step  # type: ignore[method-assign]
    return examples.tiny.main(job, args)


@pytest.mark.parametrize("at, samples", [(3, 20000), (14, 512)], ids=["mid-epoch", "epoch-boundary"])
def test_a_rank_raising_with_workers_ends_the_slurm_job_within_seconds(job_env, run_root, at, samples):
    started = time.monotonic()
    r = submit({**job_env, "RAISE_AT": str(at)}, run_root, "entry=tests.test_slurm:raise_mid_training",
               "data.num_workers=2", "args.max_steps=1000", "args.epochs=3", f"args.num_samples={samples}",
               "--wait")
    took = time.monotonic() - started
    assert r.returncode == 1, r.stdout + r.stderr
    assert "rank 1 failed first" in r.stderr and f"boom on rank 1 after step {at}" in r.stderr, r.stderr
    job_id = job_id_of(r.stdout)
    assert wait_until(lambda: sacct(job_env, job_id) == ["FAILED|1:0"], 30), sacct(job_env, job_id)
    queue = subprocess.run(["squeue", "-h", "-j", job_id], env=job_env, capture_output=True, text=True,
                           check=False).stdout
    assert not queue.strip(), queue
    print(f"submit --wait returned {took:.1f} s after submission")
    assert took < 90, took


@contextlib.contextmanager
def held_by_another_job(run_dir: Path) -> Iterator[None]:
    """The run directory's lock held as a job would hold it, naming "pid 1 on elsewhere"."""
    import fcntl

    with open(run_dir / ".lock", "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("pid 1 on elsewhere, since the test began")
        holder.flush()
        yield


def test_a_rank_failing_before_the_process_group_forms_ends_the_job_within_seconds(job_env, run_root):
    """Rank 0 finds the run directory taken when it starts (a job on it started after this one was
    submitted) and fails before the process group forms; rank 1 waits there. srun's --kill-on-bad-exit ends
    it (SLURM's KillWait later, 15 s here): before, rank 1 waited the 10-minute start-up bound."""
    proc = subprocess.Popen(
        launcher_cmd("submit", "jobs/tiny.yaml", f"output_dir={run_root}", "slurm.time_min=5",
                     "data.num_workers=0", "--wait"),
        cwd=ROOT, env=job_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()  # "submitted SLURM job N": the ranks start seconds later
        submitted = time.monotonic()
        with held_by_another_job(run_root / "tiny"):  # raises if rank 0 got there first
            out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:  # failed: nothing of this job may wait on into the next test
            proc.kill()
            job_id = re.search(r"SLURM job (\d+)", first)
            if job_id:
                subprocess.run(["scancel", job_id.group(1)], env=job_env, check=False, timeout=30)
    took = time.monotonic() - submitted
    out = first + out
    assert proc.returncode == 1, out + err
    assert "rank 0 failed first" in err and "is in use by another job (pid 1 on elsewhere" in err, err
    print(f"submit --wait returned {took:.1f} s after submission")
    assert took < 60, took
    assert wait_until(lambda: sacct(job_env, job_id_of(out))[0].startswith("FAILED"), 30)
    # submitting again while a job holds the directory is refused at once, with no job queued
    with held_by_another_job(run_root / "tiny"):
        again = submit(job_env, run_root)
    assert again.returncode == 2 and "is in use by another job (pid 1 on elsewhere" in again.stderr, again
    assert "submitted" not in again.stdout, again.stdout


def test_sweep_runs_as_an_array_with_one_run_directory_each(job_env, run_root):
    r = submit(job_env, run_root, "args.max_steps=4", "data.num_workers=0", "--sweep", "args.lr=0.01",
               "--sweep", "args.lr=0.02", "--sweep", "args.lr=0.03 seed=5", "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "as an array of 3" in r.stdout
    for i, lr in enumerate((0.01, 0.02, 0.03)):
        job = config_mod.load(run_root / "tiny" / f"tiny-{i}" / "job.yaml")
        assert job.args["lr"] == lr and (run_root / "tiny" / f"tiny-{i}" / "checkpoints" / "latest").exists()
        assert f"tiny-{i}: SLURM job" in r.stdout
    rows = sacct(job_env, job_id_of(r.stdout) + "", "JobID,State")
    assert sorted(row.split("|")[0] for row in rows)[-3:] == [f"{job_id_of(r.stdout)}_{i}" for i in range(3)]
