"""How fast the job goes and who holds it back, from the ranks' heartbeats: a progress line on the console,
``RUN_DIR/logs/perf.jsonl`` (and TensorBoard events when ``tensorboard`` is installed), a straggler named.

Runs in the ``launcher`` process (in rank 0 where no launcher watches: :mod:`launcher.rank.inplace`): no
collective and nothing added to a rank's step. Each rank's heartbeat
(one ``pwrite`` a second, :func:`launcher.dist.note_step`) holds its step and, cumulated, the seconds it
waited for data (the launcher's loader), the seconds a gradient all-reduce was in flight (DDP's comm hook)
and the samples its loader gave. Under DDP every rank's step takes as long as the slowest one's: a slow rank
shows as the others' longer wait in the all-reduce, and as its own longer data wait when reading is the
cause.
"""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .metrics import summary_writer


@dataclass
class Beat:
    """One rank's heartbeat: its last step, when, and its cumulated waits and samples."""

    step: int
    time: float
    data_s: float = 0.0
    sync_s: float = 0.0
    samples: int = 0
    flops: float = 0.0  # of one sample's step (0: not counted)
    peak: float = 0.0  # the device's peak FLOP/s (0: not known)
    total: int = 0  # the run's last step (0: not known)
    host: str = ""  # where the rank runs ("": this machine)


def read_beats(heartbeats: Path) -> dict[int, Beat]:
    """``{rank: Beat}`` of the ranks still at work."""
    ended = {p.name[len("ended-rank"):] for p in heartbeats.glob("ended-rank*")}
    out = {}
    for p in heartbeats.glob("rank*"):
        if p.name[4:] in ended:
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            words = p.read_text().split()
            host = words[8] if len(words) > 8 else ""
            words = words[:8] + ["0"] * (8 - len(words))  # a beat of an older form: fewer fields
            out[int(p.name[4:])] = Beat(int(words[0]), float(words[1]), float(words[2]), float(words[3]),
                                        int(float(words[4])), float(words[5]), float(words[6]),
                                        int(float(words[7])), host)
    return out


#: A rank is named a straggler when the others waited, per step, at least this share of a step longer than it
#: did in the gradient all-reduce (and at least :data:`MIN_GAP_S`): under DDP their wait is its extra time.
GAP_SHARE = 0.2
MIN_GAP_S = 0.01


def window(before: dict[int, Beat], now: dict[int, Beat], host: str) -> dict[str, Any] | None:
    """One window's figures: per rank ``step_s``, ``data_wait_s``, ``sync_wait_s`` (per step), the global
    ``samples_per_s``, and the ``straggler`` (a rank, or None) with its ``cause`` and ``behind_s``."""
    ranks: list[dict[str, Any]] = []
    for r in sorted(now):
        a, b = before.get(r), now[r]
        if a is None or b.step <= a.step or b.time <= a.time:
            continue
        steps = b.step - a.step
        ranks.append({"rank": r, "host": b.host or host, "step_s": (b.time - a.time) / steps,
                      "data_wait_s": (b.data_s - a.data_s) / steps,
                      "sync_wait_s": (b.sync_s - a.sync_s) / steps,
                      "samples_per_s": (b.samples - a.samples) / (b.time - a.time)})
    if not ranks:
        return None
    beats = [now[r["rank"]] for r in ranks]
    step = max(b.step for b in beats)
    flops = sum(b.flops * r["samples_per_s"] for b, r in zip(beats, ranks)) / len(ranks)
    peak = min(b.peak for b in beats)
    out: dict[str, Any] = {"time": round(time.time(), 3), "step": step,
                           "samples_per_s": round(sum(r.pop("samples_per_s") for r in ranks), 1),
                           "step_s": statistics.median(r["step_s"] for r in ranks),
                           "flops_per_s": round(flops, 1) if flops else None,
                           "mfu": round(flops / peak, 4) if flops and peak else None,
                           "eta_s": None, "straggler": None, "cause": None, "behind_s": None, "ranks": ranks}
    total = max(b.total for b in beats)
    if total > step:
        out["eta_s"] = round((total - step) * out["step_s"], 1)
    if len(ranks) > 1:
        slow = min(ranks, key=lambda r: r["sync_wait_s"])
        others = [r for r in ranks if r is not slow]
        gap = statistics.median(r["sync_wait_s"] for r in others) - slow["sync_wait_s"]
        if gap > max(MIN_GAP_S, GAP_SHARE * out["step_s"]):
            data_gap = slow["data_wait_s"] - statistics.median(r["data_wait_s"] for r in others)
            out.update(straggler=slow["rank"], behind_s=round(gap, 4),
                       cause="data" if data_gap > gap / 2 else "compute")
    out["step_s"] = round(out["step_s"], 4)
    for entry in ranks:
        for k in ("step_s", "data_wait_s", "sync_wait_s"):
            entry[k] = round(entry[k], 4)
    return out


def line(w: dict[str, Any]) -> str:
    """The console's progress line for a window."""
    data = statistics.median(r["data_wait_s"] for r in w["ranks"]) / w["step_s"] if w["step_s"] else 0.0
    text = (f"[launcher] step {w['step']} | {w['samples_per_s']:,.0f} samples/s | "
            f"{w['step_s'] * 1e3:.0f} ms/step | data wait {data:.0%}")
    if w.get("flops_per_s"):
        text += f" | {_si(w['flops_per_s'])}FLOP/s per rank"
    if w.get("mfu") is not None:
        text += f" | MFU {w['mfu']:.0%}"
    if w.get("eta_s") is not None:
        text += f" | ETA {_duration(w['eta_s'])}"
    if w["straggler"] is not None:
        r = next(x for x in w["ranks"] if x["rank"] == w["straggler"])
        text += (f" | straggler: rank {r['rank']} on {r['host']}, {w['behind_s'] * 1e3:.0f} ms/step behind "
                 f"the others ({w['cause']})")
    return text


def _si(value: float) -> str:
    """``3.2 T``, ``481 k``: three figures and a unit prefix."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g} "


def _duration(seconds: float) -> str:
    """``1h02m``, ``3m05s``, ``12s``."""
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else \
        f"{s}s"


def no_mfu_reason(w: dict[str, Any]) -> str | None:
    """Why a window has FLOP/s and no MFU (said once): the ranks' devices have no known peak."""
    if not w.get("flops_per_s") or w.get("mfu") is not None:
        return None
    return ("[launcher] no MFU: the peak FLOP/s of this device is not known (CPUs, or a GPU not in "
            "launcher.rank.figures.PEAK_BF16; set distributed.peak_flops); the TFLOP/s are the model's FLOPs "
            "counted once")


def watch(heartbeats: Path, log_dir: Path, every_s: float) -> threading.Event:
    """A thread of the launcher: every ``every_s`` seconds, one window into ``perf.jsonl`` (and TensorBoard),
    and the progress line on stderr. Set the event to stop it. ``every_s`` 0: nothing."""
    done = threading.Event()
    if every_s <= 0:
        return done
    host = socket.gethostname()

    def run() -> None:
        before = read_beats(heartbeats)
        board = None
        said_no_mfu = False
        with open(log_dir / "perf.jsonl", "a") as out:
            while not done.wait(every_s):
                with contextlib.suppress(Exception):  # a help: never a reason to stop the launcher
                    now = read_beats(heartbeats)
                    w = window(before, now, host)
                    before = {**before, **now}
                    if w is None:
                        continue
                    out.write(json.dumps(w) + "\n")
                    out.flush()
                    if not said_no_mfu and (why := no_mfu_reason(w)):
                        said_no_mfu = True
                        print(why, file=sys.stderr, flush=True)
                    print(line(w), file=sys.stderr, flush=True)
                    board = board or summary_writer(log_dir / "tensorboard")
                    if board is not None:
                        for key in ("samples_per_s", "step_s", "flops_per_s", "mfu"):
                            if w[key] is not None:
                                board.add_scalar(f"perf/{key}", w[key], w["step"])
                        for r in w["ranks"]:
                            for key in ("data_wait_s", "sync_wait_s"):
                                board.add_scalar(f"perf/rank{r['rank']}/{key}", r[key], w["step"])
            if board is not None:
                board.close()

    threading.Thread(target=run, name="launcher-perf", daemon=True).start()
    return done
