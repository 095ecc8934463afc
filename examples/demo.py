"""`make demo`: the main job end to end on CPU with 2 Gloo ranks, through the real CLI.

1. writes the synthetic shapes data set as tar shards (once);
2. trains `jobs/classify.yaml` and stops at step 70 (as a preemption would), leaving a checkpoint;
3. runs the very same command again: it resumes from that checkpoint by itself and finishes;
4. prints the final validation accuracy (chance is 25%).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from examples.shapes import generate

JOB = "jobs/classify.yaml"
RUN_DIR = Path("runs/demo")


def launcher(*extra: str) -> None:
    # The console script users type, beside this interpreter (the venv's bin folder).
    cmd = [str(Path(sys.executable).with_name("launcher")), "run", JOB, "name=demo", "output_dir=runs",
           *extra]
    print("$ " + " ".join(["launcher", *cmd[1:]]), flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        sys.exit(f"demo: launcher exited with {rc}")


def main() -> None:
    start = time.time()
    generate("data/shapes")
    if RUN_DIR.exists():
        import shutil

        shutil.rmtree(RUN_DIR)  # a fresh demo every time
    print("\n== 1. train, stopping at step 70 as if preempted", flush=True)
    launcher("args.stop_at_step=70")
    print("\n== 2. the same command again: resumes from the checkpoint", flush=True)
    launcher()
    rows = [json.loads(line) for line in (RUN_DIR / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["kind"] == "val"]
    acc = val[-1]["accuracy"]
    print(
        f"\n== demo done in {time.time() - start:.0f} s: final validation accuracy {acc:.1%} (chance 25%) "
        f"after {val[-1]['step']} steps; metrics in {RUN_DIR}/metrics.jsonl, curves in {RUN_DIR}/curves.png"
    )
    if acc < 0.5:
        sys.exit("demo: accuracy is not clearly above chance")


if __name__ == "__main__":
    main()
