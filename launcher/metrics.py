"""Users' own metrics: ``launcher.log_metrics(step, kind=..., **values)`` appends one row to
``RUN_DIR/metrics.jsonl`` on rank 0, and the numbers to TensorBoard when ``tensorboard`` is installed
(``RUN_DIR/tensorboard``). ``launcher curves RUN_DIR`` draws them. Runs in a rank (library)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from . import dist

_run: dict[str, Any] = {"dir": None, "board": None, "said": False}
_REDUCE = ("mean", "sum", "max", "min")


def set_run_dir(run_dir: str | Path | None) -> None:
    """Where this rank's job writes (set by the launcher when a rank starts)."""
    _run.update(dir=Path(run_dir) if run_dir else None, board=None)


def log_metrics(step: int, kind: str | None = None, reduce: str | None = None, **values: Any) -> None:
    """One row ``{"step", "time", "kind", **values}`` in ``RUN_DIR/metrics.jsonl``, written by rank 0; the
    numbers also to TensorBoard as ``kind/name`` when ``tensorboard`` is installed.

    ``reduce`` (``mean``, ``sum``, ``max``, ``min``): *collective*, every rank calls with the same names;
    the numbers are reduced over the ranks first (one all-reduce). Without it, rank 0's values are written
    and the call is free on the other ranks. Outside a launcher run directory, nothing is written (said
    once)."""
    if reduce is not None:
        values = _reduced(values, reduce)
    if not dist.is_main_process():
        return
    folder = _run["dir"]
    if folder is None:
        if not _run["said"]:
            print("[launcher] log_metrics: no run directory (not started by `launcher run`): nothing written",
                  file=sys.stderr, flush=True)
            _run["said"] = True
        return
    row = {"step": step, "time": round(time.time(), 3), **({"kind": kind} if kind else {}), **values}
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    board = _board(folder)
    if board is not None:
        for name, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                board.add_scalar(f"{kind}/{name}" if kind else name, v, step)
        board.flush()


def _reduced(values: dict[str, Any], how: str) -> dict[str, Any]:
    import torch
    import torch.distributed as tdist

    if how not in _REDUCE:
        raise ValueError(f"log_metrics: reduce={how!r}; expected one of {', '.join(_REDUCE)}")
    names = [k for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not names or dist.get_world_size() == 1:
        return values
    t = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=dist.get_device())
    op = {"mean": tdist.ReduceOp.SUM, "sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX,
          "min": tdist.ReduceOp.MIN}[how]
    tdist.all_reduce(t, op=op)
    if how == "mean":
        t /= dist.get_world_size()
    return {**values, **dict(zip(names, t.tolist()))}


def summary_writer(folder: Path) -> Any:
    """A TensorBoard ``SummaryWriter`` in ``folder`` when the ``tensorboard`` package is installed (an
    optional extra); None otherwise."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


def _board(folder: Path) -> Any:
    if _run["board"] is None:
        _run["board"] = summary_writer(folder / "tensorboard") or False
    return _run["board"] or None
