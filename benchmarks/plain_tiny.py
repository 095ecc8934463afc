"""The plain torchrun + DDP script a user would write for the tiny job (same model, data and steps)."""

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

dist.init_process_group("gloo")
torch.manual_seed(0)
model = nn.parallel.DistributedDataParallel(
    nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2)))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
g = torch.Generator().manual_seed(dist.get_rank())
x = torch.randn(512, 8, generator=g)
loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16)
steps = int(sys.argv[1])
done = 0
while done < steps:
    for xb, yb in loader:
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        done += 1
        if done == steps:
            break
dist.destroy_process_group()
