"""A torchrun script with a DataLoader of its own (torch's, two workers) whose workers stop in ``slow_read``,
and a helper program each rank starts (``sleep``): ``stuck_loader.py``."""
import subprocess
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset


def slow_read(i):
    time.sleep(1000)
    return torch.tensor(i)


class Slow(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        return slow_read(i)


dist.init_process_group("gloo")
# preexec_fn: Python forks, runs its fork hooks in the child, then the child runs another program
helper = subprocess.Popen(["sleep", "300"], preexec_fn=lambda: None)  # noqa: PLW1509 - users do
for batch in DataLoader(Slow(), batch_size=4, num_workers=2):
    pass
