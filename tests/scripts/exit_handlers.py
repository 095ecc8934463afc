"""A torchrun script that closes its logging run in an atexit handler (as W&B users do), after a worker
thread has finished: ``exit_handlers.py OUT [wait]`` (``wait``: trains until stopped)."""
import atexit
import os
import sys
import threading
import time

import torch.distributed as dist

dist.init_process_group("gloo")
rank, out = dist.get_rank(), sys.argv[1]


def close_run():
    time.sleep(0.2)
    thread_done = os.path.exists(f"{out}/thread-rank{rank}")
    with open(f"{out}/closed-rank{rank}", "w") as f:
        f.write("after the thread" if thread_done else "before the thread")


def upload():
    time.sleep(0.5)
    with open(f"{out}/thread-rank{rank}", "w") as f:
        f.write("done")


atexit.register(close_run)
threading.Thread(target=upload).start()
print(f"rank {rank} trained", flush=True)
if sys.argv[2:] == ["wait"]:
    time.sleep(120)
dist.destroy_process_group()
