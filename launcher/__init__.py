"""launcher: one job file, the same DDP training on a laptop, a multi-GPU box or SLURM.

Everything a training loop needs is importable from here. The names that need torch are imported on first use
(PEP 562), so that ``launcher run`` can start its ranks' fork server before it imports torch itself (see
:mod:`launcher.launching.rankserver`).

Where each module runs: :mod:`launcher.cli` and :mod:`launcher.launching` in the ``launcher`` process;
:mod:`launcher.rank` inside each rank; parts of :mod:`launcher.data` in each rank's DataLoader workers; the
rest (``dist``, ``wrap``, ``syncbn``, ``rng``, ``checkpoint``, ``data``) is the library your loop calls.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import EXACT as EXACT
from .config import ConfigError as ConfigError
from .config import Job as Job
from .config import above as above
from .config import at_least as at_least
from .config import load as load_job
from .errors import EXIT_REQUEUE as EXIT_REQUEUE
from .errors import LaunchError as LaunchError
from .errors import RankFailure as RankFailure

if TYPE_CHECKING:
    from .checkpoint import Checkpointer as Checkpointer
    from .checkpoint import CheckpointError as CheckpointError
    from .checkpoint import TrainState as TrainState
    from .checkpoint import load_checkpoint as load_checkpoint
    from .data import ShardedIterableDataset as ShardedIterableDataset
    from .data import make_loader as make_loader
    from .dist import all_gather_object as all_gather_object
    from .dist import autocast_dtype as autocast_dtype
    from .dist import barrier as barrier
    from .dist import broadcast_object as broadcast_object
    from .dist import get_device as get_device
    from .dist import get_local_rank as get_local_rank
    from .dist import get_rank as get_rank
    from .dist import get_world_size as get_world_size
    from .dist import is_main_process as is_main_process
    from .dist import log as log
    from .dist import note_step as note_step
    from .fsdp import full_state_dict as full_state_dict
    from .launching.api import launch as launch
    from .metrics import log_metrics as log_metrics
    from .rng import seed_everything as seed_everything
    from .syncbn import SyncBatchNorm as SyncBatchNorm
    from .syncbn import convert_sync_batchnorm as convert_sync_batchnorm
    from .syncbn import revert_sync_batchnorm as revert_sync_batchnorm
    from .wrap import accumulate as accumulate
    from .wrap import unwrap as unwrap
    from .wrap import wrap_for_job as wrap_for_job
    from .wrap import wrap_model as wrap_model

__version__ = "0.1.0"

#: Public name -> the submodule that defines it (imported when the name is first used).
_LAZY = {
    **dict.fromkeys(
        ["all_gather_object", "autocast_dtype", "barrier", "broadcast_object", "get_device", "get_local_rank",
         "get_rank", "get_world_size", "is_main_process", "log", "note_step", "set_total_steps"],
        "dist",
    ),
    **dict.fromkeys(["CheckpointError", "Checkpointer", "TrainState", "load_checkpoint"], "checkpoint"),
    **dict.fromkeys(["ShardedIterableDataset", "make_loader"], "data"),
    "seed_everything": "rng",
    "full_state_dict": "fsdp",
    "log_metrics": "metrics",
    "launch": "launching.api",
    **dict.fromkeys(["SyncBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm"], "syncbn"),
    **dict.fromkeys(["accumulate", "unwrap", "wrap_for_job", "wrap_model"], "wrap"),
}

__all__ = [
    "EXACT",
    "EXIT_REQUEUE",
    "CheckpointError",
    "Checkpointer",
    "ConfigError",
    "Job",
    "LaunchError",
    "RankFailure",
    "ShardedIterableDataset",
    "SyncBatchNorm",
    "TrainState",
    "above",
    "accumulate",
    "all_gather_object",
    "at_least",
    "autocast_dtype",
    "barrier",
    "broadcast_object",
    "convert_sync_batchnorm",
    "full_state_dict",
    "get_device",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "launch",
    "load_checkpoint",
    "load_job",
    "log",
    "log_metrics",
    "make_loader",
    "note_step",
    "revert_sync_batchnorm",
    "seed_everything",
    "set_total_steps",
    "unwrap",
    "wrap_for_job",
    "wrap_model",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'launcher' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
