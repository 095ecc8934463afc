"""The plain torchrun + DDP script a user would write: a small CNN (or ResNet-18) on synthetic images.

``torchrun ... benchmarks/plain_cnn.py STEPS [MODEL IMAGE_SIZE AMP BATCH]`` (defaults: cnn 32 off 32): Gloo
on CPU, NCCL with one GPU per rank when CUDA is there. Prints ``FIRST_STEP <unix time>`` after the first
optimizer step and ``THROUGHPUT <samples/s>`` over the steps after warm-up (all ranks' samples).
``benchmarks/cnn_job.py`` is the same loop through the launcher.
"""

import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from benchmarks.cnn_job import BATCH, IMAGE_SIZE, SAMPLES, WARMUP, make_model, samples

steps = int(sys.argv[1])
name = sys.argv[2] if len(sys.argv) > 2 else "cnn"
size = int(sys.argv[3]) if len(sys.argv) > 3 else IMAGE_SIZE
amp = sys.argv[4] if len(sys.argv) > 4 else "off"
batch = int(sys.argv[5]) if len(sys.argv) > 5 else BATCH
if torch.cuda.is_available():
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl")
else:
    device = torch.device("cpu")
    dist.init_process_group("gloo")
# autocast on GPU only (launcher.autocast_dtype's rule, written out: this script uses no launcher code)
dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp) if device.type == "cuda" else None
torch.backends.cudnn.benchmark = True
torch.manual_seed(0)
model = make_model(name).to(device)
on_gpu = device.type == "cuda"
model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if on_gpu else None)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
data = TensorDataset(*samples(0, SAMPLES, size))
loader = DataLoader(data, batch_size=batch, sampler=DistributedSampler(data), pin_memory=on_gpu)
done, start = 0, 0.0
while done < steps:
    for xb, yb in loader:
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        done += 1
        if done == 1 and dist.get_rank() == 0:
            print(f"FIRST_STEP {time.time()}", flush=True)
        if done == WARMUP:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        if done == steps:
            break
if device.type == "cuda":
    torch.cuda.synchronize(device)
if dist.get_rank() == 0:
    rate = (steps - WARMUP) * batch * dist.get_world_size() / (time.perf_counter() - start)
    print(f"THROUGHPUT {rate}", flush=True)
dist.destroy_process_group()
