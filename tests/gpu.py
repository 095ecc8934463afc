"""The GPU paths in one command: ``make gpu-check`` (``python -m tests.gpu``), about 5 minutes on one GPU.

One line per check, PASS or FAIL with its numbers; exit 1 when any fails. Without CUDA it says so and exits 0
(CI has no GPU). Checks:

* nccl-tiny: ``launcher run`` of the tiny job on 1 GPU with ``backend: auto`` picks NCCL and trains on
  ``cuda:0``; 12 steps straight and 6 + resume + 6 (deterministic algorithms) end with the same weights, bit
  for bit (the CUDA RNG state travels in the checkpoint);
* amp-classify: the classify job a few steps with ``args.amp`` bf16, then fp16 (with the scaler);
* syncbn-cuda: :class:`launcher.SyncBatchNorm` on CUDA tensors, 2 ranks sharing the GPU over Gloo, equals
  BatchNorm on the global batch (the CPU tests' tolerances), fp32/fp64 and bf16/fp16;
* syncbn-speed: step time of ``launcher.SyncBatchNorm`` / ``nn.BatchNorm2d`` (cuDNN) on one rank: what one
  would gain by delegating to torch's fused kernels on GPU;
* pinned-loader: images/s of a loop fed by the sharded loader (4 workers, pinned memory, non-blocking copies)
  / the same loop fed from GPU memory;
* bench-gpu: ``python -m benchmarks gpu`` (launcher vs plain torchrun script, ResNet-18, bf16).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = str(Path(sys.executable).with_name("launcher"))
CHECKS: list[tuple[str, Callable[[Path], str]]] = []


def check(name: str) -> Callable[[Callable[[Path], str]], Callable[[Path], str]]:
    def add(fn: Callable[[Path], str]) -> Callable[[Path], str]:
        CHECKS.append((name, fn))
        return fn

    return add


def _run(*args: str, env: dict[str, str] | None = None) -> str:
    r = subprocess.run([LAUNCHER, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, **(env or {})}, check=False)
    if r.returncode != 0:
        tail = (r.stdout + r.stderr)[-3000:]
        raise AssertionError(f"launcher {' '.join(args)}: exit {r.returncode}\n{tail}")
    return r.stdout + r.stderr


def _returned(out: str) -> dict[str, object]:
    return ast.literal_eval(re.search(r"returned (\{.*\})", out).group(1))  # type: ignore[union-attr]


def tiny_resume(tmp: Path, backend: str) -> tuple[dict[str, object], dict[str, object]]:
    """The tiny job 12 steps straight, and 6 + resume + 6, deterministic: both runs' rank 0 results
    (tests/test_gpu_check.py runs it on the CPU)."""
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    common = ["jobs/tiny.yaml", "distributed.nproc_per_node=1", f"distributed.backend={backend}",
              "data.num_workers=2", "args.deterministic=true", "checkpoint.every_steps=6",
              "checkpoint.async_save=false"]
    straight = _returned(_run("run", *common, f"output_dir={tmp}/a", "args.max_steps=12", env=env))
    _run("run", *common, f"output_dir={tmp}/b", "args.max_steps=6", env=env)
    out = _run("run", *common, f"output_dir={tmp}/b", "args.max_steps=12", env=env)
    assert "resumed from" in out and "(step 6," in out, out
    return straight, _returned(out)


@check("nccl-tiny")
def nccl_tiny(tmp: Path) -> str:
    straight, resumed = tiny_resume(tmp, "auto")
    assert straight["backend"] == "nccl" and straight["device"] == "cuda:0", straight
    assert straight["weights"] == resumed["weights"], (straight, resumed)
    return f"NCCL, weights {straight['weights']} straight and resumed"


@check("amp-classify")
def amp_classify(tmp: Path) -> str:
    from examples.shapes import generate

    generate(tmp / "shapes", train=512, val=64, size=32, per_shard=64)
    seen = []
    for amp in ("bf16", "fp16"):
        out = _run("run", "jobs/classify.yaml", f"output_dir={tmp}/{amp}", f"args.data_dir={tmp}/shapes",
                   "distributed.nproc_per_node=1", f"args.amp={amp}", "args.max_steps=8", "args.epochs=1",
                   "data.num_workers=2")
        seen.append(f"{amp}: {_returned(out).get('val_accuracy')}")
    return "; ".join(seen)


@check("syncbn-cuda")
def syncbn_cuda(tmp: Path) -> str:
    from launcher.testing import run_distributed
    from tests.test_syncbn import HALF_TOLERANCE, compare_cases, half_precision_errors

    worst = run_distributed(compare_cases, 2, "cuda", world_size=2, timeout_s=300)
    for rank, w in worst.items():
        assert w["float64"] < 1e-10 and w["float32"] < 1e-5, (rank, w)
    half = run_distributed(half_precision_errors, "cuda", world_size=2)
    for rank, out in half.items():
        for dtype, tol in HALF_TOLERANCE:
            kept, err_y, err_grad = out[dtype]
            assert kept and err_y < tol and err_grad < tol, (rank, dtype, out[dtype])
    f64, f32 = (max(w[k] for w in worst.values()) for k in ("float64", "float32"))
    return f"largest error fp64 {f64:.1e}, fp32 {f32:.1e}; bf16/fp16 within the CPU tests' bounds"


@check("syncbn-speed")
def syncbn_speed(tmp: Path) -> str:
    import torch
    from torch import nn

    from launcher import SyncBatchNorm

    def step_time(bn: nn.Module) -> float:
        x = torch.randn(64, 64, 56, 56, device="cuda", requires_grad=True)
        for _ in range(5):
            bn(x).sum().backward()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(50):
            bn(x).sum().backward()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / 50

    ours, theirs = step_time(SyncBatchNorm(64).cuda()), step_time(nn.BatchNorm2d(64).cuda())
    return f"ours / cuDNN BatchNorm2d step time {ours / theirs:.2f} ({ours * 1e3:.2f}, {theirs * 1e3:.2f} ms)"


@check("pinned-loader")
def pinned_loader(tmp: Path) -> str:
    import torch
    from torch import nn

    from launcher import ShardedIterableDataset, make_loader

    def read(shard: int) -> list[tuple[torch.Tensor, int]]:
        g = torch.Generator().manual_seed(shard)
        return [(torch.randn(3, 64, 64, generator=g), shard % 10) for _ in range(256)]

    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(32, 10)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def train(batches: object) -> float:
        n, t = 0, time.perf_counter()
        for x, y in batches:  # type: ignore[attr-defined]
            x, y = x.cuda(non_blocking=True), y.cuda(non_blocking=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            n += len(y)
        torch.cuda.synchronize()
        return n / (time.perf_counter() - t)

    ds = ShardedIterableDataset(list(range(16)), read, sizes=[256] * 16, batch_size=128, rank=0,
                                world_size=1)
    loaded = train(make_loader(ds, num_workers=4, pin_memory=True))
    x = torch.randn(128, 3, 64, 64, device="cuda")
    y = torch.randint(0, 10, (128,), device="cuda")
    memory = train([(x, y)] * 32)
    return f"loader / memory images/s {loaded / memory:.2f} ({loaded:.0f} vs {memory:.0f})"


@check("bench-gpu")
def bench_gpu(tmp: Path) -> str:
    from benchmarks import gpu

    rows = gpu.run()
    return "; ".join(f"{r['value']:.3f} {r['detail']}" for r in rows)


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine; the GPU checks did not run (nothing failed)")
        return 0
    print(f"gpu-check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    failed = 0
    for name, fn in CHECKS:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"gpu-check-{name}-") as tmp:
            try:
                detail = fn(Path(tmp))
                print(f"PASS {name} ({time.perf_counter() - start:.0f} s): {detail}", flush=True)
            except Exception:  # noqa: BLE001  (every check runs; each failure is printed in full)
                failed += 1
                took = time.perf_counter() - start
                print(f"FAIL {name} ({took:.0f} s):\n{traceback.format_exc()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
