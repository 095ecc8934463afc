"""The image-classification example end to end on 2 CPU ranks, as ``make demo`` runs it (the README's first
command): metrics, PNG, checkpoints, a stop and its resume, a finished run started again."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.data import EpochPlan
from launcher.data.tar import open_shards

from .conftest import ROOT, run_cli

# One demo run serves every test here: on one xdist worker, so that it runs once.
pytestmark = pytest.mark.xdist_group("demo")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """``make demo`` in a folder of its own (the repository's jobs/ linked in: its data and runs stay out of
    the checkout), then the demo's command once more: the folder, the demo's output, the last run's."""
    folder = tmp_path_factory.mktemp("demo")
    (folder / "jobs").symlink_to(ROOT / "jobs")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "examples.demo"], cwd=folder, env=env, capture_output=True,
                       text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    again = run_cli("run", "jobs/classify.yaml", "name=demo", "output_dir=runs", cwd=folder, env=env)
    return folder, r, again


def test_make_demo_ends_with_the_line_the_readme_shows(demo):
    """``make demo`` runs ``python -m examples.demo`` once .venv exists (the fixture runs that, so that a
    checkout without the Makefile's install stamp does not reinstall); the demo's last line is the one the
    README quotes, with the same number of steps, and well above chance."""
    recipe = re.search(r"^demo:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert recipe and recipe.group(1) == "$(PY) -m examples.demo", "make demo no longer runs examples.demo"
    out = demo[1].stdout
    line = re.compile(r"final validation accuracy ([\d.]+)% \(chance 25%\) after (\d+) steps")
    said, shown = line.search(out.splitlines()[-1]), line.search((ROOT / "README.md").read_text())
    assert said and shown, (out[-500:], "the README quotes no such line")
    steps = (said.group(2), shown.group(2))
    assert steps[0] == steps[1], f"the demo trained {steps[0]} steps, the README says {steps[1]}"
    assert float(said.group(1)) >= 75.0, said.group(0)


def test_classify_writes_metrics_and_resumes_where_it_stopped(demo):
    folder, r, _ = demo
    assert re.search(r"resumed from .*\(step 70, epoch \d\)", r.stdout), r.stdout[-3000:]
    run = folder / "runs" / "demo"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [row for row in rows if row["kind"] == "val"]
    assert val and all(0.0 <= row["accuracy"] <= 1.0 and len(row["precision"]) == 4 for row in val)
    _, val_sizes, _ = open_shards(folder / "data" / "shapes" / "val")
    assert val[-1]["samples"] == sum(val_sizes)  # every validation sample once, over both ranks
    _, sizes, _ = open_shards(folder / "data" / "shapes" / "train")
    epochs = 4  # jobs/classify.yaml
    expected = sum(EpochPlan(sizes, 2, 1, 32, seed=0, epoch=e, shuffle_buffer=64).batches_per_rank()
                   for e in range(epochs))
    assert max(r["step"] for r in rows) == expected > 0  # every batch of every epoch, across the resume
    assert (run / "curves.png").stat().st_size > 1000  # drawn by launcher.curves, as `launcher curves` does
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))  # launcher.log_metrics' TensorBoard
    assert (run / "checkpoints" / "best").exists()
    # Epochs are numbered from 1 and match the steps: every row of epoch e sits at or before the end of epoch
    # e, after the end of epoch e - 1; the last validation is the last epoch's.
    per_epoch = expected // epochs
    for row in rows:
        assert (row["epoch"] - 1) * per_epoch < row["step"] <= row["epoch"] * per_epoch, row
    assert val[-1]["epoch"] == epochs and f"epoch {epochs} step {expected}" in r.stdout, r.stdout[-3000:]


def test_a_finished_classify_job_run_again_has_nothing_to_do(demo):
    again = demo[2]
    assert again.returncode == 0, again.stderr
    assert "already finished" in again.stdout and "'val_accuracy': None" in again.stderr, again.stderr
