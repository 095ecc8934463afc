"""In place (``launcher run`` under torchrun, in an srun step, ``launcher submit``) no launcher process
watches the ranks: they leave their heartbeats in the run directory and rank 0 runs the progress line.

The folder, ``RUN_DIR/logs/heartbeat-RUN-ATTEMPT``, is named from what every rank's environment says alike
(torchrun's run id and restart count, or SLURM's job id and restart count): no collective. With several
machines the run directory must be shared (as checkpoints need) for rank 0 to see every rank.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .. import dist
from ..spec import RankSpec


@contextlib.contextmanager
def watched(spec: RankSpec, rank: int) -> Iterator[None]:
    """Around the rank's work: the heartbeat folder set up (nothing when a launcher set one, the job has no
    run directory, or ``distributed.progress_s`` is 0); on rank 0, the progress line and ``perf.jsonl``."""
    if os.environ.get(dist.HEARTBEAT_ENV) or not spec.run_dir or spec.progress_s <= 0:
        yield
        return
    env = os.environ
    run = env.get("TORCHELASTIC_RUN_ID") or env.get("SLURM_JOB_ID") or "local"
    attempt = env.get("TORCHELASTIC_RESTART_COUNT") or env.get("SLURM_RESTART_COUNT") or "0"
    logs = Path(spec.run_dir) / "logs"
    folder = logs / f"heartbeat-{run}-{attempt}"
    done = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        env[dist.HEARTBEAT_ENV] = str(folder)
        if rank == 0:
            from .. import perf

            for old in logs.glob(f"heartbeat-{run}-*"):  # an earlier attempt's (torchrun restarted the ranks)
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)
            done = perf.watch(folder, logs, spec.progress_s)
    except OSError:  # figures are a help, never a reason to fail a rank
        env.pop(dist.HEARTBEAT_ENV, None)
    try:
        yield
    finally:
        if done is not None:
            done.set()
            shutil.rmtree(folder, ignore_errors=True)
