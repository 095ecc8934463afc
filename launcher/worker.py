"""The per-rank program: detect the environment, join the process group, call the target, tear down.

Run by :mod:`launcher.spawn` as :func:`forked_main` in a process forked from the ranks' server (see
:mod:`launcher.forkserver`), or called in place by ``launcher run`` under torchrun / an srun step. The target
is a ``"module:qualname"`` string resolved here, inside the rank, so nothing unpicklable crosses a process
boundary. Errors are recorded with torch.distributed.elastic's ``@record`` (the agent applies it; the user
adds no decorator) and carry the rank, host and last completed step.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import config as config_mod
from . import dist, forkserver, hostmem, interrupt, stop
from . import env as env_mod
from .errors import StopForRequeue
from .rng import seed_everything

#: Module name under which a target defined in a script's ``__main__`` is imported in the ranks.
MAIN_ALIAS = "__launcher_main__"  # not __mp_main__: torch aliases that to the real __main__


def resolve(target: str, main_file: str | None = None) -> Callable[..., Any]:
    """Import ``"module:qualname"``; ``__main__`` targets load from ``main_file`` without running main."""
    module_name, _, qualname = target.partition(":")
    if module_name == "__main__":
        if main_file is None:
            raise ValueError(f"cannot resolve {target!r}: no main file")
        mp_main = sys.modules.get("__mp_main__")  # multiprocessing ran the script in this rank already
        if mp_main is not None and getattr(mp_main, "__file__", None) == main_file:
            sys.modules.setdefault(MAIN_ALIAS, mp_main)
        if MAIN_ALIAS not in sys.modules:
            spec = importlib.util.spec_from_file_location(MAIN_ALIAS, main_file)
            assert spec and spec.loader
            module = importlib.util.module_from_spec(spec)
            sys.modules[MAIN_ALIAS] = module
            spec.loader.exec_module(module)
        obj: Any = sys.modules[MAIN_ALIAS]
    else:
        obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


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


def run_job(job_data: dict[str, Any], source: str) -> Any:
    """Target used by ``launcher run``: rebuild the resolved job and call its entry point with it."""
    job = config_mod.from_dict(job_data, source)
    return resolve(job.entry)(job)


def job_spec(job: config_mod.Job) -> dict[str, Any]:
    """The worker spec that runs ``job`` (same in spawned ranks, torchrun and srun)."""
    return {
        "target": "launcher.worker:run_job",
        "args": (config_mod.to_dict(job), job.source),
        "backend": job.distributed.backend,
        "timeout_s": job.distributed.timeout_s,
        "startup_timeout_s": job.distributed.startup_timeout_s,
        "seed": job.seed,
        "max_requeues": job.slurm.max_requeues,
        "keep_freed_memory": job.distributed.keep_freed_memory,
    }


def write_resolved(job: config_mod.Job) -> Path:
    """Save the resolved job as ``run_dir/job.yaml`` (atomically) for the record and for resume checks."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    path = job.run_dir / "job.yaml"
    tmp = path.with_name(f".job.yaml.{os.getpid()}.tmp")
    tmp.write_text(config_mod.dump(job))
    os.replace(tmp, path)
    return path


def run_in_place(job: config_mod.Job) -> Any:
    """Run this process as one rank of ``job`` (under torchrun, an srun step or a submitit task)."""
    environment = env_mod.detect()
    if isinstance(environment, env_mod.TorchElasticEnvironment):
        die_with_parent()  # torchrun SIGKILLed: its ranks go too instead of training on as orphans
    if environment.rank() == 0:
        write_resolved(job)
    return execute(job_spec(job))


def execute(spec: dict[str, Any], fn: Callable[..., Any] | None = None) -> Any:
    """Run one rank of ``spec`` in this process; returns the target's result (``fn`` replaces the target)."""
    environment = env_mod.detect()
    if spec.get("keep_freed_memory", True):
        hostmem.keep_freed_memory()
    dist.init(environment, spec["backend"], spec["startup_timeout_s"], spec["timeout_s"])
    rank = dist.get_rank()
    if isinstance(environment, env_mod.SlurmEnvironment):
        if "OMP_NUM_THREADS" not in os.environ:
            # Without task binding every rank would start a thread per core of the node: use the cores it got.
            torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", "1")))
        stop.install(int(spec.get("max_requeues", 0)))  # preemption / time limit: save at a step boundary
    try:
        if spec.get("seed") is not None:
            seed_everything(int(spec["seed"]) + rank)
        fn = fn or resolve(spec["target"], spec.get("main_file"))
        try:
            with interrupt.interruptible():
                result = fn(*spec.get("args", ()), **spec.get("kwargs", {}))
        except StopForRequeue:
            raise
        except BaseException as e:
            step = dist.current_step()
            where = f"after step {step}" if step is not None else "before the first step"
            if interrupt.stopped_by():
                # Asked to stop (Ctrl-C reaches the ranks as SIGINT from the launcher or torchrun): whatever
                # ended the target, a KeyboardInterrupt or a peer's closed connection, is the stop itself.
                print(f"[launcher] rank {rank} stopped by {interrupt.stopped_by()} {where}", file=sys.stderr)
                raise SystemExit(128 + signal.SIGINT) from None
            e.add_note(f"[launcher] rank {rank} on {socket.gethostname()}, {where}")
            raise
        if spec.get("result_dir"):
            _write_result(Path(spec["result_dir"]), rank, result)
        return result
    finally:
        stop.uninstall()
        dist.teardown()


def _write_result(folder: Path, rank: int, result: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".rank{rank}.pkl.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(result, f)
    os.replace(tmp, folder / f"rank{rank}.pkl")


def die_with_parent() -> None:
    """Linux: get SIGKILL when the parent dies, even by SIGKILL (a rank: its launcher): no orphans."""
    if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) and os.getppid() == 1:  # it died before prctl took effect
        os._exit(128 + signal.SIGKILL)


def _forked_children_die_with_this_process() -> None:
    """Processes this rank forks from its main thread (DataLoader workers) get SIGKILL when the rank dies.

    Without it a SIGKILLed rank's workers notice only at torch's next liveness check (up to 5 s). Forks from
    other threads are left alone: the signal follows the forking thread, not the process.
    """
    forking_thread: list[bool] = []
    os.register_at_fork(
        before=lambda: forking_thread.append(threading.current_thread() is threading.main_thread()),
        after_in_parent=forking_thread.clear,
        after_in_child=lambda: forking_thread.pop() and _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL),
    )


_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def _prctl(option: int, arg: Any) -> bool:
    """Linux's prctl(2); False (nothing done) elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(option, arg)
    return True


def forked_main(spec_path: str) -> None:
    """Rank entry point in a process forked from the launcher's server (:mod:`launcher.forkserver`).

    The rank first becomes what a fresh process started by the launcher would be: its own session (the
    launcher stops a rank together with its DataLoader workers by process group), and the launcher's
    environment (plus the agent's RANK, MASTER_PORT, ...), working directory and ``sys.path`` instead of the
    server's, and a numpy global stream of its own. It returns normally (the agent collects that), also when
    the target calls ``sys.exit(0)``.
    """
    os.setsid()
    _prctl(_PR_SET_NAME, f"launcher-rank{os.environ.get('RANK', '')}".encode()[:15])  # in top, ps -o comm
    with open(spec_path, "rb") as f:
        spec = pickle.load(f)  # written by our own launcher process a moment ago
    server_env = spec.get("server_env")
    if server_env is not None:
        from_agent = {k: v for k, v in os.environ.items() if server_env.get(k) != v}
        os.environ.clear()
        os.environ.update(spec["environ"])
        os.environ.update(from_agent)
        if "OMP_NUM_THREADS" in os.environ:  # torch read the server's value when it was imported
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    os.chdir(spec["cwd"])
    sys.path[:] = spec["sys_path"]
    if "numpy" in sys.modules:  # its global stream, like Python's random (which the stdlib reseeds at fork)
        sys.modules["numpy"].random.seed()
    forkserver.detach()  # DataLoader workers start as in a fresh process (fork on Linux: no new import)
    # Rank logs go to files and are tailed to the console: line buffering keeps them in step.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    die_with_parent()
    _forked_children_die_with_this_process()
    try:
        execute(spec)
    except SystemExit as e:
        if e.code not in (0, None):
            raise


def exit_now(code: int) -> None:
    """Leave without running C++ static destructors once the work is done and the result written.

    With torch 2.15, a rank (or a plain torchrun script) sometimes aborts at interpreter shutdown with
    "terminate called without an active exception" (a joinable thread destroyed), turning a finished job into
    a SIGABRT failure: seen in about 1 of 10 runs of a 2-rank Gloo test and in the benchmark's plain script.
    What multiprocessing started is cleaned up first, as at a normal exit (and as a spawned rank's process
    does): leftover DataLoader workers and the fork server of the workers, whose socket folder in the temp
    directory would otherwise stay behind.
    """
    import multiprocessing.util

    multiprocessing.util._exit_function()  # type: ignore[attr-defined]
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
