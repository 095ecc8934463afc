"""Checkpoints: bit-exact resume after SIGKILL, atomic under kills, verified, safe, pruned."""

import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zipfile

import pytest
import torch

import launcher
from launcher.checkpoint import (
    Checkpointer,
    CheckpointError,
    TrainState,
    find_latest,
    list_checkpoints,
    load_checkpoint,
)

from .conftest import (
    ROOT,
    descendants,
    killable_env,
    launcher_cmd,
    left_behind,
    rank_pids,
    run_cli,
    wait_until,
)


def final_state(run_dir):
    data = load_checkpoint(run_dir / "checkpoints")
    return data


def assert_states_equal(a, b):
    assert a["step"] == b["step"]
    for key in ("model", "optimizer"):
        flat_a, flat_b = flatten(a[key]), flatten(b[key])
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            va, vb = flat_a[k], flat_b[k]
            if isinstance(va, torch.Tensor):
                assert torch.equal(va, vb), (key, k)
            else:
                assert va == vb, (key, k)


def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        elif isinstance(v, list):
            for i, x in enumerate(v):
                out.update(
                    flatten(x, f"{prefix}{k}.{i}.") if isinstance(x, dict) else {f"{prefix}{k}.{i}": x}
                )
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_bit_exact_resume_after_sigkill(tmp_path):
    """Killed and resumed under FSDP (sharded checkpoints every 5 steps, written in the background by every
    rank) against DDP uninterrupted: the same model and optimizer, bit for bit (on CPU the two strategies
    sum these gradients alike; tests/test_fsdp.py checks it for a run stopped by max_steps)."""
    common = ["jobs/tiny.yaml", "args.max_steps=36", "args.epochs=3", "checkpoint.every_steps=5"]
    # the uninterrupted reference runs beside the one killed (CPU results do not depend on the load)
    ref = subprocess.Popen(launcher_cmd("run", *common, f"output_dir={tmp_path / 'ref'}"), cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "killed"
    log = tmp_path / "killed.log"
    common.append("distributed.strategy=fsdp")
    with open(log, "w") as sink:
        proc = subprocess.Popen(launcher_cmd("run", *common, f"output_dir={out}", "args.step_sleep=0.15"),
                                cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                env=killable_env(tmp_path))
    ckdir = out / "tiny" / "checkpoints"
    try:
        assert wait_until(lambda: any(s >= 15 for s, _ in list_checkpoints(ckdir)), 120), (
            f"no checkpoint at step 15 after 120 s; the run said:\n{log.read_text()[-3000:]}")
        time.sleep(0.4)  # a few steps past the checkpoint: they must be redone identically
        ranks, tree = rank_pids(proc.pid), descendants(proc.pid)
        assert len(ranks) == 2, ranks
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert wait_until(lambda: not left_behind(tree, ranks), 5), "ranks outlived a SIGKILLed launcher"
        killed_at = max(s for s, _ in list_checkpoints(ckdir))
        assert killed_at < 36
        resumed = run_cli("run", *common, f"output_dir={out}")
        assert resumed.returncode == 0, resumed.stderr
        assert f"resumed from {ckdir}" in resumed.stdout
    finally:
        proc.kill()
        _, err = ref.communicate(timeout=120)
    assert ref.returncode == 0, err
    assert_states_equal(final_state(tmp_path / "ref" / "tiny"), final_state(out / "tiny"))


def test_a_run_stopped_by_max_steps_resumes_exactly_once_whatever_max_steps_was(tmp_path):
    """max_steps 7 (mid-epoch), then 16 (the epoch's last batch), then 40: the same weights as 40 straight.
    The final save held no data position: a raised max_steps replayed the epoch (224 samples twice)."""
    common = ["jobs/tiny.yaml", "args.epochs=3", "checkpoint.every_steps=100"]
    straight = launcher_cmd("run", *common, "args.max_steps=40", f"output_dir={tmp_path / 'ref'}")
    ref = subprocess.Popen(straight, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for max_steps in (7, 16, 40):
            r = run_cli("run", *common, f"args.max_steps={max_steps}", f"output_dir={tmp_path / 'parts'}")
            assert r.returncode == 0, r.stderr
            assert f"'step': {max_steps}" in r.stderr, r.stderr
    finally:
        _, err = ref.communicate(timeout=120)
    assert ref.returncode == 0, err
    assert_states_equal(final_state(tmp_path / "ref" / "tiny"), final_state(tmp_path / "parts" / "tiny"))


class Box:
    """A stand-in for a model/optimizer: any object with state_dict/load_state_dict."""

    def __init__(self, n=1000):
        self.t = torch.randn(n)

    def state_dict(self):
        return {"t": self.t}

    def load_state_dict(self, d):
        self.t = d["t"].clone()


def test_keep_last_and_best(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2, async_save=True, model=Box())
    state = TrainState()
    for step, metric in [(1, 0.5), (2, 0.9), (3, 0.1), (4, 0.2), (5, 0.3)]:
        state.step = step
        ck.save(state, metric=metric)
    ck.close()
    steps = sorted(s for s, _ in list_checkpoints(tmp_path))
    assert steps == [2, 4, 5]  # the last two plus the best (step 2, metric 0.9)
    assert (tmp_path / "best").read_text() == "step_00000002.pt"
    assert (tmp_path / "latest").read_text() == "step_00000005.pt"
    assert state.best_metric == 0.9


def make_two(tmp_path):
    box = Box()
    ck = Checkpointer(tmp_path, keep_last=5, async_save=False, model=box)
    ck.save(TrainState(step=1))
    first = box.t.clone()
    box.t = torch.randn(1000)
    ck.save(TrainState(step=2))
    ck.close()
    return first


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "delete_manifest"])
def test_corrupt_newest_falls_back_to_previous(tmp_path, damage, capsys):
    first = make_two(tmp_path)
    newest = tmp_path / "step_00000002.pt"
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "bitflip":
        data[len(data) // 2] ^= 0x10
        newest.write_bytes(bytes(data))
    else:
        newest.with_suffix(".json").unlink()
    box = Box()
    state = Checkpointer(tmp_path, model=box).resume("auto")
    assert state.step == 1 and torch.equal(box.t, first)
    if damage != "delete_manifest":
        assert "skipping checkpoint" in capsys.readouterr().out


def test_failed_save_leaves_previous_checkpoint_and_no_temp_file(tmp_path):
    box = Box()
    ck = Checkpointer(tmp_path, keep_last=5, async_save=False, model=box)
    ck.save(TrainState(step=1))
    box.t = lambda: None  # not serializable: torch.save raises half-way through the file
    with pytest.raises((pickle.PicklingError, AttributeError)):  # which one depends on the object
        ck.save(TrainState(step=2))
    ck.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001.json", "step_00000001.pt"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert find_latest(tmp_path)[0].name == "step_00000001.pt"


def test_one_checksum_per_file_and_torch_save_settings_left_as_they_were(tmp_path):
    from torch.utils.serialization import config

    ck = Checkpointer(tmp_path, async_save=False, model=Box())
    path = ck.save(TrainState(step=1))
    ck.close()
    with zipfile.ZipFile(path) as z:  # the whole-file CRC32 replaces the zip's per-record ones
        assert {info.CRC for info in z.infolist()} == {0}
    assert config.save.compute_crc32  # a user's own torch.save still writes them
    torch.save({"x": torch.ones(3)}, tmp_path / "mine.pt")
    with zipfile.ZipFile(tmp_path / "mine.pt") as z:
        assert all(info.CRC for info in z.infolist() if info.file_size)


@pytest.mark.parametrize("async_save", [True, False])
@pytest.mark.parametrize("fmt", ["full", "sharded"])
def test_saves_start_no_threads(tmp_path, monkeypatch, async_save, fmt):
    # A thread starting while the training loop forks DataLoader workers can hang a worker (CPython 3.11):
    # the Checkpointer starts its threads when created, and saves reuse them (torch.distributed.checkpoint's
    # writer too: one writing thread, the caller's).
    ck = Checkpointer(tmp_path, keep_last=2, async_save=async_save, format=fmt, model=Box())
    started = []
    original = threading.Thread.start
    monkeypatch.setattr(
        threading.Thread, "start", lambda self: (started.append(self.name), original(self))[1]
    )
    for step in range(1, 4):
        ck.save(TrainState(step=step))
    ck.wait()
    assert started == []
    monkeypatch.undo()
    ck.close()


def test_async_save_writes_the_state_of_the_moment_it_was_called(tmp_path, monkeypatch):
    import threading

    import launcher.checkpoint.checkpointer as ck_mod

    release = threading.Event()
    real_write = ck_mod.atomic_write_bytes

    def slow_write(path, data=None, obj=None):
        release.wait(30)
        return real_write(path, data, obj)

    monkeypatch.setattr(ck_mod, "atomic_write_bytes", slow_write)
    box = Box()
    ck = Checkpointer(tmp_path, keep_last=5, async_save=True, model=box)
    for step in (1, 2):  # the second save copies into the staging buffers of the first
        expected = box.t.clone()
        ck.save(TrainState(step=step))
        box.t.add_(1.0)  # training goes on, in place, while the write is held back
        release.set()
        ck.wait()
        release.clear()
        saved = load_checkpoint(tmp_path / f"step_{step:08d}.pt")["model"]["t"]
        assert torch.equal(saved, expected), step
    release.set()
    ck.close()


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/launcher-pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "step_00000001.pt"
    torch.save({"model": {}, "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not os.path.exists("/tmp/launcher-pwned")


def test_load_checkpoint_gives_plain_model_state(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ck = Checkpointer(tmp_path, async_save=True, model=launcher.convert_sync_batchnorm(model))
    ck.save(TrainState(step=7))
    ck.close()
    data = load_checkpoint(tmp_path)
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    fresh.load_state_dict(data["model"])  # no launcher object needed
    assert data["step"] == 7 and data["format"].startswith("launcher-checkpoint")


# Imports torch once; each line read starts a trial: a fork that saves checkpoints in a loop, from the step
# given, until the test SIGKILLs it (a fresh interpreter per trial would spend most of it importing torch).
SAVER = textwrap.dedent("""
    import os, sys, torch
    from launcher.checkpoint import Checkpointer, TrainState
    class Box:
        def __init__(self): self.t = torch.randn(2_000_000)
        def state_dict(self): return {"t": self.t}
        def load_state_dict(self, d): self.t = d["t"]
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            ck = Checkpointer(sys.argv[1], keep_last=2, async_save=False, model=Box())
            step = int(line)
            print("saving", os.getpid(), flush=True)
            while True:
                step += 1
                ck.save(TrainState(step=step))
        os.waitpid(pid, 0)
""")


def test_kill_during_save_always_leaves_a_loadable_checkpoint(tmp_path):
    rng = random.Random(0)
    step = 0
    saver = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path)], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        for trial in range(8):
            saver.stdin.write(f"{step}\n")
            saver.stdin.flush()
            line = saver.stdout.readline()
            while not line.startswith("saving "):  # the checkpointer's own lines of the previous trial
                line = saver.stdout.readline()
            pid = int(line.split()[1])
            time.sleep(rng.uniform(0.05, 0.6))
            os.kill(pid, signal.SIGKILL)
            found = find_latest(tmp_path, log=lambda m: None)
            if trial > 0 or found is not None:
                assert found is not None, f"trial {trial}: nothing loadable"
                step = found[1]["step"]
                assert found[1]["model"]["t"].numel() == 2_000_000
    finally:
        saver.kill()
        saver.wait()


def test_breaking_job_change_is_refused_unless_allowed(tmp_path):
    out = tmp_path / "runs"
    base = ["jobs/tiny.yaml", f"output_dir={out}", "args.max_steps=6", "checkpoint.every_steps=3",
            "data.num_workers=0"]  # the workers' server would add 2 s to each of the three starts
    assert run_cli("run", *base).returncode == 0
    r = run_cli("run", *base, "args.max_steps=12", "args.batch_size=8")
    assert r.returncode == 1
    assert "args.batch_size: 16 -> 8" in r.stderr and "allow_changes" in r.stderr
    r = run_cli("run", *base, "args.max_steps=12", "args.batch_size=8", "checkpoint.allow_changes=true")
    assert r.returncode == 0, r.stderr
    assert "args.batch_size: 16 -> 8" in r.stdout


def test_resume_on_fewer_ranks_and_workers_goes_on_with_the_samples_not_yet_seen(tmp_path):
    out = tmp_path / "runs"
    base = ["jobs/tiny.yaml", f"output_dir={out}", "checkpoint.every_steps=3", "args.log_every=1"]
    assert run_cli("run", *base, "args.max_steps=6").returncode == 0  # 6 of 16 steps of epoch 0, 2 ranks
    r = run_cli("run", *base, "args.max_steps=30", "distributed.nproc_per_node=1", "data.num_workers=1",
                "checkpoint.allow_changes=true")
    assert r.returncode == 0, r.stderr
    # 2 ranks x 6 batches x 16 samples seen; the other 317 of 509 make 19 batches of the one rank left
    console = r.stdout + r.stderr
    assert ("data position carried over from 2 ranks x 2 workers: epoch 0 goes on with the 317 of its 509 "
            "samples not yet yielded") in console
    assert "epoch 0 step 25 " in console and "epoch 1 step 26 " in console, console
