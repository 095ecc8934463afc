"""GPU: images/s of the example job's ResNet-18 through ``launcher run`` vs the same loop in a plain torchrun
script, bf16 autocast, 1 GPU (reported, no target). Skipped, saying so, on a machine without CUDA.

Both sides are ``cnn_job.py`` / ``plain_cnn.py`` with ``model=resnet18`` (``args.model=resnet18`` of
jobs/classify.yaml), synthetic 128 px images kept in host memory, batch 128, pinned memory and non-blocking
copies; alternated ``ROUNDS`` times like the CPU rows.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import torch

from .common import paired, summary
from .overhead import measure

STEPS, ROUNDS, SIZE, BATCH = 300, 5, 128, 128
NAME = "GPU images/s, launcher run / plain torchrun script (example ResNet-18, bf16 autocast, 1 GPU)"


def run(rounds: int = ROUNDS, steps: int = STEPS) -> list[dict[str, object]]:
    if not torch.cuda.is_available():
        return [{"name": NAME, "value": float("nan"), "target": "reported", "ok": True,
                 "detail": "not measured: no CUDA device on this machine"}]
    tmp = tempfile.mkdtemp(prefix="bench-gpu-")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    plain_cmd = [torchrun, "--standalone", "--nproc-per-node", "1", "benchmarks/plain_cnn.py", str(steps),
                 "resnet18", str(SIZE), "bf16", str(BATCH)]
    ours_cmd = [os.path.join(os.path.dirname(sys.executable), "launcher"), "run", "jobs/bench_cnn.yaml",
                f"output_dir={tmp}", f"args.max_steps={steps}", "distributed.nproc_per_node=1",
                "distributed.backend=nccl", "args.amp=bf16", "args.model=resnet18", f"args.image_size={SIZE}",
                f"args.batch={BATCH}"]
    plain, ours = [], []
    try:
        for _ in range(rounds):
            plain.append(measure(plain_cmd)[1])
            ours.append(measure(ours_cmd)[1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = paired(plain, ours)
    return [{"name": NAME, "value": ratio, "target": "reported", "ok": True,
             "detail": f"{torch.cuda.get_device_name()}: plain {summary(plain)}/s, "
                       f"launcher {summary(ours)}/s"}]
