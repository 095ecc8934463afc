"""The checkpoint folder survives every corruption, a killed save, a full disk and a second job."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from launcher.checkpoint import Checkpointer, CheckpointError, TrainState, verify

from .conftest import ROOT, launcher_cmd, run_cli, wait_until
from .test_checkpoint import Box
from .test_cli import ranks_running, start_long_job


def _saved(tmp_path, steps, keep_last=5):
    box = Box(100)
    ck = Checkpointer(tmp_path, keep_last=keep_last, async_save=False, model=box)
    for step in steps:
        ck.save(TrainState(step=step))
    ck.close()
    return box


@pytest.mark.parametrize("manifest", ["null", "[1, 2]", '"x"', "{}", '{"crc32": 5, "bytes": "9"}', "{"])
def test_a_malformed_manifest_of_any_shape_is_corrupt_and_skipped(tmp_path, manifest):
    _saved(tmp_path, [1, 2])
    (tmp_path / "step_00000002.json").write_text(manifest)
    with pytest.raises(CheckpointError):
        verify(tmp_path / "step_00000002.pt")
    ck = Checkpointer(tmp_path, async_save=False, model=Box(100))
    assert ck.resume("auto").step == 1  # the previous one
    assert (tmp_path / "refused" / "step_00000002.pt").exists()  # moved aside, with the reason
    assert (tmp_path / "refused" / "step_00000002.why.txt").read_text().strip()
    ck.close()


def test_all_checkpoints_corrupt_refuses_to_start_over_silently(tmp_path):
    _saved(tmp_path, [1, 2])
    for step in (1, 2):
        (tmp_path / f"step_{step:08d}.pt").write_bytes(b"garbage")
    ck = Checkpointer(tmp_path, async_save=False, model=Box(100))
    with pytest.raises(CheckpointError, match=r"none is valid[\s\S]*step_00000002.pt[\s\S]*resume=never"):
        ck.resume("auto")
    ck.close()
    assert ck.resume("never").step == 0  # the way out the hint names


def test_all_corrupt_is_refused_by_the_cli_before_any_rank_starts(tmp_path):
    out = tmp_path / "runs"
    assert run_cli("run", "jobs/tiny.yaml", f"output_dir={out}", "args.max_steps=4").returncode == 0
    for p in (out / "tiny" / "checkpoints").glob("step_*.pt"):
        p.write_bytes(b"x" * 10)
    r = run_cli("run", "jobs/tiny.yaml", f"output_dir={out}", "args.max_steps=8")
    assert r.returncode == 2, r.stderr
    assert "none is valid" in r.stderr and "step_00000004.pt" in r.stderr and "resume=never" in r.stderr
    assert "starting" not in r.stdout + r.stderr


def test_retention_never_counts_refused_files_nor_removes_the_newest(tmp_path):
    _saved(tmp_path, [1, 2])
    shutil.copy(tmp_path / "step_00000001.pt", tmp_path / "step_00000099.pt")  # named newer, no manifest
    ck = Checkpointer(tmp_path, keep_last=2, async_save=False, model=Box(100))
    state = ck.resume("auto")
    assert state.step == 2 and not (tmp_path / "step_00000099.pt").exists()
    for step in (3, 4, 5):
        ck.save(TrainState(step=step))
        latest = (tmp_path / "latest").read_text().strip()
        assert latest == f"step_{step:08d}.pt" and (tmp_path / latest).exists()
    ck.close()
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_00000004.pt", "step_00000005.pt"]


def test_temp_files_of_a_killed_save_are_removed_when_the_checkpointer_starts(tmp_path):
    _saved(tmp_path, [1])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".step_00000002.pt.{dead.pid}.tmp"
    stale.write_bytes(b"x" * 1000)
    mine = tmp_path / f".step_00000003.pt.{os.getpid()}.tmp"  # a live process's save in progress: kept
    mine.write_bytes(b"x")
    ck = Checkpointer(tmp_path, async_save=False, model=Box(100))
    assert not stale.exists() and mine.exists()
    ck.close()


DISK_FULL = textwrap.dedent("""
    import sys, torch
    from launcher.checkpoint import Checkpointer, CheckpointError, TrainState
    class Box:
        def __init__(self, n): self.t = torch.zeros(n)
        def state_dict(self): return {"t": self.t}
        def load_state_dict(self, d): self.t = d["t"]
    small = Checkpointer(sys.argv[1], keep_last=5, async_save=False, model=Box(1000))
    small.save(TrainState(step=1)); small.close()
    big = Checkpointer(sys.argv[1], keep_last=5, async_save=False, model=Box(1_000_000))  # 4 MB
    try:
        big.save(TrainState(step=2))
    except CheckpointError as e:
        print("REFUSED", e)
""")


def test_a_full_disk_is_reported_as_such_and_the_previous_checkpoint_survives(tmp_path):
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private tmpfs")
    folder = tmp_path / "small"
    folder.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(DISK_FULL)
    cmd = f"mount -t tmpfs -o size=1m tmpfs {folder} && {sys.executable} {script} {folder} && ls {folder}"
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", cmd], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, check=False,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert "REFUSED" in r.stdout and "no space left on the device" in r.stdout, r.stdout + r.stderr
    assert "needs about 3.8 MB" in r.stdout and "MB are free" in r.stdout
    assert "step_00000001.pt" in r.stdout and ".tmp" not in r.stdout  # the old one stays, no temp file


def test_a_second_job_on_a_run_directory_in_use_is_refused(run_root):
    proc = start_long_job(run_root)
    try:
        assert wait_until(lambda: ranks_running(proc), 90)
        r = subprocess.run(launcher_cmd("run", "jobs/tiny.yaml", f"output_dir={run_root}", "args.lr=0.2"),
                           cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 2, r.stderr
        assert "is in use by another job" in r.stderr and f"pid {proc.pid}" in r.stderr and "HINT" in r.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    # once the holder is gone, the directory is free again (the lock dies with its process)
    r = run_cli("run", "jobs/tiny.yaml", f"output_dir={run_root}", "checkpoint.resume=never",
                "args.max_steps=2", "data.num_workers=0")
    assert r.returncode == 0, r.stderr


def test_a_changed_learning_rate_is_applied_on_resume_not_silently_overridden(tmp_path):
    def build(lr):
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
        return model, opt, sched

    model, opt, sched = build(0.01)
    ck = Checkpointer(tmp_path, async_save=False, model=model, optimizer=opt, scheduler=sched)
    for _ in range(2):
        opt.step()
        sched.step()
    ck.save(TrainState(step=2))
    ck.close()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0025)
    model, opt, sched = build(0.2)  # the job now says lr 0.2
    ck = Checkpointer(tmp_path, async_save=False, model=model, optimizer=opt, scheduler=sched)
    ck.resume("auto")
    ck.close()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)  # the new lr, where the schedule had got to
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * 0.5 ** 3)  # and the schedule goes on from it
    assert json.loads((tmp_path / "step_00000002.json").read_text())["step"] == 2
