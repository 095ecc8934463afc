"""A torchrun script whose rank 0 prints its result as JSON for a sweep runner to read."""
import json
import sys

import torch.distributed as dist

dist.init_process_group("gloo")
for i in range(3):
    print(f"rank {dist.get_rank()} line {i}", flush=True)
    print(f"rank {dist.get_rank()} note {i}", file=sys.stderr, flush=True)
if dist.get_rank() == 0:
    print(json.dumps({"result": 0.5}), flush=True)
dist.destroy_process_group()
