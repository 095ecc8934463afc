"""Where are we running? One small interface, one class per launcher, detection in one ordered tuple.

Getters only read ``os.environ``; nothing here writes it (only the code that starts processes does).
"""

from __future__ import annotations

import os
import socket
from abc import ABC, abstractmethod

#: Set by ``launcher submit``'s task for its ranks: the file counting the job's time-limit requeues (one
#: line each; :mod:`launcher.rank.stop`). ``SLURM_RESTART_COUNT`` also counts preemptions and node failures.
REQUEUE_LEDGER_ENV = "LAUNCHER_REQUEUE_LEDGER"

#: Most intra-op threads a rank takes from ``OMP_NUM_THREADS``: 99999 made every rank fail to fork its
#: DataLoader workers' server (EAGAIN), as the machine's thread limit was reached.
MAX_THREADS = max(1024, os.cpu_count() or 1)


def thread_count(value: str | None) -> int | None:
    """``OMP_NUM_THREADS`` as a usable thread count (1 to :data:`MAX_THREADS`), or None (unset, empty,
    ``abc``, ``0``, ``-1``, ``1e9``, too large): libgomp ignores such a value with a warning, and so must
    the launcher instead of failing every rank."""
    text = (value or "").strip()
    if not text.isdigit():
        return None
    n = int(text)
    return n if 1 <= n <= MAX_THREADS else None


class ClusterEnvironment(ABC):
    """What a rank needs to know about its place in the job."""

    name: str = "base"

    @staticmethod
    @abstractmethod
    def detect() -> bool:
        """True when the current process runs under this environment."""

    @abstractmethod
    def spawns_here(self) -> bool:
        """True when ``launcher run`` must start the ranks itself (nobody else did)."""

    @abstractmethod
    def rank(self) -> int:
        """Global rank of this process."""

    @abstractmethod
    def local_rank(self) -> int:
        """Rank of this process on its node."""

    @abstractmethod
    def world_size(self) -> int:
        """Number of ranks in the job."""

    @abstractmethod
    def local_world_size(self) -> int:
        """Number of ranks on this node."""

    @abstractmethod
    def master_addr(self) -> str:
        """Host of rank 0's rendezvous store."""

    @abstractmethod
    def master_port(self) -> int:
        """Port of rank 0's rendezvous store."""

    def describe(self) -> str:
        """One line for logs."""
        return (
            f"{self.name}: rank {self.rank()}/{self.world_size()} (local {self.local_rank()}) "
            f"on {socket.gethostname()}"
        )


class TorchElasticEnvironment(ClusterEnvironment):
    """Started by torchrun or by our own spawner (which uses the same elastic agent)."""

    name = "torchelastic"

    @staticmethod
    def detect() -> bool:
        return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ

    def spawns_here(self) -> bool:
        return False

    def rank(self) -> int:
        return int(os.environ["RANK"])

    def local_rank(self) -> int:
        return int(os.environ["LOCAL_RANK"])

    def world_size(self) -> int:
        return int(os.environ["WORLD_SIZE"])

    def local_world_size(self) -> int:
        return int(os.environ["LOCAL_WORLD_SIZE"])

    def master_addr(self) -> str:
        return os.environ["MASTER_ADDR"]

    def master_port(self) -> int:
        return int(os.environ["MASTER_PORT"])


def slurm_first_host(nodelist: str) -> str:
    """First host name of a SLURM node list (``gpu[003-005,7],cpu1`` -> ``gpu003``)."""
    depth, end = 0, len(nodelist)
    for i, c in enumerate(nodelist):
        depth += c == "["
        depth -= c == "]"
        if c == "," and depth == 0:
            end = i
            break
    head = nodelist[:end].strip()
    if "[" not in head:
        return head
    prefix, _, rest = head.partition("[")
    first = rest.split(",")[0].split("-")[0].rstrip("]")
    return prefix + first


def slurm_port(job_id: str) -> int:
    """A port in 15000-24999 derived from the job id, so jobs sharing a node do not collide."""
    digits = "".join(c for c in job_id if c.isdigit()) or "0"
    return 15000 + int(digits[-4:]) % 10000


class SlurmEnvironment(ClusterEnvironment):
    """One rank per task of an ``srun`` step (submitit runs its tasks the same way)."""

    name = "slurm"

    @staticmethod
    def detect() -> bool:
        # SLURM_STEP_ID marks an srun step; in a plain salloc/sbatch shell we are not one rank of many.
        return "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ and "SLURM_NTASKS" in os.environ

    def spawns_here(self) -> bool:
        return False

    def rank(self) -> int:
        return int(os.environ["SLURM_PROCID"])

    def local_rank(self) -> int:
        return int(os.environ.get("SLURM_LOCALID", "0"))

    def world_size(self) -> int:
        return int(os.environ["SLURM_NTASKS"])

    def local_world_size(self) -> int:
        per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "")
        first = per_node.split(",")[0].split("(")[0]
        if first.isdigit():
            return int(first)
        return self.world_size() // max(1, int(os.environ.get("SLURM_JOB_NUM_NODES", "1")))

    def master_addr(self) -> str:
        if "MASTER_ADDR" in os.environ:
            return os.environ["MASTER_ADDR"]
        nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
        return slurm_first_host(nodelist) if nodelist else "127.0.0.1"

    def master_port(self) -> int:
        if "MASTER_PORT" in os.environ:
            return int(os.environ["MASTER_PORT"])
        return slurm_port(os.environ.get("SLURM_JOB_ID", "0"))


class LocalEnvironment(ClusterEnvironment):
    """Nobody started us: ``launcher run`` spawns ``nproc_per_node`` ranks itself."""

    name = "local"

    @staticmethod
    def detect() -> bool:
        return True

    def spawns_here(self) -> bool:
        return True

    def rank(self) -> int:
        return 0

    def local_rank(self) -> int:
        return 0

    def world_size(self) -> int:
        return 1

    def local_world_size(self) -> int:
        return 1

    def master_addr(self) -> str:
        return "127.0.0.1"

    def master_port(self) -> int:
        return 0


#: Detection order: the first whose ``detect()`` is true wins; Local always matches.
ENVIRONMENTS: tuple[type[ClusterEnvironment], ...] = (
    TorchElasticEnvironment,
    SlurmEnvironment,
    LocalEnvironment,
)


def detect() -> ClusterEnvironment:
    """The environment of the current process."""
    for cls in ENVIRONMENTS:
        if cls.detect():
            return cls()
    raise AssertionError("LocalEnvironment always matches")
