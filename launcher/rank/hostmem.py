"""Keep the host memory that CPU tensors free inside the rank instead of returning it to the OS at each free.

glibc's malloc gives the top of its heap back to the kernel (``brk``) whenever more than its trim threshold
is free there, and serves large blocks with ``mmap``/``munmap``. A CPU training step allocates and frees
megabytes of activations and gradients, so, depending on how the heap happens to be laid out, every step
can page-fault each of those pages in again: measured on the benchmark CNN (2 Gloo ranks, 2 vCPUs),
500 000-700 000 minor faults and 1.3-1.5 s of system time per 100 steps, 1.4-1.6x slower than the same loop
without the faults. A plain torchrun script hits or misses this by luck of heap layout.

:func:`keep_freed_memory` sets glibc's thresholds once at rank start (``mallopt``), like a caching allocator:
blocks up to 32 MiB (glibc's ceiling) come from the heap, and up to 1 GiB of freed heap stays mapped. The cost
is that a rank's resident memory stays near its peak. DataLoader workers forked from the rank inherit the
setting. PyTorch's CPU tuning guide suggests preloading jemalloc or tcmalloc instead; that needs a library
installed and ``LD_PRELOAD`` set before the process starts, which a rank started by torchrun or srun cannot
do for itself. Off with ``distributed.keep_freed_memory=false``; does nothing outside glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit (half its 64 MiB heap size)
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Set glibc's malloc thresholds for training (see the module docstring); True when they were set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    mmap_set = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    trim_set = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(mmap_set and trim_set)
