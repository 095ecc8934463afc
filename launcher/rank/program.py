"""The rank program: detect the environment, join the process group, run the target, tear down.

Run as :func:`forked_main` in a process forked from the launcher's rank server, or called in place by
``launcher run`` under torchrun or in an srun step (:func:`run_in_place`). What to run comes as a
:class:`launcher.spec.RankSpec`: a ``"module:qualname"`` target resolved here, inside the rank, or a script
that sets up its own process group. Errors are recorded with torch.distributed.elastic's ``@record``
(the agent applies it; the user adds no decorator) and carry the rank, host and last completed step.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import runpy
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import torch

from .. import config as config_mod
from .. import dist, internals, metrics, rundir
from .. import entry as entry_mod
from .. import env as env_mod
from ..data import workerserver
from ..errors import StopForRequeue
from ..rng import seed_everything
from ..spec import MAIN_ALIAS, RankSpec
from . import figures, hostmem, inplace, interrupt, pause, process, stacks, stop


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


def run_job(job_data: dict[str, Any], source: str) -> Any:
    """Target used by ``launcher run JOB.yaml``: rebuild the resolved job and call its entry point."""
    job = config_mod.from_dict(job_data, source)
    return entry_mod.call_entry(resolve(job.entry), job)


def run_in_place_and_exit(job: config_mod.Job) -> NoReturn:
    """``launcher run`` under torchrun or in an srun step: run this process as one rank, then leave at once.

    A failure is recorded for torchrun (its error file, as ``@record`` does) and printed; the exit code is 0,
    the target's ``sys.exit`` code, 3 for a requeue, 130 for Ctrl-C, or 1.
    """
    from torch.distributed.elastic.multiprocessing.errors import record

    code = 0
    try:
        record(run_in_place)(job)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except BaseException:  # noqa: BLE001 - reported here, then the process leaves with code 1
        import traceback

        traceback.print_exc()
        code = 1
    internals.run_python_exit()  # threads, atexit handlers, streams: as python's own end under torchrun
    process.exit_now(code)


def run_in_place(job: config_mod.Job) -> Any:
    """Run this process as one rank of ``job`` (under torchrun, an srun step or a submitit task)."""
    environment = env_mod.detect()
    if isinstance(environment, env_mod.TorchElasticEnvironment):
        process.die_with_parent()  # torchrun SIGKILLed: its ranks go too instead of training on as orphans
    spec = RankSpec.for_job(job)
    _fork_workers_server(spec, environment)  # before the run directory's lock, whose watcher is a thread
    if environment.rank() == 0:
        rundir.lock_job(job)
        config_mod.write_resolved(job)
    with inplace.watched(spec, environment.rank()):  # no launcher watches: rank 0 runs the progress line
        return execute(spec, leaving=True)


def execute(spec: RankSpec, fn: Callable[..., Any] | None = None, leaving: bool = False) -> Any:
    """Run one rank of ``spec`` in this process; returns the target's result (``fn`` replaces the target).
    ``leaving``: the process exits afterwards (SLURM's stop signals are then ignored, see
    :func:`launcher.rank.stop.uninstall`)."""
    environment = env_mod.detect()
    stacks.install(spec.stacks_dir, environment.rank())  # `launcher stacks`, and the report of a stall
    metrics.set_run_dir(spec.run_dir)
    figures.enable(spec.figures, spec.peak_flops)
    pause.install()  # Ctrl-Z: stop at a step boundary, no collective in flight
    if spec.keep_freed_memory:
        hostmem.keep_freed_memory()
    if spec.runs_script:
        return _run_script(spec, environment)
    dist.init(environment, spec.backend, spec.startup_timeout_s, spec.timeout_s)
    _tolerate_user_init()
    rank = dist.get_rank()
    if isinstance(environment, env_mod.SlurmEnvironment):
        _slurm_threads()
        stop.install(spec.max_requeues)  # preemption / time limit: save at a step boundary
    _graceful_sigterm(spec.stop_grace_s)
    try:
        if spec.seed is not None:
            seed_everything(spec.seed + rank)
        fn = fn or resolve(spec.target, spec.main_file)
        with _reported(rank, grace_s=spec.stop_grace_s):
            result = fn(*spec.args, **spec.kwargs)
        dist.note_ended()
        return result
    finally:
        stop.uninstall(leaving)
        dist.teardown()


def _fork_workers_server(spec: RankSpec, environment: env_mod.ClusterEnvironment) -> None:
    """A job with DataLoader workers: their server, forked from this rank now, before :func:`execute` starts
    the process group, whose Gloo threads make a later fork unsafe (:func:`workerserver.start_early`)."""
    if spec.worker_server_imports is not None:
        on_slurm = isinstance(environment, env_mod.SlurmEnvironment)
        workerserver.start_early(spec.worker_server_imports, stop.SIGNALS if on_slurm else ())


def _tolerate_user_init() -> None:
    """An entry function written for torchrun calls ``init_process_group`` itself: the group is already
    there, so that call does nothing instead of raising "trying to initialize the default process group
    twice!". Patched in this rank's process only, once the launcher's own group exists."""
    import functools

    import torch.distributed as tdist

    original = tdist.init_process_group
    if getattr(original, "__launcher_tolerant__", False):
        return

    @functools.wraps(original)
    def init_process_group(*args: Any, **kwargs: Any) -> None:
        if tdist.is_initialized():
            return None  # the launcher created this rank's group before calling the entry
        return original(*args, **kwargs)

    init_process_group.__launcher_tolerant__ = True  # type: ignore[attr-defined]
    tdist.init_process_group = init_process_group


def _slurm_threads() -> None:
    if env_mod.thread_count(os.environ.get("OMP_NUM_THREADS")) is None:
        # Without task binding every rank would start a thread per core of the node: use the cores it got.
        torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", "1")))


def _finish_writes(grace_s: float) -> None:
    """A stopping rank lets the checkpoint write in flight reach the disk (a rerun resumes from it), within
    the grace the launcher gives it before SIGKILL."""
    checkpointer = sys.modules.get("launcher.checkpoint.checkpointer")  # nothing in flight if never imported
    if checkpointer is not None:
        checkpointer.finish_writes_in_flight(max(0.5, grace_s - 1.0),
                                             say=lambda line: print(line, file=sys.stderr, flush=True))


def _graceful_sigterm(grace_s: float) -> None:
    """SIGTERM (the launcher's or torchrun's stop) still ends the rank as the signal does, but after the
    checkpoint write in flight is on disk. A handler already set (SLURM's, see :mod:`.stop`, or the user's)
    is kept."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        _finish_writes(grace_s)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


@contextlib.contextmanager
def _reported(rank: int, counts_steps: bool = True, grace_s: float = 30.0) -> Iterator[None]:
    """Around the target: a stop (Ctrl-C) is reported as such; a failure gets the rank, host and last step."""
    try:
        with interrupt.interruptible():
            yield
    except StopForRequeue:
        process.kill_children()
        raise
    except BaseException as e:
        # torch's DataLoader handler of SIGCHLD raises "DataLoader worker ... is killed by signal" when a
        # worker dies: the workers killed here would make it replace the exception being reported.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        process.kill_children()  # DataLoader workers are ended, not waited for
        if isinstance(e, SystemExit) and e.code in (0, None):
            dist.note_ended()
            raise
        step = dist.current_step()
        where = f"after step {step}" if step is not None else "before the first step" if counts_steps else ""
        if interrupt.stopped_by():
            # Asked to stop (Ctrl-C reaches the ranks as SIGINT from the launcher or torchrun): whatever ended
            # the target, a KeyboardInterrupt or a peer's closed connection, is the stop itself.
            line = f"[launcher] rank {rank} stopped by {interrupt.stopped_by()} {where}"
            print(line.rstrip(), file=sys.stderr)
            _finish_writes(grace_s)
            raise SystemExit(128 + signal.SIGINT) from None
        e.add_note(f"[launcher] rank {rank} on {socket.gethostname()}" + (f", {where}" if where else ""))
        error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if error_file:  # its folder went with a removed run directory: the report was torch's placeholder
            with contextlib.suppress(OSError):
                os.makedirs(os.path.dirname(error_file), exist_ok=True)
        raise


def _script_group_defaults(spec: RankSpec) -> None:
    """What a script's own ``init_process_group()`` gets that torchrun does not give it, patched in this
    rank's process only, before the script imports it:

    * a collective timeout of ``distributed.startup_timeout_s`` unless the script passes one (torch's default
      is 30 minutes: a stopped rank left its peers waiting that long, silently);
    * in a restarted attempt, this attempt's namespace of the agent's store for ``env://``, as the launcher's
      own group has (:func:`launcher.dist.attempt_store`).
    """
    import datetime
    import functools

    import torch.distributed as tdist

    original = tdist.init_process_group

    @functools.wraps(original)
    def init_process_group(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("timeout") is None and len(args) < 3:  # (backend, init_method, timeout, ...)
            kwargs["timeout"] = datetime.timedelta(seconds=spec.startup_timeout_s)
        if kwargs.get("store") is None and kwargs.get("init_method") in (None, "env://") and len(args) < 2:
            store = dist.attempt_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                       int(os.environ["WORLD_SIZE"]), spec.startup_timeout_s)
            if store is not None:
                kwargs.update(store=store, rank=int(os.environ["RANK"]),
                              world_size=int(os.environ["WORLD_SIZE"]))
                kwargs.pop("init_method", None)
        return original(*args, **kwargs)

    tdist.init_process_group = init_process_group


def _run_script(spec: RankSpec, environment: env_mod.ClusterEnvironment) -> Any:
    """Run a torchrun-style script as ``__main__`` with its arguments: it sets up the process group itself."""
    if isinstance(environment, env_mod.SlurmEnvironment):
        _slurm_threads()
    name = spec.script or spec.module or ""
    sys.argv = [name, *spec.argv]
    _script_group_defaults(spec)
    _graceful_sigterm(spec.stop_grace_s)  # a script may use the launcher's Checkpointer too
    try:
        # scripts do not report their steps
        with _reported(environment.rank(), counts_steps=False, grace_s=spec.stop_grace_s):
            if spec.script is not None:
                script = os.path.abspath(spec.script)  # __file__ is absolute, as under python and torchrun
                sys.path.insert(0, os.path.dirname(script))  # as `python script.py`
                runpy.run_path(script, run_name="__main__")
            else:
                runpy.run_module(spec.module or "", run_name="__main__", alter_sys=True)
        dist.note_ended()
    finally:
        dist.teardown()
    return None


def forked_main(spec: RankSpec) -> Any:
    """Rank entry point in a process forked from the launcher's server (:mod:`launcher.launching.rankserver`).

    The rank first becomes what a fresh process started by the launcher would be: its own session (the
    launcher stops a rank together with its DataLoader workers by process group), and the launcher's
    environment (plus the agent's RANK, MASTER_PORT, ...), working directory and ``sys.path`` instead of the
    server's, and a numpy global stream of its own. It returns the target's result (the agent collects it),
    None when the target calls ``sys.exit(0)``.
    """
    os.setsid()
    process.set_name(f"launcher-rank{os.environ.get('RANK', '')}")  # in top, ps -o comm
    if spec.process is not None:
        p = spec.process
        from_agent = {k: v for k, v in os.environ.items() if p.server_env.get(k) != v}
        os.environ.clear()
        os.environ.update(p.environ)
        os.environ.update(from_agent)
        threads = env_mod.thread_count(os.environ.get("OMP_NUM_THREADS"))
        if threads is not None:  # torch read the server's value when it was imported
            torch.set_num_threads(threads)
        os.chdir(p.cwd)
        sys.path[:] = p.sys_path
    # Fresh generators, as a fresh process has (Python's random is reseeded at fork by the stdlib): forks of
    # one server would otherwise share torch's and numpy's streams (the same dropout masks on every rank of a
    # script that seeds nothing). Entry functions are then seeded with seed + rank.
    torch.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    process.detach_from_server()  # DataLoader workers start as in a fresh process
    # Rank logs go to files and are tailed to the console: line buffering keeps them in step.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    process.die_with_parent()
    process.group_dies_with_this_process()  # before the at-fork hooks below
    process.forked_children_die_with_this_process()
    _fork_workers_server(spec, env_mod.detect())
    internals.forget_exit_handlers()  # the launcher's; the rank's own code registers its own from here
    try:
        return execute(spec)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
        return None
    finally:
        # Python's normal end, which a process of multiprocessing skips (it leaves by os._exit): a script's
        # atexit handler closing its logging run used to never run, under `launcher run` only.
        internals.run_python_exit()
