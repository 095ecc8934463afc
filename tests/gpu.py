"""The GPU paths in one command: ``make gpu-check`` (``python -m tests.gpu``), about 5 minutes on one GPU.

One line per check, PASS or FAIL with its numbers; exit 1 when any fails. Without CUDA it says so and exits 0
(CI has no GPU). Checks:

* nccl-tiny: ``launcher run`` of the tiny job on 1 GPU with ``backend: auto`` picks NCCL and trains on
  ``cuda:0``; 12 steps straight and 6 + resume + 6 (deterministic algorithms) end with the same weights, bit
  for bit (the CUDA RNG state travels in the checkpoint);
* amp-classify: the classify job a few steps with ``args.amp`` bf16, then fp16 (with the scaler);
* syncbn-cuda: :class:`launcher.SyncBatchNorm` on CUDA tensors, 2 ranks sharing the GPU over Gloo, equals
  BatchNorm on the global batch (the CPU tests' tolerances), fp32/fp64 and bf16/fp16;
* syncbn-speed: step time of the plain-op SyncBatchNorm (CPU's) / torch's fused kernels (what
  ``launcher.SyncBatchNorm`` uses on CUDA), on a one-rank NCCL group, fp32 and bf16;
* pinned-loader: images/s of ResNet-18 fed by the sharded loader (4 workers, pinned memory, non-blocking
  copies) / the same loop fed from GPU memory;
* fsdp-nccl: the tiny job under ``distributed.strategy: fsdp`` on NCCL, bf16 parameters and fp32 gradient
  reduction: its loss within bf16's reach of the DDP run's; fp32 FSDP 6 + resume + 6 equal to 12 straight, bit
  for bit (a sharded checkpoint staged from GPU memory);
* mfu: the classify job 300 steps in bf16 with a progress line every second: every window has its FLOP/s,
  and an MFU between 0 and 1 on a GPU of ``launcher.rank.figures.PEAK_BF16`` ("no MFU" said on another);
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
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = str(Path(sys.executable).with_name("launcher"))
CHECKS: list[tuple[str, Callable[[Path], str]]] = []
BUDGET_S = 300  # the whole command, on the one GPU a lent machine has (issue #24)


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
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:  # the straight run beside the first half: one start less to wait for
        first = pool.submit(_run, "run", *common, f"output_dir={tmp}/a", "args.max_steps=12", env=env)
        _run("run", *common, f"output_dir={tmp}/b", "args.max_steps=6", env=env)
        straight = _returned(first.result())
    out = _run("run", *common, f"output_dir={tmp}/b", "args.max_steps=12", env=env)
    assert "resumed from" in out and "(step 6," in out, out
    return straight, _returned(out)


@check("nccl-tiny")
def nccl_tiny(tmp: Path) -> str:
    straight, resumed = tiny_resume(tmp, "auto")
    assert straight["backend"] == "nccl" and straight["device"] == "cuda:0", straight
    assert straight["weights"] == resumed["weights"], (straight, resumed)
    return f"NCCL, weights {straight['weights']} straight and resumed"


@check("fsdp-nccl")
def fsdp_nccl(tmp: Path) -> str:
    common = ["jobs/tiny.yaml", "distributed.nproc_per_node=1", "args.deterministic=true",
              "checkpoint.every_steps=6"]
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    ddp = _returned(_run("run", *common, "args.max_steps=12", f"output_dir={tmp}/ddp", env=env))
    fsdp = [*common, "distributed.strategy=fsdp"]
    mixed = _returned(_run("run", *fsdp, "args.max_steps=12", f"output_dir={tmp}/bf16",
                           "distributed.fsdp.param_dtype=bfloat16", "distributed.fsdp.reduce_dtype=float32",
                           env=env))
    assert mixed["backend"] == "nccl" and mixed["device"] == "cuda:0", mixed
    losses = float(ddp["loss"]), float(mixed["loss"])  # type: ignore[arg-type]
    assert abs(losses[0] - losses[1]) < 0.05, (ddp, mixed)
    straight = _returned(_run("run", *fsdp, "args.max_steps=12", f"output_dir={tmp}/a", env=env))
    _run("run", *fsdp, "args.max_steps=6", f"output_dir={tmp}/b", env=env)
    resumed = _returned(_run("run", *fsdp, "args.max_steps=12", f"output_dir={tmp}/b", env=env))
    assert straight["weights"] == resumed["weights"], (straight, resumed)
    return (f"loss DDP fp32 {losses[0]:.4f}, FSDP bf16/fp32 {losses[1]:.4f}; FSDP resumed = straight "
            f"({straight['weights']})")


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


@check("mfu")
def mfu(tmp: Path) -> str:
    """The progress line's MFU on a GPU: FLOPs counted once by FlopCounterMode, the device's peak by name."""
    import json

    import torch

    from examples.shapes import generate
    from launcher.rank.figures import PEAK_BF16

    generate(tmp / "shapes", train=2048, val=64, size=32, per_shard=256)
    out = _run("run", "jobs/classify.yaml", f"output_dir={tmp}/runs", f"args.data_dir={tmp}/shapes",
               "distributed.nproc_per_node=1", "args.amp=bf16", "args.max_steps=300", "args.epochs=100",
               "data.num_workers=2", "distributed.progress_s=1")
    windows = [json.loads(line) for line in (tmp / "runs" / "classify" / "logs" / "perf.jsonl").open()]
    assert windows and all(w["flops_per_s"] for w in windows), windows
    known = any(part in torch.cuda.get_device_name() for part in PEAK_BF16)
    mfus = [w["mfu"] for w in windows]
    if known:
        assert all(m is not None and 0 < m < 1 for m in mfus) and " | MFU " in out, (mfus, out[-2000:])
    else:
        assert all(m is None for m in mfus) and "no MFU" in out, (mfus, out[-2000:])
    return f"{torch.cuda.get_device_name()}: MFU {mfus} ({windows[-1]['flops_per_s'] / 1e12:.1f} TFLOP/s)"


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
    """Step time (forward + backward) of the plain-op SyncBatchNorm (what CPU runs) / torch's fused kernels
    (what ``launcher.SyncBatchNorm`` calls on CUDA), both synchronizing over a one-rank NCCL group (NCCL
    refuses two ranks on one GPU); the two agree, and cuDNN's unsynchronized BatchNorm2d is the floor."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from launcher import syncbn

    def step_time(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
        for _ in range(5):
            fn(x).float().sum().backward()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(50):
            fn(x).float().sum().backward()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / 50

    dist.init_process_group("nccl", store=dist.FileStore(str(tmp / "store"), 1), rank=0, world_size=1,
                            device_id=torch.device("cuda:0"))
    try:
        bn = nn.BatchNorm2d(64).cuda()
        group = dist.group.WORLD

        def plain(x: torch.Tensor) -> torch.Tensor:
            return syncbn._SyncBatchNormFn.apply(x, bn.weight, bn.bias, bn.eps, group, 1)[0]

        def fused(x: torch.Tensor) -> torch.Tensor:
            return syncbn._torch_fused().apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps,
                                               0.1, group, 1)

        seen = []
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(64, 64, 56, 56, device="cuda", dtype=dtype, requires_grad=True)
            err = float((plain(x) - fused(x)).detach().abs().max())
            assert err < (1e-4 if dtype == torch.float32 else 0.05), (dtype, err)
            ours, torchs = step_time(plain, x), step_time(fused, x)
            cudnn = step_time(bn, x) if dtype == torch.float32 else float("nan")
            seen.append(f"{str(dtype)[6:]}: plain / fused {ours / torchs:.2f} ({ours * 1e3:.2f} vs "
                        f"{torchs * 1e3:.2f} ms; cuDNN BatchNorm2d {cudnn * 1e3:.2f} ms)")
        assert syncbn.uses_torch_kernels(torch.device("cuda", 0))
        return "; ".join(seen)
    finally:
        dist.destroy_process_group()


@check("pinned-loader")
def pinned_loader(tmp: Path) -> str:
    """ResNet-18 (bf16 autocast, channels_last) on 64 px uint8 images: images/s fed by the sharded loader (4
    workers, pinned memory, non-blocking copies) / fed by one batch already on the GPU. Samples are slices of
    a tensor in host memory (decoded data), so the ratio is the loader's cost, not a decoder's; the first
    WARM batches of each loop are not timed (worker start, cuDNN's choice of kernels)."""
    import torch
    import torchvision
    from torch import nn

    from launcher import ShardedIterableDataset, make_loader

    shards, per_shard, batch, warm = 64, 256, 128, 4
    images = torch.randint(0, 256, (shards, per_shard, 3, 64, 64), dtype=torch.uint8)

    def read(shard: int) -> list[tuple[torch.Tensor, int]]:
        return [(images[shard, i], shard % 10) for i in range(per_shard)]

    model = torchvision.models.resnet18(num_classes=10).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def train(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, float]:
        n, t = 0, 0.0
        for i, (x, y) in enumerate(batches):
            if i == warm:
                torch.cuda.synchronize()
                t = time.perf_counter()
            x, y = x.cuda(non_blocking=True), y.cuda(non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last).float().div_(255)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            n += len(y)
        torch.cuda.synchronize()
        return n, (n - warm * batch) / (time.perf_counter() - t)

    gpu_batch = (images[0, :batch].cuda(), torch.randint(0, 10, (batch,), device="cuda"))
    train([gpu_batch] * 16)  # cuDNN picks its kernels before either loop is timed
    ds = ShardedIterableDataset(list(range(shards)), read, sizes=[per_shard] * shards, batch_size=batch,
                                rank=0, world_size=1)
    n, loaded = train(make_loader(ds, num_workers=4, pin_memory=True))
    assert n == shards * per_shard, n
    _, memory = train([gpu_batch] * (shards * per_shard // batch))
    return f"loader / memory images/s {loaded / memory:.2f} ({loaded:.0f} vs {memory:.0f})"


@check("bench-gpu")
def bench_gpu(tmp: Path) -> str:
    from benchmarks import gpu

    rows = gpu.run(rounds=2, steps=200)  # (python -m benchmarks gpu: 5 rounds of 300 steps)
    return "; ".join(f"{r['value']:.3f} {r['detail']}" for r in rows)


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine; the GPU checks did not run (nothing failed)")
        return 0
    print(f"gpu-check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    only = set(sys.argv[1:])  # check names: run those alone
    failed, began = 0, time.perf_counter()
    for name, fn in CHECKS:
        if only and name not in only:
            continue
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"gpu-check-{name}-") as tmp:
            try:
                detail = fn(Path(tmp))
                print(f"PASS {name} ({time.perf_counter() - start:.0f} s): {detail}", flush=True)
            except Exception:  # noqa: BLE001  (every check runs; each failure is printed in full)
                failed += 1
                took = time.perf_counter() - start
                print(f"FAIL {name} ({took:.0f} s):\n{traceback.format_exc()}", flush=True)
    took = time.perf_counter() - began
    if not only and took > BUDGET_S:
        failed += 1
        print(f"FAIL budget: the checks took {took:.0f} s, over {BUDGET_S} s", flush=True)
    print(f"gpu-check: {len(CHECKS) if not only else len(only)} check(s), {failed} failed, {took:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
