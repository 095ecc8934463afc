"""A training loop written for Lightning Fabric (launched with `fabric run` or torchrun)."""
import torch
from lightning_fabric import Fabric
from torch import nn

fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
fabric.launch()
fabric.seed_everything(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
model, opt = fabric.setup(model, opt)
x = torch.randn(256, 8)
y = (x[:, 0] > 0).long()
data = fabric.setup_dataloaders(
    torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16))
for xb, yb in data:
    loss = nn.functional.cross_entropy(model(xb), yb)
    opt.zero_grad()
    fabric.backward(loss)
    opt.step()
total = fabric.all_reduce(loss.detach(), reduce_op="mean")
assert isinstance(total, torch.Tensor)
fabric.print(f"RESULT processes={fabric.world_size} loss={total.item():.6f}")
