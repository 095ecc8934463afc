"""Launcher overhead and start-up against plain torchrun, and 1 vs 2 rank scaling (same CNN, same data).

One run alternates the two sides; each side reports the time from the command to its first completed step and
its training throughput after warm-up (``FIRST_STEP`` / ``THROUGHPUT`` lines of ``plain_cnn.py`` and
``cnn_job.py``), and the CPU time a short run of each costs, all its processes together (what start-up costs a
busy machine: a test suite, jobs sharing a node).
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from .common import paired, summary

STEPS = 150
SHORT_STEPS = 10  # the CPU comparison: start-up, a few steps, shut-down
ROUNDS = 5


def measure(cmd: list[str]) -> tuple[float, float, float]:
    """``(seconds from command to first step, samples/s, CPU seconds of all its processes)`` of one run."""
    t0 = time.time()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    # TMPDIR: torchrun leaves a torchelastic_* log folder behind in the temp directory at every run
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        # PYTHONPATH: plain_cnn.py imports benchmarks.cnn_job
        env = {**os.environ, "PYTHONPATH": os.getcwd(), "TMPDIR": tmp}
        r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # every process of the run is waited for by its parent (ranks by torchrun or the launcher's fork server,
    # the server by the launcher), so the children's usage is the whole run's
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out = r.stdout
    if "THROUGHPUT" not in out:
        # (Seen twice with the plain script: "terminate called without an active exception" in rank 0 at
        # shutdown, after the measurement. Only a run that did not measure is an error.)
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return _number("FIRST_STEP", out) - t0, _number("THROUGHPUT", out), cpu


def _number(key: str, out: str) -> float:
    m = re.search(rf"{key} ([\d.]+)", out)
    if m is None:
        raise RuntimeError(f"no {key} line in the job's output:\n{out[-3000:]}")
    return float(m.group(1))


def _launcher_cmd(tmp: str, nproc: int, steps: int = STEPS) -> list[str]:
    launcher = os.path.join(os.path.dirname(sys.executable), "launcher")  # the console script users type
    return [launcher, "run", "jobs/bench_cnn.yaml", f"output_dir={tmp}", f"args.max_steps={steps}",
            f"distributed.nproc_per_node={nproc}"]


def _torchrun_cmd(steps: int = STEPS) -> list[str]:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [torchrun, "--standalone", "--nproc-per-node", "2", "benchmarks/plain_cnn.py", str(steps)]


def run() -> list[dict[str, object]]:
    tmp = tempfile.mkdtemp(prefix="bench-overhead-")
    plain, ours, single, plain_cpu, ours_cpu = [], [], [], [], []
    try:
        for _ in range(ROUNDS):
            plain.append(measure(_torchrun_cmd()))
            ours.append(measure(_launcher_cmd(tmp, 2)))
            single.append(measure(_launcher_cmd(tmp, 1)))
            plain_cpu.append(measure(_torchrun_cmd(SHORT_STEPS))[2])
            ours_cpu.append(measure(_launcher_cmd(tmp, 2, SHORT_STEPS))[2])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    p_start, p_rate, _ = zip(*plain)
    o_start, o_rate, _ = zip(*ours)
    _, s_rate, _ = zip(*single)
    thr, start, scale = paired(p_rate, o_rate), paired(p_start, o_start), paired(s_rate, o_rate)
    cpu = paired(plain_cpu, ours_cpu)
    return [
        {
            "name": "throughput, launcher run / plain torchrun + DDP script "
            "(small CNN, 2 Gloo ranks, samples/s)",
            "value": thr,
            "target": ">= 0.98",
            "ok": thr >= 0.98,
            "detail": f"plain {summary(list(p_rate))}/s, launcher {summary(list(o_rate))}/s "
            f"(median of {ROUNDS})",
        },
        {
            "name": "start-up, command to first completed step, launcher run / torchrun --standalone",
            "value": start,
            "target": "<= 1.0",
            "ok": start <= 1.0,
            "detail": f"torchrun {summary(list(p_start))} s, launcher {summary(list(o_start))} s",
        },
        {
            "name": f"CPU seconds of a {SHORT_STEPS}-step run (all its processes), launcher run / torchrun "
            "--standalone",
            "value": cpu,
            "target": "<= 1.0",
            "ok": cpu <= 1.0,
            "detail": f"torchrun {summary(plain_cpu)} s, launcher {summary(ours_cpu)} s",
        },
        {
            "name": "scaling, 2 ranks / 1 rank throughput through the launcher (CPU, reported, no target)",
            "value": scale,
            "target": "none (measures the machine)",
            "ok": True,
            "detail": f"1 rank {summary(list(s_rate))}/s, 2 ranks {summary(list(o_rate))}/s",
        },
    ]
