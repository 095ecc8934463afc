"""A training loop written for HF Accelerate, as its docs show it (launched with `accelerate launch`)."""
import torch
from accelerate import Accelerator
from torch import nn

accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x = torch.randn(256, 8)
y = (x[:, 0] > 0).long()
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
model, opt, data = accelerator.prepare(model, opt, data)
for xb, yb in data:
    loss = nn.functional.cross_entropy(model(xb), yb)
    opt.zero_grad()
    accelerator.backward(loss)
    opt.step()
total = accelerator.reduce(loss.detach(), reduction="mean")
accelerator.print(f"RESULT processes={accelerator.num_processes} loss={total.item():.6f}")
