"""Checkpoint stall (async save vs synchronous torch.save, target <= 0.10) and write speed vs dd (>= 0.8)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

from launcher.checkpoint import Checkpointer, TrainState, atomic_write_bytes

from .common import alternate, paired, timed

MB = 256


class Blob:
    def __init__(self) -> None:
        self.t = torch.randn(MB * 2**20 // 4)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"t": self.t}

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        self.t = d["t"]


def fresh(path: Path) -> Path:
    """Every side writes a new file: the previous round's is deleted and synced away before the timer starts.

    This disk is mounted with ``discard``: freeing 256 MB of blocks makes the next journal commit trim them,
    60-65 ms here. A side that replaced its old file (``os.replace`` over it, ``torch.save`` truncating it)
    paid that inside its timer while dd, which deleted its file after timing, did not: a third of the gap
    this row showed until 2026-11-23 (0.63 of dd). A training run pays it once per deleted checkpoint, in the
    background writer when saves are async.
    """
    path.unlink(missing_ok=True)
    os.sync()  # neither side pays for the other's dirty pages or freed blocks
    return path


def dd_speed(folder: Path) -> float:
    path = fresh(folder / "dd.bin")
    t = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={MB}", "conv=fsync"],
                   check=True, capture_output=True)
    speed = MB / (time.perf_counter() - t)
    path.unlink()
    return speed


def run() -> list[dict[str, object]]:
    folder = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    blob = Blob()
    ck = Checkpointer(folder / "async", keep_last=1, async_save=True, model=blob)
    step = [0]

    def torch_save() -> float:  # what a user writes without a launcher: no fsync, no checksum, not atomic
        return timed(lambda: torch.save({"model": blob.state_dict()}, str(folder / "plain.pt")))

    def bare_save() -> float:  # torch.save + fsync, with torch.save's defaults
        def save() -> None:
            torch.save({"model": blob.state_dict()}, str(path))
            with open(path, "rb") as f:
                os.fsync(f.fileno())

        path = fresh(folder / "bare.pt")
        return timed(save)

    def sync_save() -> float:
        path = fresh(folder / "sync.pt")
        return timed(lambda: atomic_write_bytes(path, obj={"model": blob.state_dict()}))

    def async_stall() -> float:
        ck.wait()  # the previous write is not part of this step's stall
        step[0] += 1
        stall = timed(lambda: ck.save(TrainState(step=step[0])))
        ck.wait()
        return stall

    stall = alternate(torch_save, async_stall, rounds=9)
    ck.close()
    # dd, our write and a bare torch.save in every round: a shared disk's speed swings within minutes.
    # Round 0 warms the page cache up (a process's first writes are slower for every side) and is not
    # counted: a training run writes checkpoints again and again.
    dd: list[float] = []
    ours: list[float] = []
    bare: list[float] = []
    for i in range(12):
        speeds = dd_speed(folder), MB / sync_save(), MB / bare_save()
        if i:
            for xs, x in zip((dd, ours, bare), speeds):
                xs.append(x)
    shutil.rmtree(folder, ignore_errors=True)
    return [
        {
            "name": f"async save stall / synchronous torch.save ({MB} MB state)",
            "value": stall["ratio"],
            "target": "<= 0.10",
            "ok": stall["ratio"] <= 0.10,
            "detail": f"torch.save {stall['a'] * 1e3:.0f} ms, async stall {stall['b'] * 1e3:.0f} ms",
        },
        {
            "name": "checkpoint write speed / dd conv=fsync",
            "value": paired(dd, ours),
            "target": ">= 0.8",
            "ok": paired(dd, ours) >= 0.8,
            "detail": f"dd {median(dd):.0f} MB/s, checkpoint {median(ours):.0f} MB/s, "
            f"bare torch.save + fsync {median(bare):.0f} MB/s (same rounds)",
        },
        {
            "name": "checkpoint write speed / bare torch.save + fsync "
            "(torch.save's defaults: zip CRC32 per record)",
            "value": paired(bare, ours),
            "target": "reported",
            "ok": True,
            "detail": f"bare torch.save + fsync / dd: {paired(dd, bare):.3f}",
        },
    ]
