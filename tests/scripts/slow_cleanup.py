"""A torchrun script that cleans up on Ctrl-C for ``CLEANUP_S`` seconds, then writes ``OUT/cleaned``;
its rank 0 finishes at once: ``slow_cleanup.py OUT``."""
import os
import sys
import time

import torch.distributed as dist

dist.init_process_group("gloo")
if dist.get_rank() == 0:
    print("rank 0 done", flush=True)
    sys.exit(0)
try:
    print("rank 1 training", flush=True)
    time.sleep(120)
except KeyboardInterrupt:
    time.sleep(float(os.environ.get("CLEANUP_S", "0")))
    with open(os.path.join(sys.argv[1], "cleaned"), "w") as f:
        f.write("yes")
    raise
