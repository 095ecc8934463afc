"""The one contract between the launching process and each rank: what to run, and how.

Built here only (:meth:`RankSpec.for_job`, :meth:`RankSpec.for_function`, :meth:`RankSpec.for_script`), read
by :mod:`launcher.rank.program`. It crosses the process boundary pickled, so it holds only plain data: the
target is a ``"module:qualname"`` string resolved inside the rank, never a function object.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Job

#: The signal that asks a rank for all its threads' stacks (:mod:`launcher.rank.stacks`): a real-time one,
#: used by neither SLURM (USR1/USR2/TERM), submitit nor torch; every rank replaces its default (terminate).
STACKS_SIGNAL = signal.SIGRTMIN + 2 if hasattr(signal, "SIGRTMIN") else signal.SIGUSR1

#: The signal that asks a rank to pause at its next step boundary (:mod:`launcher.rank.pause`, Ctrl-Z).
PAUSE_SIGNAL = signal.SIGRTMIN + 3 if hasattr(signal, "SIGRTMIN") else signal.SIGUSR2

#: Module name under which a target defined in a script's ``__main__`` is imported in the ranks.
MAIN_ALIAS = "__launcher_main__"  # not __mp_main__: torch aliases that to the real __main__

#: The module of the rank program. The launching side reaches it only by this name (:func:`rank_function`).
RANK_PROGRAM = "launcher.rank.program"
#: The target ``launcher run JOB.yaml`` runs in every rank: rebuild the job, call its entry point.
JOB_TARGET = f"{RANK_PROGRAM}:run_job"


def rank_function(name: str) -> Callable[..., Any]:
    """A function of the rank program, imported by name (``forked_main``, ``run_in_place``, ...)."""
    import importlib

    return getattr(importlib.import_module(RANK_PROGRAM), name)


@dataclass(frozen=True)
class Process:
    """What a rank forked from the launcher's server must become to look freshly started by the launcher."""

    environ: dict[str, str]
    """The launcher's environment (plus the threads setting), replacing the server's."""
    server_env: dict[str, str]
    """The server's environment when it started: a variable that differs from it came from the agent."""
    cwd: str
    """The launcher's working directory."""
    sys_path: list[str]
    """The launcher's import path."""


@dataclass(frozen=True)
class RankSpec:
    """How one rank runs: the target (a function, or a script with its arguments) and the process group."""

    target: str = ""
    """``"module:qualname"`` of the function to call; empty for a script."""
    args: tuple[Any, ...] = ()
    """Positional arguments of the target."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the target."""
    main_file: str | None = None
    """The script a ``__main__:...`` target is loaded from (without running its main block)."""
    script: str | None = None
    """A script run as ``__main__`` (``launcher run train.py ...``); it sets up the process group itself."""
    module: str | None = None
    """A module run as ``__main__`` (``launcher run -m pkg.train ...``); same contract as ``script``."""
    argv: tuple[str, ...] = ()
    """``sys.argv[1:]`` of the script or module."""
    backend: str = "auto"
    """``auto``, ``nccl`` or ``gloo``."""
    timeout_s: float = 120.0
    """Collective timeout once the first step completed."""
    startup_timeout_s: float = 600.0
    """Collective timeout before the first step."""
    seed: int | None = None
    """Base seed (each rank seeds ``seed + rank``); None leaves the generators alone."""
    max_requeues: int = 0
    """SLURM requeues allowed after a stop request (see :mod:`launcher.rank.stop`)."""
    stop_grace_s: float = 30.0
    """Seconds between the stop signal a rank gets (Ctrl-C, SIGTERM) and its SIGKILL."""
    keep_freed_memory: bool = True
    """glibc keeps freed host memory (see :mod:`launcher.rank.hostmem`)."""
    process: Process | None = None
    """Set by the local spawner for ranks forked from its server; None in place (torchrun, srun)."""
    stall_warning_s: float | None = None
    """Seconds without a step before the launcher prints the rank's stack (see the job key)."""
    progress_s: float = 0.0
    """Seconds between the launcher's progress lines (see the job key); 0: none (``launcher.launch``)."""
    figures: bool = True
    """The rank times its waits and counts FLOPs for the launcher's figures (:mod:`launcher.rank.figures`);
    off with ``distributed.progress_s: 0``."""
    peak_flops: float | None = None
    """One device's peak FLOP/s for the MFU (the job key); None: :data:`launcher.rank.figures.PEAK_BF16`."""
    run_dir: str | None = None
    """The job's run directory (``launcher.log_metrics`` writes there); None: none (``launcher.launch``)."""
    stacks_dir: str | None = None
    """Where the rank dumps its threads' stacks on request (:mod:`launcher.rank.stacks`); None: nowhere."""
    worker_server_imports: tuple[str, ...] | None = None
    """A job with DataLoader workers: the rank forks their server before its process group, and the server
    imports these modules (:func:`launcher.data.workerserver.start_early`); None: no server until a loader
    needs one."""

    @property
    def runs_script(self) -> bool:
        """True when the rank runs a script or module that initializes the process group itself."""
        return self.script is not None or self.module is not None

    def with_process(self, process: Process) -> RankSpec:
        """This spec for ranks forked from the launcher's server."""
        return dataclasses.replace(self, process=process)

    @classmethod
    def for_job(cls, job: Job) -> RankSpec:
        """The spec that runs ``job`` (the same in spawned ranks, under torchrun and in srun steps)."""
        from .config import to_dict

        d = job.distributed
        common: dict[str, Any] = {
            "backend": d.backend, "timeout_s": d.timeout_s, "startup_timeout_s": d.startup_timeout_s,
            "max_requeues": job.slurm.max_requeues, "keep_freed_memory": d.keep_freed_memory,
            "stop_grace_s": d.stop_grace_s,
            "stacks_dir": str((job.run_dir / "logs" / "stacks").absolute()),
            "run_dir": str(job.run_dir.absolute()),
            "stall_warning_s": d.stall_warning_s, "progress_s": d.progress_s, "figures": d.progress_s > 0,
            "peak_flops": d.peak_flops,
        }
        if job.script:
            is_module = job.script.startswith("-m ")
            script, module = (None, job.script[3:].strip()) if is_module else (job.script, None)
            return cls(script=script, module=module, argv=tuple(job.script_args), **common)
        imports = (job.entry.partition(":")[0],) if job.data.num_workers > 0 else None
        return cls(target=JOB_TARGET, args=(to_dict(job), job.source), seed=job.seed,
                   worker_server_imports=imports, **common)

    @classmethod
    def for_function(cls, fn: Callable[..., Any], args: tuple[Any, ...] = (),
                     kwargs: dict[str, Any] | None = None, **settings: Any) -> RankSpec:
        """The spec that calls ``fn(*args, **kwargs)`` in every rank (``fn`` defined at module level)."""
        target, main_file = target_name(fn)
        return cls(target=target, main_file=main_file, args=tuple(args), kwargs=dict(kwargs or {}),
                   **settings)


def target_name(fn: Callable[..., Any]) -> tuple[str, str | None]:
    """``("module:qualname", main_file)`` for a function the ranks can import."""
    module = fn.__module__
    main_file = None
    if module in ("__main__", MAIN_ALIAS):
        main_file = getattr(sys.modules["__main__"], "__file__", None)
        module = "__main__"
    if "<locals>" in fn.__qualname__ or "<lambda>" in fn.__qualname__:
        raise ValueError(
            f"{fn.__qualname__} cannot be started in other processes\n"
            "HINT: define the function at module level so the ranks can import it"
        )
    return f"{module}:{fn.__qualname__}", main_file
