"""The bring-your-own-loop example: the Python API alone, spawned by itself and under torchrun."""

import os
import re
import shutil
import subprocess
import sys

from launcher.checkpoint import load_checkpoint

from .conftest import ROOT, killable_env

SCRIPT = str(ROOT / "examples" / "byo_loop.py")


def run(cmd, timeout=180, env=None):
    return subprocess.run(cmd, cwd=ROOT, check=False, capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_spawns_its_own_ranks_trains_and_resumes(tmp_path):
    out = tmp_path / "ck"
    r = run([sys.executable, SCRIPT, "--steps", "30", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    loss = float(re.search(r"30 steps on 2 rank\(s\), final loss ([\d.]+)", r.stdout).group(1))
    assert loss < 0.69  # below chance level (ln 2) after 30 steps
    assert load_checkpoint(out)["step"] == 30
    again = run([sys.executable, SCRIPT, "--steps", "40", "--out", str(out)])
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout + again.stderr and "40 steps on 2 rank(s)" in again.stdout


def test_same_script_under_torchrun(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    out = tmp_path / "ck"
    r = run([torchrun, "--standalone", "--nproc-per-node", "2", SCRIPT, "--steps", "20", "--workers", "0",
             "--out", str(out)], env=killable_env(tmp_path))  # torchrun's log folders: in the test's folder
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("20 steps on 2 rank(s)") == 1  # printed by rank 0 only
    assert load_checkpoint(out)["world_size"] == 2
