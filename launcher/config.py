"""Job files: a YAML document mapped onto nested dataclasses, strictly, with errors that say how to fix them.

``load(path, overrides)`` is the only entry point. Every section is a dataclass with a docstring under each
field; unknown keys, wrong types and missing required keys raise :class:`ConfigError`, which names the file,
the key path, what was expected and the valid keys. Overrides are ``key.path=value`` with the value parsed
as YAML (``args.max_steps=20``, ``slurm.partition=gpu``, ``args.width='[64, 64]'``).
The strict conversion itself is :mod:`launcher.typed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from . import yamlfile
from .typed import ConfigError, build

#: Field metadata: a change of this key makes a resumed run differ from an uninterrupted one. The checkpointer
#: refuses such a change unless ``checkpoint.allow_changes`` is set (entry points mark their own fields too).
EXACT = {"resume": "exact"}
#: Field metadata: this key may change between a run and its resume without being listed.
IGNORED = {"resume": "ignore"}


def at_least(low: float, **metadata: Any) -> dict[str, Any]:
    """Field metadata: the value (when not null) must be ``>= low``; checked when the job is loaded."""
    return {**metadata, "min": low}


def above(low: float, **metadata: Any) -> dict[str, Any]:
    """Field metadata: the value (when not null) must be ``> low``; checked when the job is loaded."""
    return {**metadata, "above": low}


@dataclass
class FsdpConfig:
    """FSDP2 settings (``distributed.strategy: fsdp``): torch's ``fully_shard`` options."""

    shard_classes: list[str] = field(default_factory=list, metadata=EXACT)
    """Class names of the modules sharded as one unit (the repeated block: ``TransformerBlock``); empty:
    each child of the model that holds parameters. The model itself is always the last unit."""
    reshard_after_forward: bool = True
    """Free each unit's gathered parameters after its forward (less memory, more communication)."""
    param_dtype: Literal["float32", "bfloat16", "float16"] | None = field(default=None, metadata=EXACT)
    """Compute forward and backward with parameters in this dtype (mixed precision); null: their own."""
    reduce_dtype: Literal["float32", "bfloat16", "float16"] | None = field(default=None, metadata=EXACT)
    """Reduce gradients in this dtype; null: ``param_dtype``'s."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimizer state in host memory (GPU jobs)."""
    offload_pin_memory: bool = True
    """Pin the offloaded memory (faster copies; needs CUDA)."""
    gradient_divide_factor: float | None = field(default=None, metadata=above(0, **EXACT))
    """Divide summed gradients by this, not the world size (on Gloo, lacking PREMUL_SUM: sum, then divide)."""


@dataclass
class DistributedConfig:
    """How the ranks are started and talk to each other."""

    nproc_per_node: int = field(default=1, metadata=at_least(1, **EXACT))
    """Ranks to start on this machine (``launcher run``); one per GPU is typical."""
    nnodes: int | str = 1
    """Machines ``launcher run`` spans: ``N``, or ``MIN:MAX`` for an elastic job. Every machine runs the same
    command and they meet at ``rdzv_endpoint`` (torch elastic's c10d rendezvous, as ``torchrun --nnodes``)."""
    rdzv_endpoint: str | None = None
    """``HOST:PORT`` where the machines meet when ``nnodes`` is not 1: one of them, which hosts the rendezvous
    store (torchrun's ``--rdzv-endpoint``)."""
    rdzv_id: str | None = None
    """Names the run at the rendezvous, the same on every machine; defaults to the job's name."""
    console: str | int = field(default="rank0", metadata=IGNORED)
    """Whose output the console shows besides the logs: ``rank0`` (local rank 0), ``all`` (torchrun's
    ``--tee``), or local ranks such as ``"0,2"`` (torchrun's ``--local-ranks-filter``)."""
    log_line_prefix: str = field(default="[rank${rank}]:", metadata=IGNORED)
    """Prefix of every console line of a rank (torchrun's ``--log-line-prefix-template``: ``${rank}``,
    ``${local_rank}``, ``${role_name}``, ``${hostname}``); empty: none, for output a program reads."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """``auto``: NCCL when every rank has its own CUDA device, Gloo otherwise."""
    strategy: Literal["ddp", "fsdp"] = field(default="ddp", metadata=EXACT)
    """``ddp``: every rank holds the whole model (DistributedDataParallel); ``fsdp``: parameters, gradients
    and optimizer state are sharded over the ranks (FSDP2, ``distributed.fsdp``), checkpoints too."""
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    """FSDP2 settings, used when ``strategy`` is ``fsdp``."""
    sync_batchnorm: bool = True
    """Convert BatchNorm layers to :class:`launcher.SyncBatchNorm` when wrapping the model."""
    timeout_s: float = field(default=120.0, metadata=above(0))
    """Timeout of every collective once the first step has completed; a stuck rank fails after this."""
    startup_timeout_s: float = field(default=600.0, metadata=above(0))
    """Timeout of collectives before the first step (rendezvous, data loading warm-up, compilation); also
    bounds every wait for a batch from DataLoader workers (:func:`launcher.data.make_loader`)."""
    max_restarts: int = field(default=0, metadata=at_least(0))
    """Restart all ranks this many times after a failure; they resume from the last checkpoint."""
    stall_warning_s: float | None = field(default=None, metadata=at_least(0, **IGNORED))
    """Seconds without a step after which a rank's stack is printed once, the job untouched; null: 20 step
    times, at least 30 s; never later than half of ``timeout_s``; 0: never."""
    progress_s: float = field(default=30.0, metadata=at_least(0, **IGNORED))
    """Seconds between progress lines (samples/s, a straggler named), each in ``logs/perf.jsonl``; 0: off."""
    peak_flops: float | None = field(default=None, metadata=above(0, **IGNORED))
    """Peak FLOP/s of one device, for the MFU (a GPU not in the launcher's table, another dtype than bf16, a
    CPU); null: the bf16 data-sheet peak of a known GPU, none elsewhere."""
    stop_grace_s: float = field(default=30.0, metadata=above(0, **IGNORED))
    """Seconds a rank gets after Ctrl-C or SIGTERM (its own cleanup, a checkpoint write in flight) before it
    is killed; torchrun's is 30 s too. A second Ctrl-C kills at once."""
    find_unused_parameters: bool = False
    """Passed to DistributedDataParallel."""
    static_graph: bool = False
    """Passed to DistributedDataParallel."""
    keep_freed_memory: bool = True
    """Ranks keep the host memory CPU tensors free instead of returning it to the OS at every free (glibc
    ``mallopt``, see :mod:`launcher.hostmem`): no page faults on every activation of a CPU step, at the cost
    of resident memory staying near its peak."""

    def __post_init__(self) -> None:
        _, hi = self.node_range()
        if hi > 1 and not self.rdzv_endpoint:
            raise ConfigError(
                f"distributed.nnodes: {self.nnodes} machines need a place to meet\nHINT: set "
                "distributed.rdzv_endpoint=HOST:PORT, the address of one of the machines (the same on all)")
        self.console_ranks(1)  # checked now: a bad value is refused before anything starts
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"distributed.rdzv_endpoint: expected HOST:PORT, got {self.rdzv_endpoint!r}"
                                  "\nHINT: e.g. node01:29400 or 10.0.0.1:29400")

    def console_ranks(self, nproc: int) -> set[int]:
        """The local ranks whose output the console shows (see ``console``)."""
        text = str(self.console).strip()
        if text == "all":
            return set(range(nproc))
        if text == "rank0":
            return {0}
        try:
            ranks = {int(r) for r in text.split(",")}
        except ValueError:
            ranks = {-1}
        if min(ranks) < 0:
            raise ConfigError(f"distributed.console: expected rank0, all or local ranks such as 0,2, got "
                              f"{self.console!r}\nHINT: --tee shows every rank, --local-ranks-filter 0,1 "
                              "some of them")
        return ranks

    def node_range(self) -> tuple[int, int]:
        """``(min, max)`` machines from ``nnodes`` (``N`` or ``MIN:MAX``)."""
        text = str(self.nnodes)
        lo, _, hi = text.partition(":")
        try:
            low, high = int(lo), int(hi or lo)
        except ValueError:
            low, high = 0, 0
        if not 1 <= low <= high:
            raise ConfigError(f"distributed.nnodes: expected N or MIN:MAX with 1 <= MIN <= MAX, got {text!r}"
                              "\nHINT: nnodes: 2 (two machines), or nnodes: 1:4 (elastic, 1 to 4)")
        return low, high

@dataclass
class DataConfig:
    """Data-loading settings the entry passes to :func:`launcher.make_loader` (the launcher applies them)."""

    num_workers: int = field(default=0, metadata=at_least(0, **EXACT))
    """DataLoader worker processes per rank."""
    uneven: Literal["drop", "pad"] = field(default="drop", metadata=EXACT)
    """Equal batches on every rank (no DDP hang): drop fewer than one batch per rank, or pad by repeating
    fewer than that many samples."""
    shuffle_buffer: int = field(default=0, metadata=at_least(0, **EXACT))
    """Samples shuffled together per worker: each window of this many samples, drawn from 8 evenly spaced
    parts of the worker's range, is emitted in a random order (the worker holds this many raw samples); 0
    shuffles shard order only."""
    pin_memory: bool = True
    """Pin host memory on GPU runs (ignored on CPU)."""


@dataclass
class CheckpointConfig:
    """When and where the training state is saved, and how a run resumes."""

    dir: str = "checkpoints"
    """Checkpoint folder; relative paths are inside the run directory."""
    every_steps: int = field(default=0, metadata=at_least(0))
    """Save every this many steps; 0 saves only at the end of each epoch."""
    keep_last: int = field(default=3, metadata=at_least(1))
    """Keep this many most recent checkpoints (plus the best one)."""
    resume: str = field(default="auto", metadata=IGNORED)
    """``auto``: newest valid checkpoint in ``dir`` else a fresh start; ``never``; or a checkpoint path."""
    async_save: bool = True
    """Write files in a background thread; the step loop only pays for a copy to CPU memory."""
    format: Literal["auto", "full", "sharded"] = field(default="auto", metadata=IGNORED)
    """``full``: one file written by rank 0; ``sharded``: a folder where every rank writes its own part
    (torch.distributed.checkpoint), loadable at any world size; ``auto``: sharded under FSDP, else full."""
    allow_changes: bool = field(default=False, metadata=IGNORED)
    """Resume even when world size, DataLoader workers or batch size changed: a sharded dataset's epoch goes
    on with exactly the samples not yet yielded, split over the new ranks and workers; ranks that existed take
    their RNG state back, new ones start from seed + rank."""


@dataclass
class SlurmConfig:
    """What ``launcher submit`` asks SLURM for (through submitit)."""

    partition: str | None = None
    """Partition (``--partition``)."""
    account: str | None = None
    """Account to charge (``--account``)."""
    qos: str | None = None
    """Quality of service (``--qos``)."""
    nodes: int = field(default=1, metadata=at_least(1, **EXACT))
    """Number of nodes."""
    tasks_per_node: int | None = field(default=None, metadata=at_least(1, **EXACT))
    """Ranks per node; defaults to ``gpus_per_node``, or ``distributed.nproc_per_node`` on CPU."""
    gpus_per_node: int = field(default=0, metadata=at_least(0))
    """GPUs per node (``--gpus-per-node``)."""
    cpus_per_task: int = field(default=1, metadata=at_least(1))
    """CPU cores per rank."""
    mem_gb: float | None = field(default=None, metadata=above(0))
    """Memory per node in GiB."""
    time_min: int = field(default=60, metadata=at_least(1))
    """Time limit in minutes."""
    constraint: str | None = None
    """Node features (``--constraint``)."""
    comment: str | None = None
    """Job comment."""
    exclusive: bool = False
    """Request whole nodes."""
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    """Extra ``#SBATCH`` parameters, e.g. ``{reservation: big}``."""
    srun_args: list[str] = field(default_factory=list)
    """Extra arguments of the ``srun`` line."""
    setup: list[str] = field(default_factory=list)
    """Lines run before ``srun`` in the batch script (``module load ...``, ``source .venv/bin/activate``)."""
    python: str | None = None
    """Python command on the nodes; default: the interpreter running ``launcher submit``."""
    signal_delay_s: int = field(default=90, metadata=at_least(0))
    """Seconds before the time limit at which SLURM sends USR2 (checkpoint and requeue)."""
    log_folder: str = "slurm_logs"
    """Where submitit writes logs and pickles; relative paths are inside the run directory."""
    max_requeues: int = field(default=3, metadata=at_least(0))
    """Requeue a job that reached its time limit at most this many times (counted in
    ``slurm_logs/JOBID.requeues``); a preempted job is always requeued, and SLURM requeues after a node
    failure: neither counts."""


@dataclass
class Job:
    """A training job: what to run and how."""

    name: str
    """Name of the run; the run directory is ``output_dir/name``."""
    entry: str = ""
    """Training function as ``"module:function"``, called in every rank as ``fn(job, args)`` (``args`` built
    from the ``args:`` section and the dataclass its annotation names), ``fn(job)`` or ``fn()``."""
    script: str | None = None
    """Instead of ``entry``: a torchrun-style script (``train.py``, or ``-m pkg.train``) run unchanged."""
    script_args: list[str] = field(default_factory=list)
    """Command-line arguments of ``script``."""
    seed: int = field(default=0, metadata=EXACT)
    """Base random seed; each rank seeds ``seed + rank`` (entry functions only: scripts seed themselves)."""
    output_dir: str = field(default="runs", metadata=IGNORED)
    """Parent folder of run directories."""
    args: dict[str, Any] = field(default_factory=dict)
    """The entry point's own settings, checked against the dataclass its ``args`` parameter declares."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Ranks, backend and timeouts."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data loading settings the launcher's loader applies."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint and resume settings."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """SLURM resources for ``launcher submit``."""
    sweep: list[dict[str, Any]] = field(default_factory=list)
    """Override sets (``{key.path: value}``) run as a SLURM job array by ``launcher submit``."""
    source: str = ""
    """The job file this was loaded from (filled in by the loader)."""

    def __post_init__(self) -> None:
        _check_name(self.name)
        if self.script is not None and self.entry:
            raise ConfigError("entry and script are both set\nHINT: keep one: entry: module:function, or "
                              "script: train.py with script_args: [...]")
        if self.script is None and ":" not in self.entry:
            raise ConfigError(
                f"entry: expected 'module:function', got {self.entry!r}\n"
                "HINT: set entry: examples.tiny:main (a module importable from the working directory), or "
                "script: train.py to run a torchrun script"
            )

        if self.distributed.strategy == "fsdp" and self.checkpoint.format == "full":
            raise ConfigError("checkpoint.format: full needs the whole model on one rank, which distributed."
                              "strategy: fsdp avoids\nHINT: checkpoint.format=sharded (or auto); `launcher "
                              "consolidate CHECKPOINT OUT.pt` writes one file from it")

    @property
    def run_dir(self) -> Path:
        """The run directory: logs, resolved job, checkpoints, metrics."""
        return Path(self.output_dir) / self.name

    @property
    def checkpoint_dir(self) -> Path:
        """Absolute or run-directory-relative checkpoint folder."""
        p = Path(self.checkpoint.dir)
        return p if p.is_absolute() else self.run_dir / p


#: Longest run name (bytes): a folder name, with room for what the launcher adds to names inside it.
NAME_MAX_BYTES = 200


def _check_name(name: str) -> None:
    """The run directory is ``output_dir/name``: one folder inside ``output_dir``, never outside it."""
    if not name:
        problem = "is empty"
    elif name in (".", ".."):
        problem = "would be output_dir itself or its parent"
    elif "/" in name:
        problem = "holds a '/': the run directory would not be one folder inside output_dir"
    elif any(ord(c) < 32 or c == "\x7f" for c in name):
        problem = "holds a control character"
    elif len(name.encode()) > NAME_MAX_BYTES:
        problem = f"is {len(name.encode())} bytes long; at most {NAME_MAX_BYTES}"
    else:
        return
    raise ConfigError(f"name: {name[:80]!r} {problem}\nHINT: a folder name such as tiny-lr0.2 (the run "
                      "directory is output_dir/name); output_dir=PATH chooses where it goes")


def _set_path(data: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: override {dotted}: {k} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key.path=value`` strings (value as YAML) into pairs."""
    pairs = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.path=value\n"
                              "HINT: e.g. args.max_steps=20 (launcher config JOB.yaml prints every key)")
        try:
            value = yamlfile.parse_value(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None
        if key.count(".") >= MAX_KEY_DEPTH:
            raise ConfigError(f"override {item[:60]!r}...: the key is nested {key.count('.') + 1} levels "
                              f"deep; at most {MAX_KEY_DEPTH}\n"
                              "HINT: e.g. args.max_steps=20 (launcher config JOB.yaml prints every key)")
        pairs.append((key.strip(), value))
    return pairs


#: Deepest ``key.path`` an override may name (a job file's own nesting is bounded by its reader).
MAX_KEY_DEPTH = 32


def from_dict(data: dict[str, Any], source: str = "<dict>", overrides: list[str] | None = None) -> Job:
    """Build a :class:`Job` from a mapping plus ``key.path=value`` overrides."""
    data = dict(data)
    for key, value in parse_overrides(overrides or []):
        _set_path(data, key, value, f"{source} (override {key}={value!r})")
    job = build(Job, data, "", source)
    job.source = source
    return job


def load(path: str | os.PathLike[str], overrides: list[str] | None = None) -> Job:
    """Load a job file, apply overrides, and validate everything.

    Raises:
        ConfigError: with file, key path, expectation and a hint.
    """

    path = Path(path)
    try:
        data = yamlfile.read(path)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the job file ({e.strerror})\n"
                          "HINT: give the path of a YAML job file") from None
    except yamlfile.JobFileError as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return from_dict(data, str(path), overrides)


def to_dict(job: Job) -> dict[str, Any]:
    """The job as plain data (what ``launcher config`` prints and checkpoints store)."""
    data = dataclasses.asdict(job)
    data.pop("source", None)
    return data


def dump(job: Job) -> str:
    """The resolved job as YAML."""
    return yaml.safe_dump(to_dict(job), sort_keys=False)


def write_resolved(job: Job) -> Path:
    """Save the resolved job as ``run_dir/job.yaml`` (atomically) for the record and for resume checks."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    path = job.run_dir / "job.yaml"
    tmp = path.with_name(f".job.yaml.{os.getpid()}.tmp")
    try:
        tmp.write_text(dump(job))
        os.replace(tmp, path)
    except OSError as e:  # a full disk: nothing half-written stays, and the message is one line
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ConfigError(f"{job.source}: output_dir: cannot write {path} ({e.strerror})\n"
                          "HINT: free space there, or point output_dir at another file system") from None
    return path
