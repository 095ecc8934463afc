"""The image-classification example end to end on 2 CPU ranks: metrics, PNG, checkpoints, resume."""

import json

from examples.shapes import generate
from launcher.data import EpochPlan
from launcher.data.tar import open_shards

from .conftest import run_cli


def test_classify_runs_writes_metrics_and_resumes(tmp_path):
    data = generate(tmp_path / "shapes", train=192, val=64, size=16, per_shard=40)
    common = [
        "jobs/classify.yaml",
        f"output_dir={tmp_path / 'runs'}",
        f"args.data_dir={data}",
        "args.width=8",
        "args.epochs=2",
        "args.batch_size=16",
        "args.log_every=2",
        "checkpoint.every_steps=3",
    ]
    first = run_cli("run", *common, "args.stop_at_step=4")
    assert first.returncode == 0, first.stderr
    second = run_cli("run", *common)
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "(step 4, epoch 0)" in second.stdout
    run = tmp_path / "runs" / "classify"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["kind"] == "val"]
    assert val and all(0.0 <= r["accuracy"] <= 1.0 and len(r["precision"]) == 4 for r in val)
    assert val[-1]["samples"] == 64  # every validation sample counted exactly once over both ranks
    _, sizes, _ = open_shards(data / "train")
    expected = sum(EpochPlan(sizes, 2, 1, 16, seed=0, epoch=e, shuffle_buffer=64).batches_per_rank()
                   for e in range(2))
    assert max(r["step"] for r in rows) == expected > 0  # every batch of both epochs, across the resume
    assert (run / "curves.png").stat().st_size > 1000
    assert (run / "checkpoints" / "best").exists()
    # Epochs are numbered from 1 and match the steps: every validation row of epoch e sits at or before the
    # end of epoch e, after the end of epoch e - 1; the last one is the last epoch, on the console too.
    per_epoch = expected // 2
    for r in val:
        assert (r["epoch"] - 1) * per_epoch < r["step"] <= r["epoch"] * per_epoch, val
    assert [r["epoch"] for r in val][-1] == 2
    assert f"epoch 2 step {expected}:" in second.stdout
    train = [r for r in rows if r["kind"] == "train"]
    assert all((r["epoch"] - 1) * per_epoch < r["step"] <= r["epoch"] * per_epoch for r in train), train


def test_a_finished_classify_job_run_again_has_nothing_to_do(tmp_path):
    data = generate(tmp_path / "shapes", train=64, val=32, size=16, per_shard=32)
    common = ["jobs/classify.yaml", f"output_dir={tmp_path / 'runs'}", f"args.data_dir={data}",
              "args.width=8",
              "args.epochs=1", "args.batch_size=16", "data.num_workers=0"]
    assert run_cli("run", *common).returncode == 0
    again = run_cli("run", *common)
    assert again.returncode == 0, again.stderr
    assert "already finished" in again.stdout and "'val_accuracy': None" in again.stdout
