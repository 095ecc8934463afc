"""A torchrun script whose rank 0 raises while its DataLoader has worker processes."""
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset


class Numbers(Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, i):
        return torch.tensor([float(i)])


dist.init_process_group("gloo")
batches = iter(DataLoader(Numbers(), batch_size=4, num_workers=2))
next(batches)
if dist.get_rank() == 0:
    raise RuntimeError(f"boom on rank {dist.get_rank()}")
dist.barrier()
