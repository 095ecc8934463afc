"""How fast a job goes and who holds it back (issue 39): the launcher's progress line, ``perf.jsonl`` and the
straggler it names, from the ranks' heartbeats; no collective added. Through the installed ``launcher``."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest
import torch

import examples.tiny

from .conftest import run_cli

pytestmark = pytest.mark.slow

#: Seconds rank 1 loses per step while slowed (the tiny job's own step is a few milliseconds).
SLOW_S = 0.03
#: Steps of each phase of the run: balanced, rank 1's forward slower, rank 1's data reading slower.
PHASE = 100


def slow_rank1_in_phases(job, args: examples.tiny.TinyArgs):
    """Entry point: the tiny job in three phases of :data:`PHASE` steps: balanced, then rank 1's forward
    slower by :data:`SLOW_S`, then its reading (samples are read in the rank: ``data.num_workers`` 0)."""
    import launcher

    forwards = [0]  # one forward per step

    def phase():
        return forwards[0] // PHASE

    if launcher.get_rank() == 1:
        forward = torch.nn.Sequential.forward

        def counted(self, x):
            forwards[0] += 1
            if phase() == 1:
                time.sleep(SLOW_S)
            return forward(self, x)

        read = examples.tiny.read_shard

        def reading(shard):
            for sample in read(shard):
                if phase() >= 2:
                    time.sleep(SLOW_S / args.batch_size)
                yield sample

        torch.nn.Sequential.forward = counted  # type: ignore[method-assign]
        examples.tiny.read_shard = reading
    return examples.tiny.main(job, args)


def hooks_in_use(own: bool, figures_on: bool = True):
    """On each rank: how many times a user's hook ran, whether the launcher's timed the all-reduce, and the
    FLOPs per sample it counted (``figures_on`` False: what ``distributed.progress_s=0`` does)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    import launcher
    from launcher.rank import figures

    figures.enable(figures_on)
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

    return len(calls), dist._waits["sync"] > 0, dist._known["flops"]


def test_a_users_comm_hook_registered_after_wrapping_replaces_the_timed_one():
    from launcher.testing import run_distributed

    # a step of Linear(4, 2): 2 * 4 * 2 FLOPs per sample forward, three times that with the backward
    assert run_distributed(hooks_in_use, True)[1] == (2, False, 48)  # theirs ran, ours never registered
    assert run_distributed(hooks_in_use, False)[1] == (0, True, 48)  # ours timed the all-reduce
    assert run_distributed(hooks_in_use, False, False)[1] == (0, False, 0)  # figures off: nothing added


def windows_by_phase(run: Path, phases: int) -> tuple[list[dict], dict[int, list[dict]]]:
    """The windows of ``run``'s perf.jsonl, and per phase those inside it (a window spans the steps after
    the previous one's, to its own; both ranks in it)."""
    windows = [json.loads(line) for line in (run / "tiny" / "logs" / "perf.jsonl").read_text().splitlines()]
    spans = [(before["step"], w) for before, w in itertools.pairwise(windows) if len(w["ranks"]) == 2]
    return windows, {p: [w for first, w in spans if p * PHASE + 5 < first and w["step"] < (p + 1) * PHASE - 2]
                     for p in range(phases)}


def test_mfu_and_eta_from_the_heartbeats_on_a_gpu_with_a_known_peak(monkeypatch):
    """The GPU side of the progress line, without a GPU: the peak of an H100 by its name, the MFU and ETA of a
    window from two ranks' beats (1e12 FLOPs per sample, 200 samples/s per rank, 0.1 s per step)."""
    from launcher import dist, perf
    from launcher.rank import figures

    monkeypatch.setattr(dist, "get_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert figures.peak_flops() == 989e12
    before = {r: perf.Beat(100, 1000.0, samples=0, flops=1e12, peak=989e12, total=1100) for r in (0, 1)}
    now = {r: perf.Beat(200, 1010.0, samples=2000, flops=1e12, peak=989e12, total=1100) for r in (0, 1)}
    w = perf.window(before, now, "node1")
    assert w is not None and w["flops_per_s"] == pytest.approx(200e12), w
    assert w["mfu"] == pytest.approx(200 / 989, abs=1e-4), w
    assert w["eta_s"] == pytest.approx(90.0), w  # 900 steps left at 0.1 s
    assert perf.no_mfu_reason(w) is None
    assert "| 200 TFLOP/s per rank | MFU 20% | ETA 1m30s" in perf.line(w), perf.line(w)


def test_a_first_forward_that_raises_leaves_no_flop_counter_behind(monkeypatch):
    """FlopCounterMode is entered in a pre-forward hook and left in a forward hook: a forward that raises
    must leave it too (``always_call``), or every later op of the rank would go through it."""
    from launcher import dist
    from launcher.rank import figures

    monkeypatch.setitem(dist._known, "flops", 0.0)

    class FailsOnce(torch.nn.Linear):
        def forward(self, x):
            if not getattr(self, "failed", False):
                self.failed = True
                raise ValueError("the first forward fails")
            return super().forward(x)

    model = FailsOnce(4, 2)
    figures._count_flops_once(model)
    with pytest.raises(ValueError):
        model(torch.randn(3, 4))
    assert torch._C._len_torch_dispatch_stack() == 0  # the counter was left
    model(torch.randn(3, 4))  # counted once only: the hooks are gone
    assert dist._known["flops"] == 0.0


def test_the_slower_rank_is_named_with_its_cause_and_a_balanced_job_names_nobody(tmp_path):
    r = run_cli("run", "jobs/tiny.yaml", "entry=tests.test_perf:slow_rank1_in_phases",
                f"output_dir={tmp_path}", "args.step_sleep=0.02", f"args.max_steps={3 * PHASE}",
                "args.epochs=100", "args.log_every=0",
                "data.num_workers=0", "checkpoint.every_steps=0", "distributed.progress_s=0.5")
    assert r.returncode == 0, r.stdout + r.stderr
    windows, seen = windows_by_phase(tmp_path, 3)
    assert len(windows) > 6, windows
    for w in windows:  # the schema of docs/watching.md
        assert {"time", "step", "samples_per_s", "straggler", "ranks"} <= w.keys(), w
        for rank in w["ranks"]:
            assert {"rank", "host", "step_s", "data_wait_s", "sync_wait_s"} <= rank.keys(), rank
            assert rank["step_s"] > 0 and rank["data_wait_s"] >= 0 and rank["sync_wait_s"] >= 0, rank
    said = {p: [(w["straggler"], w["cause"], w["behind_s"]) for w in ws] for p, ws in seen.items()}
    assert all(seen.values()), said
    assert all(w["straggler"] is None for w in seen[0]), said  # balanced: nobody named
    for p, cause in ((1, "compute"), (2, "data")):
        named = [w for w in seen[p] if w["straggler"] is not None]
        assert len(named) >= len(seen[p]) / 2, said
        assert all(w["straggler"] == 1 and w["cause"] == cause for w in named), said
    assert "straggler: rank 1 on " in r.stderr and "(compute)" in r.stderr and "(data)" in r.stderr, r.stderr
    assert "samples/s" in r.stderr and "ms/step" in r.stderr
    # FLOPs counted once: the tiny model's two Linear layers, 2 * (8 * 32 + 32 * 2) per sample forward, three
    # times that with the backward; per rank, over the window's samples (the last window may hold one rank)
    for w in windows:
        assert w["flops_per_s"] == pytest.approx(1920 * w["samples_per_s"] / len(w["ranks"]), rel=1e-3), w
        assert w["mfu"] is None, w  # CPUs: no peak known, said once
    assert r.stderr.count("no MFU: the peak FLOP/s of this device is not known") == 1, r.stderr
    # ETA: examples/tiny.py says its last step (launcher.set_total_steps)
    for w in windows:
        assert w["eta_s"] == pytest.approx((3 * PHASE - w["step"]) * w["step_s"], abs=0.2), w
    assert " kFLOP/s per rank | ETA " in r.stderr, r.stderr
    # the same figures in TensorBoard (installed with the dev extra), and drawn by `launcher curves`
    assert list((tmp_path / "tiny" / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    r = run_cli("curves", str(tmp_path / "tiny"))
    assert r.returncode == 0 and "(1 curves)" in r.stderr, r.stderr
    assert (tmp_path / "tiny" / "curves.png").stat().st_size > 1000


def collectives_in_steps(folder, steps):
    """On each rank: the collectives of ``steps`` steps of a DDP model with BatchNorm fed by the launcher's
    loader, with the heartbeat (and its figures) on: counted by name."""
    import os
    from collections import Counter

    import torch.distributed as tdist

    import launcher
    from launcher import syncbn
    from launcher.data import ShardedIterableDataset, make_loader

    os.environ["LAUNCHER_HEARTBEAT_DIR"] = str(folder)
    counts: Counter[str] = Counter()

    def counted(name, fn):
        def call(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return call

    names = ["all_reduce", "all_gather", "all_gather_object", "broadcast", "barrier", "reduce_scatter_tensor",
             "all_gather_into_tensor", "broadcast_object_list", "gather_object", "monitored_barrier"]
    for name in names:
        setattr(tdist, name, counted(name, getattr(tdist, name)))
    syncbn._all_gather_flat = counted("syncbn_gather", syncbn._all_gather_flat)
    model = launcher.wrap_model(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                                                    torch.nn.ReLU(), torch.nn.Linear(16, 2)))
    ds = ShardedIterableDataset([(i, 8) for i in range(8)], examples.tiny.read_shard, sizes=[8] * 8,
                                batch_size=4)
    batches = iter(make_loader(ds))
    counts.clear()  # what building the model and the loader did is not a step's
    for step in range(1, steps + 1):
        x, y = next(batches)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        launcher.note_step(step)  # the heartbeat with the waits and samples
    return dict(counts)


def test_the_figures_add_no_collective_to_a_step(tmp_path):
    from launcher.testing import run_distributed

    for rank, counts in run_distributed(collectives_in_steps, tmp_path, 3).items():
        # per step: DDP's one gradient all-reduce (one bucket), SyncBatchNorm's gathers (forward, backward)
        assert counts == {"all_reduce": 3, "syncbn_gather": 6}, (rank, counts)
    beat = (tmp_path / "rank0").read_text().split()  # at most one a second: step, time, waits, samples...
    assert len(beat) == 9 and int(beat[4]) >= 4, beat


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
