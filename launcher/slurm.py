"""``launcher submit``: SLURM through submitit (issue 6, not built yet).

Running inside an allocation already works: ``srun launcher run JOB.yaml`` makes every task one rank
(see :class:`launcher.env.SlurmEnvironment`).
"""

from __future__ import annotations

from typing import Any

from .errors import LaunchError


def cmd_submit(job: Any, wait: bool = False, sweeps: list[str] | None = None) -> int:
    raise LaunchError(
        "launcher submit is not available yet (SLURM submission through submitit is still being built)\n"
        f"HINT: inside an allocation, run `srun --ntasks-per-node=N launcher run {job.source}`: "
        "each task runs as one rank"
    )
