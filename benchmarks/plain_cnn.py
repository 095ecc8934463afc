"""The plain torchrun + DDP script a user would write: a small CNN on synthetic images, 2 Gloo ranks.

Prints ``FIRST_STEP <unix time>`` after the first optimizer step and ``THROUGHPUT <samples/s>`` over the
steps after warm-up (all ranks' samples). ``benchmarks/cnn_job.py`` is the same loop through the launcher.
"""

import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from benchmarks.cnn_job import BATCH, WARMUP, make_cnn, samples

dist.init_process_group("gloo")
steps = int(sys.argv[1])
torch.manual_seed(0)
model = nn.parallel.DistributedDataParallel(make_cnn())
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
x, y = samples(0, 4096)
loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, sampler=DistributedSampler(TensorDataset(x, y)))
done, start = 0, 0.0
while done < steps:
    for xb, yb in loader:
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        done += 1
        if done == 1 and dist.get_rank() == 0:
            print(f"FIRST_STEP {time.time()}", flush=True)
        if done == WARMUP:
            start = time.perf_counter()
        if done == steps:
            break
if dist.get_rank() == 0:
    rate = (steps - WARMUP) * BATCH * dist.get_world_size() / (time.perf_counter() - start)
    print(f"THROUGHPUT {rate}", flush=True)
dist.destroy_process_group()
