"""How fast a job goes and who holds it back (issue 39): the launcher's progress line, ``perf.jsonl`` and the
straggler it names, from the ranks' heartbeats; no collective added. Through the installed ``launcher``."""

from __future__ import annotations

import json
import time

import pytest
import torch

import examples.tiny

from .conftest import run_cli

pytestmark = pytest.mark.slow

#: Seconds rank 1 loses per step in the slowed runs (the tiny job's own step is a few milliseconds).
SLOW_S = 0.03


def slow_rank1(job, args: examples.tiny.TinyArgs):
    """Entry point: the tiny job with rank 1 slower, its forward (``args.log_every`` 1: compute) or its data
    reading (2: data), or no rank (0), every rank sleeping a little after each step as a real step lasts."""
    import launcher

    how = {0: None, 1: "compute", 2: "data"}[args.log_every]
    args.log_every = 0
    slow = launcher.get_rank() == 1
    if slow and how == "compute":
        forward = torch.nn.Sequential.forward

        def slower(self, x):
            time.sleep(SLOW_S)
            return forward(self, x)

        torch.nn.Sequential.forward = slower  # type: ignore[method-assign]
    if slow and how == "data":
        read = examples.tiny.read_shard

        def slower_reading(shard):
            for sample in read(shard):
                time.sleep(SLOW_S / args.batch_size)
                yield sample

        examples.tiny.read_shard = slower_reading
    return examples.tiny.main(job, args)


def hooks_in_use(own: bool):
    """On each rank: how many times a user's hook ran, and whether the launcher's timed the all-reduce."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    import launcher

    calls = []

    def mine(state, bucket):
        calls.append(1)
        return default_hooks.allreduce_hook(state, bucket)

    model = launcher.wrap_model(torch.nn.Linear(4, 2))
    if own:
        model.register_comm_hook(None, mine)  # type: ignore[operator]  # after wrapping, as users do
    for _ in range(2):
        model(torch.randn(3, 4)).sum().backward()
    from launcher import dist

    return len(calls), dist._waits["sync"] > 0


def test_a_users_comm_hook_registered_after_wrapping_replaces_the_timed_one():
    from launcher.testing import run_distributed

    assert run_distributed(hooks_in_use, True)[1] == (2, False)  # theirs ran, ours never registered
    assert run_distributed(hooks_in_use, False)[1] == (0, True)  # ours timed the all-reduce


def _run(tmp_path, how: int):
    r = run_cli("run", "jobs/tiny.yaml", "entry=tests.test_perf:slow_rank1", f"output_dir={tmp_path}",
                f"args.log_every={how}", "args.step_sleep=0.02", "args.max_steps=300", "args.epochs=100",
                "data.num_workers=0", "checkpoint.every_steps=0", "distributed.progress_s=1")
    assert r.returncode == 0, r.stdout + r.stderr
    perf = tmp_path / "tiny" / "logs" / "perf.jsonl"
    windows = [json.loads(line) for line in perf.read_text().splitlines()]
    return r.stderr, windows


def _check_schema(windows):
    assert windows, "no window in perf.jsonl"
    for w in windows:
        assert {"time", "step", "samples_per_s", "straggler", "ranks"} <= w.keys(), w
        assert sorted(r["rank"] for r in w["ranks"]) == [0, 1], w
        for r in w["ranks"]:
            assert {"rank", "host", "step_s", "data_wait_s", "sync_wait_s"} <= r.keys(), r
            assert r["step_s"] > 0 and r["data_wait_s"] >= 0 and r["sync_wait_s"] >= 0, r
        assert w["samples_per_s"] > 0


@pytest.mark.parametrize("how, cause", [(1, "compute"), (2, "data")])
def test_a_slower_rank_is_named_with_its_cause(tmp_path, how, cause):
    err, windows = _run(tmp_path, how)
    _check_schema(windows)
    settled = windows[1:]  # the first window holds the start-up
    named = [w for w in settled if w["straggler"] is not None]
    assert len(named) >= len(settled) * 0.6, [(w["straggler"], w["cause"]) for w in settled]
    assert all(w["straggler"] == 1 and w["cause"] == cause for w in named), [
        (w["straggler"], w["cause"], w["behind_s"]) for w in named]
    assert "straggler: rank 1 on " in err and f"({cause})" in err, err
    assert "samples/s" in err and "ms/step" in err


def test_a_balanced_job_names_nobody(tmp_path):
    err, windows = _run(tmp_path, 0)
    _check_schema(windows)
    assert all(w["straggler"] is None for w in windows), [(w["straggler"], w["behind_s"]) for w in windows]
    assert "straggler" not in err
    # the same figures in TensorBoard (installed with the dev extra), and drawn by `launcher curves`
    assert list((tmp_path / "tiny" / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    r = run_cli("curves", str(tmp_path / "tiny"))
    assert r.returncode == 0 and "(1 curves)" in r.stderr, r.stderr
    assert (tmp_path / "tiny" / "curves.png").stat().st_size > 1000


def metrics_rows(folder):
    """Each rank logs its rank as the loss, reduced by mean, and its own number unreduced."""
    import launcher
    from launcher import metrics

    metrics.set_run_dir(folder)
    launcher.log_metrics(1, kind="train", reduce="mean", loss=float(launcher.get_rank()), note="x")
    launcher.log_metrics(2, mine=launcher.get_rank())
    return launcher.get_rank()


def test_log_metrics_writes_rank_0s_rows_reduced_on_request(tmp_path):
    from launcher.testing import run_distributed

    run_distributed(metrics_rows, tmp_path, world_size=2)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("kind"), r.get("loss"), r.get("note"), r.get("mine")) for r in rows] == [
        (1, "train", 0.5, "x", None), (2, None, None, None, 0)]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
