"""How fast the job goes and who holds it back, from the ranks' heartbeats: a progress line on the console,
``RUN_DIR/logs/perf.jsonl`` (and TensorBoard events when ``tensorboard`` is installed), a straggler named.

Runs in the ``launcher`` process: no collective and nothing added to a rank's step. Each rank's heartbeat
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

from ..metrics import summary_writer


@dataclass
class Beat:
    """One rank's heartbeat: its last step, when, and its cumulated waits and samples."""

    step: int
    time: float
    data_s: float = 0.0
    sync_s: float = 0.0
    samples: int = 0


def read_beats(heartbeats: Path) -> dict[int, Beat]:
    """``{rank: Beat}`` of the ranks still at work."""
    ended = {p.name[len("ended-rank"):] for p in heartbeats.glob("ended-rank*")}
    out = {}
    for p in heartbeats.glob("rank*"):
        if p.name[4:] in ended:
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            words = p.read_text().split() + ["0", "0", "0"]  # a beat of the old form: step and time only
            out[int(p.name[4:])] = Beat(int(words[0]), float(words[1]), float(words[2]), float(words[3]),
                                        int(float(words[4])))
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
        ranks.append({"rank": r, "host": host, "step_s": (b.time - a.time) / steps,
                      "data_wait_s": (b.data_s - a.data_s) / steps,
                      "sync_wait_s": (b.sync_s - a.sync_s) / steps,
                      "samples_per_s": (b.samples - a.samples) / (b.time - a.time)})
    if not ranks:
        return None
    out: dict[str, Any] = {"time": round(time.time(), 3), "step": max(now[r["rank"]].step for r in ranks),
                           "samples_per_s": round(sum(r.pop("samples_per_s") for r in ranks), 1),
                           "step_s": statistics.median(r["step_s"] for r in ranks),
                           "straggler": None, "cause": None, "behind_s": None, "ranks": ranks}
    if len(ranks) > 1:
        slow = min(ranks, key=lambda r: r["sync_wait_s"])
        others = [r for r in ranks if r is not slow]
        gap = statistics.median(r["sync_wait_s"] for r in others) - slow["sync_wait_s"]
        if gap > max(MIN_GAP_S, GAP_SHARE * out["step_s"]):
            data_gap = slow["data_wait_s"] - statistics.median(r["data_wait_s"] for r in others)
            out.update(straggler=slow["rank"], behind_s=round(gap, 4),
                       cause="data" if data_gap > gap / 2 else "compute")
    for entry in ranks:
        for k in ("step_s", "data_wait_s", "sync_wait_s"):
            entry[k] = round(entry[k], 4)
    return out


def line(w: dict[str, Any]) -> str:
    """The console's progress line for a window."""
    data = statistics.median(r["data_wait_s"] for r in w["ranks"]) / w["step_s"] if w["step_s"] else 0.0
    text = (f"[launcher] step {w['step']} | {w['samples_per_s']:,.0f} samples/s | "
            f"{w['step_s'] * 1e3:.0f} ms/step | data wait {data:.0%}")
    if w["straggler"] is not None:
        r = next(x for x in w["ranks"] if x["rank"] == w["straggler"])
        text += (f" | straggler: rank {r['rank']} on {r['host']}, {w['behind_s'] * 1e3:.0f} ms/step behind "
                 f"the others ({w['cause']})")
    return text


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
                    print(line(w), file=sys.stderr, flush=True)
                    board = board or summary_writer(log_dir / "tensorboard")
                    if board is not None:
                        for key in ("samples_per_s", "step_s"):
                            board.add_scalar(f"perf/{key}", w[key], w["step"])
                        for r in w["ranks"]:
                            for key in ("data_wait_s", "sync_wait_s"):
                                board.add_scalar(f"perf/rank{r['rank']}/{key}", r[key], w["step"])
            if board is not None:
                board.close()

    threading.Thread(target=run, name="launcher-perf", daemon=True).start()
    return done
