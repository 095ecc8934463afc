"""Wall time of `launcher run jobs/tiny.yaml` vs torchrun on an equivalent plain DDP script (same machine, same run)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from .common import alternate, timed

STEPS = 20


def run() -> dict[str, object]:
    tmp = tempfile.mkdtemp(prefix="bench-start-")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    ours = [sys.executable, "-m", "launcher", "run", "jobs/tiny.yaml", f"output_dir={tmp}",
            f"train.max_steps={STEPS}", "checkpoint.every_steps=0", "checkpoint.resume=never", "data.num_workers=0"]
    theirs = [torchrun, "--standalone", "--nproc-per-node", "2", "benchmarks/plain_tiny.py", str(STEPS)]

    def go(cmd: list[str]) -> float:
        return timed(lambda: subprocess.run(cmd, check=True, capture_output=True))

    r = alternate(lambda: go(theirs), lambda: go(ours), rounds=5)
    return {"name": f"wall time, launcher run jobs/tiny.yaml / torchrun plain script ({STEPS} steps, 2 ranks)",
            "value": r["ratio"], "target": "<= 1.0 (start-up target of the benchmarks issue)",
            "ok": r["ratio"] <= 1.0, "detail": f"torchrun {r['a']:.2f} s, launcher {r['b']:.2f} s (median of 5)"}
