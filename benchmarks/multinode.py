"""Two machines (network namespaces, root only): start-up of a 2 x 2 job, and how fast a lost machine ends it.

* start-up, from the command on both machines to the first completed step: ``launcher run --nnodes 2`` (the
  benchmark CNN job) / ``torchrun --nnodes 2 --rdzv-backend c10d`` with the plain script, alternated;
* for each way of losing a machine (its processes killed, the rendezvous host's killed, its link cut): the
  seconds from the loss until every launcher process has exited, worst of ``TRIALS``, against the bound
  ``distributed.timeout_s`` + 10 s.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests import nodes

from .common import paired, summary

ROUNDS, TRIALS, STEPS, TIMEOUT_S = 3, 3, 20, 10
STARTUP = "2 machines x 2 ranks: start-up, launcher run --nnodes 2 / torchrun --nnodes 2 (c10d)"
LAUNCHER = str(Path(sys.executable).with_name("launcher"))
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def run() -> list[dict[str, object]]:
    why = nodes.available()
    if why:
        return [{"name": STARTUP, "value": float("nan"), "target": "<= 1.0", "ok": True,
                 "detail": f"not measured: {why}"}]
    with tempfile.TemporaryDirectory(prefix="bench-multinode-") as tmp:
        return [startup(Path(tmp)), *losses(Path(tmp))]


def _env(tmp: Path) -> dict[str, str]:
    """Temp files of the runs (torchrun's log folders, those of killed DataLoader workers) in ``tmp``."""
    (tmp / "tmp").mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp / "tmp")}


def _first_step(machines: nodes.Nodes, argv: list[str], hosts: str, tmp: Path) -> float:
    env = {**_env(tmp), "PYTHONPATH": os.getcwd()}
    t0 = time.time()
    procs = [machines.popen(i, argv, hosts=hosts, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    found = [float(m.group(1)) for o in outs for m in [re.search(r"FIRST_STEP ([\d.]+)", o)] if m]
    if not found:
        raise RuntimeError(f"no FIRST_STEP line:\n{outs[0][-2000:]}\n{outs[1][-2000:]}")
    return found[0] - t0


def startup(tmp: Path) -> dict[str, object]:
    theirs, ours = [], []
    with nodes.Nodes(2) as machines:
        hosts = machines.hosts_file(tmp)  # torchrun needs the names to resolve; both sides get them
        endpoint = f"{machines.addresses[0]}:29400"
        for k in range(ROUNDS):
            theirs.append(_first_step(machines, [
                TORCHRUN, "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", endpoint, "--rdzv-id", f"t{k}", "benchmarks/plain_cnn.py", str(STEPS)],
                hosts, tmp))
            ours.append(_first_step(machines, [
                LAUNCHER, "run", "--nnodes", "2", "--rdzv-endpoint", endpoint, "--rdzv-id", f"l{k}",
                "jobs/bench_cnn.yaml", f"output_dir={tmp}/runs{k}", f"args.max_steps={STEPS}",
                "distributed.nproc_per_node=2"], hosts, tmp))
    ratio = paired(theirs, ours)
    return {"name": STARTUP, "value": ratio, "target": "<= 1.0", "ok": ratio <= 1.0,
            "detail": f"torchrun {summary(theirs)} s, launcher {summary(ours)} s (median of {ROUNDS})"}


def _collect(proc: subprocess.Popen[str], into: list[str]) -> None:
    assert proc.stdout is not None
    into.extend(proc.stdout)


def _lose(mode: str, tmp: Path) -> list[float]:
    """Seconds from the loss until each machine's launcher has exited (the lost one's too, when it lives)."""
    with nodes.Nodes(2) as machines:
        argv = [LAUNCHER, "run", "jobs/tiny.yaml", f"output_dir={tmp}/{mode}", "args.max_steps=100000",
                "args.epochs=100000", "args.log_every=1", "args.step_sleep=0.05", "checkpoint.every_steps=0",
                "distributed.nnodes=2",
                f"distributed.rdzv_endpoint={machines.addresses[0]}:29400",
                f"distributed.timeout_s={TIMEOUT_S}"]
        procs = [machines.popen(i, argv, env=_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for i in range(2)]
        lines: list[list[str]] = [[], []]
        for i, p in enumerate(procs):
            threading.Thread(target=_collect, args=(p, lines[i]), daemon=True).start()
        deadline = time.monotonic() + 120
        while not any("step 20 " in line for line in lines[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        lost_at = time.monotonic()
        if mode == "link cut":
            machines.cut(1)
        else:
            machines.kill(0 if mode == "rendezvous host killed" else 1)
        took = []
        for p in procs:
            p.wait(timeout=TIMEOUT_S + 120)
            took.append(time.monotonic() - lost_at)
        return took


def losses(tmp: Path) -> list[dict[str, object]]:
    rows = []
    bound = TIMEOUT_S + 10
    for mode in ("machine killed", "rendezvous host killed", "link cut"):
        worst = max(max(_lose(mode, tmp)) for _ in range(TRIALS))
        rows.append({"name": f"2 machines, {mode}: seconds to every launcher gone (worst of {TRIALS})",
                     "value": worst, "target": f"< {bound} (distributed.timeout_s {TIMEOUT_S} + 10)",
                     "ok": worst < bound, "detail": "tiny job, 2 x 2 ranks"})
    return rows
