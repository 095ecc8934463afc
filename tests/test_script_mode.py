"""An existing torchrun script runs unchanged under ``launcher run``: success, a raise on rank 1, a job file.

``tests/scripts/ddp_tutorial.py`` is written the way PyTorch's DDP tutorial writes one (argparse positional
arguments, ``init_process_group`` at the top, ``LOCAL_RANK`` from the environment, ``DistributedSampler``, a
snapshot file, ``destroy_process_group`` at the end); nothing in it knows about the launcher.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT, launcher_cmd, torchrun_finished

SCRIPT = ROOT / "examples" / "ddp_tutorial.py"


def _env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp_path / "tmp")}


def _result(out: str) -> str:
    found = re.search(r"RESULT rank=0 world=2 loss=(\S+) checksum=(\S+)", out)
    assert found, out[-3000:]
    return found.group(0)


def test_the_script_runs_unchanged_and_trains_as_under_torchrun(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    plain_dir, ours_dir = tmp_path / "torchrun", tmp_path / "launcher"
    plain_dir.mkdir()
    ours_dir.mkdir()
    plain = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", str(SCRIPT), "3", "1"],
                           cwd=plain_dir, capture_output=True, text=True, timeout=300, check=False,
                           env=_env(tmp_path))  # torchrun's own log folders land in the test's folder
    assert torchrun_finished(plain), plain.stderr[-3000:]
    ours = subprocess.run(launcher_cmd("run", "--nproc-per-node", "2", str(SCRIPT), "3", "1"), cwd=ours_dir,
                          capture_output=True, text=True, timeout=300, check=False, env=_env(tmp_path))
    assert ours.returncode == 0, ours.stderr[-3000:]
    assert _result(ours.stdout) == _result(plain.stdout + plain.stderr)  # the same training, bit for bit
    assert (ours_dir / "snapshot.pt").exists()  # the script's own snapshot, in its working directory
    logs = list((ours_dir / "runs" / "ddp_tutorial" / "logs").rglob("stdout.log"))
    assert len(logs) == 2  # per-rank logs
    # Run again: the script resumes from its own snapshot, as it does under torchrun
    again = subprocess.run(launcher_cmd("run", "--nproc-per-node", "2", str(SCRIPT), "3", "1"), cwd=ours_dir,
                           capture_output=True, text=True, timeout=300, check=False, env=_env(tmp_path))
    assert again.returncode == 0 and "Resuming training from snapshot at Epoch 2" in again.stdout


def test_a_raise_on_rank_1_is_reported_with_the_scripts_traceback(tmp_path):
    r = subprocess.run(
        launcher_cmd("run", "--nproc-per-node", "2", str(SCRIPT), "5", "1", "--fail-on-rank", "1",
                     "--fail-at-epoch", "1"),
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False, env=_env(tmp_path))
    assert r.returncode == 1, r.stderr
    assert "rank 1 failed first" in r.stderr
    assert "RuntimeError: injected failure on rank 1 at epoch 1" in r.stderr
    assert 'ddp_tutorial.py", line' in r.stderr
    assert "runpy" not in r.stderr and "launcher/rank/program.py" not in r.stderr  # only the user's frames
    assert not list((tmp_path / "tmp").glob("pytorch-errorfile-*"))  # torch's traceback files removed


def test_a_job_file_can_name_the_script_with_its_arguments(tmp_path):
    shutil.copy(SCRIPT, tmp_path / "train.py")
    (tmp_path / "job.yaml").write_text(
        "name: tutorial\nscript: train.py\nscript_args: ['2', '1', '--batch_size', '16']\n"
        "distributed: {nproc_per_node: 2}\n")
    r = subprocess.run(launcher_cmd("run", "job.yaml"), cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, check=False, env=_env(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Batchsize: 16" in r.stdout and "finished on 2 rank(s)" in r.stderr


def entry_that_sets_up_its_own_group():
    """An entry function written for torchrun: it calls init_process_group and destroy_process_group."""
    import torch
    import torch.distributed as dist

    dist.init_process_group(backend="gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    dist.destroy_process_group()
    return t.item()


def test_an_entry_function_that_calls_init_process_group_itself_works(tmp_path):
    r = subprocess.run(launcher_cmd("run", "jobs/tiny.yaml", f"output_dir={tmp_path}",
                                    "entry=tests.test_script_mode:entry_that_sets_up_its_own_group"),
                       cwd=ROOT, capture_output=True, text=True, timeout=300, check=False, env=_env(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0 returned 3.0" in r.stderr


def test_a_restarted_script_is_announced_with_its_cause_and_resumes(tmp_path):
    """torchrun's --max-restarts with an unmodified script: the restart is said on the console, with the
    original cause, and the script resumes from its own snapshot; __file__ is absolute, as under torchrun."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.read_text().replace(
        'if __name__ == "__main__":', 'print(f"FILE {__file__}")\nif __name__ == "__main__":'))
    r = subprocess.run(
        launcher_cmd("run", "--max-restarts", "1", "--nproc-per-node", "2", "train.py", "4", "1",
                     "--fail-on-rank", "1", "--fail-at-epoch", "2"),
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False, env=_env(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[launcher] rank 1 failed (exit code 1): RuntimeError: injected failure on rank 1 at epoch 2\n" \
           "[launcher] restarting all ranks (restart 1 of 1)" in r.stderr, r.stderr[-3000:]
    assert "Resuming training from snapshot at Epoch 1" in r.stdout
    assert f"FILE {script}" in r.stdout


def test_torchruns_own_command_line_runs_as_given(tmp_path):
    """The options of a typical torchrun line, a run name and folder for a script, every rank on the
    console (--tee)."""
    r = subprocess.run(
        launcher_cmd("run", "--standalone", "--nnodes=1", "--nproc_per_node=2", "--master_port=29500",
                     "--node_rank", "0", "--rdzv-backend", "c10d", "--tee", "3", "--name", "tut",
                     "--output-dir", "out", str(SCRIPT), "2", "1"),
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False, env=_env(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[rank1]:RESULT rank=1" in r.stdout and "[rank0]:RESULT rank=0" in r.stdout
    assert (tmp_path / "out" / "tut" / "job.yaml").exists()


def test_a_stopped_script_rank_is_named_within_the_start_up_timeout(tmp_path):
    """A script's own process group gets distributed.startup_timeout_s, not torch's 30 minutes: a SIGSTOPped
    rank is named, the job ends."""
    import signal
    import time

    from .conftest import rank_pids, wait_until

    shutil.copy(SCRIPT, tmp_path / "train.py")
    (tmp_path / "job.yaml").write_text(
        "name: stall\nscript: train.py\nscript_args: ['100000', '100000']\n"
        "distributed: {nproc_per_node: 2, startup_timeout_s: 15}\n")
    proc = subprocess.Popen(launcher_cmd("run", "job.yaml"), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(tmp_path))
    try:
        assert wait_until(lambda: (tmp_path / "snapshot.pt").exists(), 120), "the script did not start"
        ranks = rank_pids(proc.pid)
        assert len(ranks) == 2
        rank1 = [p for p in ranks if Path(f"/proc/{p}/comm").read_text().strip() == "launcher-rank1"]
        os.kill(rank1[0], signal.SIGSTOP)
        stopped = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - stopped
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert "rank 1 stopped making progress" in err and "process stopped (SIGSTOP" in err, err[-3000:]
    assert took < 15 + 10, took
