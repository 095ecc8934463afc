"""What watching a job costs, and whether it cries wolf (issue 39).

- Cost: the same CNN job through the launcher with the figures on (a progress line every second; the ranks
  time the all-reduce in a comm hook, count FLOPs once, note waits in their heartbeat) and off
  (``distributed.progress_s=0``: DDP's built-in all-reduce, nothing counted), alternated, throughput paired.
- False alarms: a balanced job for :data:`BALANCED_S` seconds with a window every second: no straggler may be
  named.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .common import paired, summary
from .overhead import _launcher_cmd, measure

ROUNDS = 7
STEPS = 300
BALANCED_S = 300.0


def run() -> list[dict[str, object]]:
    tmp = tempfile.mkdtemp(prefix="bench-figures-")
    on, off = [], []
    try:
        for _ in range(ROUNDS):
            on.append(measure(_launcher_cmd(tmp, 2, STEPS) + ["distributed.progress_s=1"])[1])
            off.append(measure(_launcher_cmd(tmp, 2, STEPS) + ["distributed.progress_s=0"])[1])
        windows, named = _balanced(Path(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = paired(off, on)
    return [
        {
            "name": "throughput with the figures on / off (progress line every 1 s, timed all-reduce, FLOPs "
            "counted; small CNN, 2 Gloo ranks)",
            "value": ratio,
            "target": ">= 0.99",
            "ok": ratio >= 0.99,
            "detail": f"on {summary(on)}/s, off {summary(off)}/s (paired median of {ROUNDS})",
        },
        {
            "name": f"stragglers named in a balanced {BALANCED_S:.0f}-s run (windows of 1 s, tiny job, "
            "2 ranks)",
            "value": float(named),
            "target": "== 0",
            "ok": named == 0,
            "detail": f"{windows} windows",
        },
    ]


def _balanced(tmp: Path) -> tuple[int, int]:
    """``(windows, windows naming a straggler)`` of a balanced tiny job running :data:`BALANCED_S` seconds."""
    import subprocess
    import sys

    launcher = str(Path(sys.executable).parent / "launcher")
    steps = int(BALANCED_S / 0.025)  # the tiny job's step with a 20 ms sleep: about 25 ms here
    cmd = [launcher, "run", "jobs/tiny.yaml", f"output_dir={tmp}", "name=balanced", "args.step_sleep=0.02",
           f"args.max_steps={steps}", "args.epochs=100000", "args.log_every=0", "checkpoint.every_steps=0",
           "distributed.progress_s=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    perf = tmp / "balanced" / "logs" / "perf.jsonl"
    windows = [json.loads(line) for line in perf.read_text().splitlines()]
    return len(windows), sum(w["straggler"] is not None for w in windows)
