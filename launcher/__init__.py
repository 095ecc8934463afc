"""launcher: one job file, the same DDP training on a laptop, a multi-GPU box or SLURM."""

from .config import ConfigError as ConfigError
from .config import Job as Job
from .config import load as load_job
from .dist import all_gather_object as all_gather_object
from .dist import barrier as barrier
from .dist import broadcast_object as broadcast_object
from .dist import get_device as get_device
from .dist import get_local_rank as get_local_rank
from .dist import get_rank as get_rank
from .dist import get_world_size as get_world_size
from .dist import is_main_process as is_main_process
from .dist import note_step as note_step
from .errors import EXIT_REQUEUE as EXIT_REQUEUE
from .errors import LaunchError as LaunchError
from .errors import RankFailure as RankFailure
from .rng import seed_everything as seed_everything
from .spawn import launch as launch

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "EXIT_REQUEUE",
    "Job",
    "LaunchError",
    "RankFailure",
    "all_gather_object",
    "barrier",
    "broadcast_object",
    "get_device",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "launch",
    "load_job",
    "note_step",
    "seed_everything",
]

from .syncbn import SyncBatchNorm as SyncBatchNorm  # noqa: E402
from .syncbn import convert_sync_batchnorm as convert_sync_batchnorm  # noqa: E402
from .syncbn import revert_sync_batchnorm as revert_sync_batchnorm  # noqa: E402
from .wrap import accumulate as accumulate  # noqa: E402
from .wrap import unwrap as unwrap  # noqa: E402
from .wrap import wrap_for_job as wrap_for_job  # noqa: E402
from .wrap import wrap_model as wrap_model  # noqa: E402

__all__ += [
    "SyncBatchNorm",
    "accumulate",
    "convert_sync_batchnorm",
    "revert_sync_batchnorm",
    "unwrap",
    "wrap_for_job",
    "wrap_model",
]
