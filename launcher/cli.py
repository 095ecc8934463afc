"""``launcher run|config|submit``: parse, load the job, dispatch; one place reports errors and exit codes.

Runs in the ``launcher`` process. It reaches the ranks only through :mod:`launcher.launching` (which hands
each rank a :class:`launcher.spec.RankSpec`); under torchrun or in an srun step this process *is* one rank,
and the rank program is reached by name.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import signal
import sys
from pathlib import Path

from . import config as config_mod
from . import entry as entry_mod
from . import env as env_mod
from . import rundir
from .errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, LaunchError, RankFailure, UsageError

# torch is imported only once the ranks' fork server is importing it too (see launcher.launching.rankserver).

def cmd_run(job: config_mod.Job) -> int:
    rundir.check_usable(job.run_dir, job.source)  # before anything is written or started
    _check_entry_findable(job)
    if not env_mod.detect().spawns_here():
        entry_mod.check_entry(job)
        from .spec import rank_function

        rank_function("run_in_place_and_exit")(job)  # this process is one rank of the job
    nproc = job.distributed.nproc_per_node
    from .launching import rankserver

    rankserver.start(nproc)  # the ranks' server imports torch while this process does
    entry_mod.check_entry(job)
    _check_resumable(job)
    from torch.distributed.elastic.multiprocessing import SignalException

    from .launching.local import spawn
    from .spec import RankSpec

    spec = RankSpec.for_job(job)
    d = job.distributed
    nodes = d.node_range()
    rundir.lock(job.run_dir, job.source, per_machine=nodes != (1, 1))  # one running job per run directory
    config_mod.write_resolved(job)
    what = f"{job.script} {' '.join(job.script_args)}".strip() if job.script else job.entry
    where = "" if nodes == (1, 1) else f" on this machine, meeting {d.nnodes} machine(s) at {d.rdzv_endpoint}"
    print(f"[launcher] {job.name}: starting {nproc} rank(s) of {what}{where}; logs in {job.run_dir / 'logs'}",
          flush=True)
    try:
        results = spawn(spec, nproc, job.run_dir / "logs", max_restarts=d.max_restarts, nodes=nodes,
                        rdzv_endpoint=d.rdzv_endpoint, rdzv_id=d.rdzv_id or job.name)
    except SignalException as e:
        print(f"launcher: stopped by {e.sigval.name}; all ranks were stopped", file=sys.stderr)
        return 128 + int(e.sigval)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the ranks are gone, the outcome known: see console()
    ranks = f"rank(s) {_span(results)}" if nodes != (1, 1) else "rank(s)"
    if job.script:
        print(f"[launcher] {job.name}: finished on {len(results)} {ranks}")
    else:
        first = min(results)
        print(f"[launcher] {job.name}: finished on {len(results)} {ranks}; rank {first} returned "
              f"{results[first]!r}")
    return EXIT_OK


def _span(ranks: dict[int, object]) -> str:
    return f"{min(ranks)}-{max(ranks)}" if len(ranks) > 1 else str(min(ranks))


def _check_entry_findable(job: config_mod.Job) -> None:
    """Before any process starts: the entry's module or the script exists (importing it comes later, once
    the ranks' server is importing torch beside it), and so does a checkpoint named to resume from."""
    resume = job.checkpoint.resume
    if resume not in ("auto", "never") and not Path(resume).exists():
        raise config_mod.ConfigError(
            f"{job.source}: checkpoint.resume: {resume!r} does not exist (working directory {os.getcwd()})\n"
            "HINT: auto (the newest valid checkpoint in the run directory), never, or the path of a "
            "step_*.pt file")
    if job.script is not None:
        if job.script.startswith("-m "):
            module = job.script[3:].strip()
            if _find_spec(module) is None:
                raise config_mod.ConfigError(
                    f"{job.source}: no module named {module!r} (looked in {os.getcwd()} and the import "
                    "path)\n"
                    "HINT: run from the folder that holds the package, or install it")
        elif not Path(job.script).is_file():
            raise config_mod.ConfigError(f"{job.source}: script {job.script!r} does not exist (working "
                                         "directory "
                                         f"{os.getcwd()})\nHINT: give the path of a .py file")
        return
    module = job.entry.partition(":")[0]
    if _find_spec(module) is None:
        entry_mod.resolve_entry(job)  # raises with the import path and a hint


def _check_resumable(job: config_mod.Job) -> None:
    """``resume: auto`` with checkpoints present of which none verifies: refuse rather than start over."""
    if job.script is not None or job.checkpoint.resume != "auto":
        return
    from .checkpoint.files import describe_refusals, refusals

    refused = refusals(job.checkpoint_dir)
    if refused:
        raise config_mod.ConfigError(
            f"{job.source}: {job.checkpoint_dir} holds checkpoints but none is valid:\n  "
            f"{describe_refusals(refused)}\nHINT: "
            "checkpoint.resume=never starts over (the files stay), checkpoint.resume=PATH picks one")


def _find_spec(module: str) -> object | None:
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None


def cmd_config(job: config_mod.Job) -> int:
    print(config_mod.dump(job), end="")
    return EXIT_OK


RUN_HELP = """\
launcher run JOB.yaml [key.path=value ...]      a job file and overrides
launcher run [options] train.py [script args]   a torchrun script, unchanged
launcher run [options] -m pkg.train [args]      a module, as python -m / torchrun -m run it
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launcher", description="Run the same PyTorch DDP job on a laptop, a GPU box or SLURM."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the job on this machine (or as one rank under torchrun / srun)",
                         usage=RUN_HELP, allow_abbrev=False)
    run.add_argument("--nproc-per-node", "--nproc_per_node", dest="nproc", type=int,
                     help="ranks on this machine (distributed.nproc_per_node)")
    run.add_argument("--max-restarts", "--max_restarts", dest="max_restarts", type=int,
                     help="restart all ranks this many times after a failure (distributed.max_restarts)")
    run.add_argument("--nnodes", help="machines: N or MIN:MAX (distributed.nnodes)")
    run.add_argument("--rdzv-endpoint", "--rdzv_endpoint", dest="rdzv_endpoint",
                     help="HOST:PORT where the machines meet (distributed.rdzv_endpoint)")
    run.add_argument("--rdzv-id", "--rdzv_id", dest="rdzv_id",
                     help="the run's name at the rendezvous, the same on every machine (distributed.rdzv_id)")
    run.add_argument("-m", "--module", action="store_true", help="the target is a module, run as __main__")
    run.add_argument("target", help="job file (YAML), script (.py) or, with -m, a module")
    run.add_argument("rest", nargs=argparse.REMAINDER, help="overrides (job file) or the script's arguments")
    for name, text in (
        ("config", "print the resolved job file"),
        ("submit", "submit the job to SLURM through submitit"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("job", help="job file (YAML)")
        p.add_argument("overrides", nargs="*", help="key.path=value overrides (value parsed as YAML)")
        if name == "submit":
            p.add_argument("--wait", action="store_true", help="follow the job and exit with its result")
            p.add_argument("--sweep", action="append", default=[], help="an override set: 'a=1 b=2'")
    return parser


def load_run_job(args: argparse.Namespace) -> config_mod.Job:
    """The job ``launcher run`` was given: a job file with overrides, or a script with its arguments."""
    options = []
    if args.nproc is not None:
        options.append(f"distributed.nproc_per_node={args.nproc}")
    if args.max_restarts is not None:
        options.append(f"distributed.max_restarts={args.max_restarts}")
    for key in ("nnodes", "rdzv_endpoint", "rdzv_id"):
        if getattr(args, key) is not None:
            options.append(f"distributed.{key}={json.dumps(str(getattr(args, key)))}")  # a string, as given
    if args.module or args.target.endswith(".py"):
        script = f"-m {args.target}" if args.module else args.target
        name = args.target.rsplit(".", 1)[-1] if args.module else Path(args.target).stem
        data = {"name": name, "script": script, "script_args": list(args.rest)}
        return config_mod.from_dict(data, f"launcher run {args.target}", options)
    return config_mod.load(args.target, list(args.rest) + options)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``launcher`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(load_run_job(args))
        job = config_mod.load(args.job, args.overrides)
        if args.command == "config":
            return cmd_config(job)
        from .launching.slurm import cmd_submit  # submitit is only imported when submitting

        return cmd_submit(job, wait=args.wait, sweeps=args.sweep)
    except (config_mod.ConfigError, UsageError) as e:
        print(f"launcher: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RankFailure as e:
        print(f"launcher: job failed: {e}", file=sys.stderr)
        return e.exit_code
    except LaunchError as e:
        print(f"launcher: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("launcher: interrupted", file=sys.stderr)
        return 130


def console() -> None:
    """The ``launcher`` command and ``python -m launcher``: :func:`main`, then exit with its code.

    The working directory goes first on the import path, as ``python -m`` and torchrun put it: a console
    script's ``sys.path[0]`` is its ``bin`` folder, and entry modules such as ``examples.tiny`` are found
    from the folder the command runs in (the ranks inherit this path).

    Once the outcome is known, Ctrl-C is ignored: the interpreter's shutdown (about 0.4 s with torch loaded,
    much of it after Python has put back the default handler) would otherwise turn a finished job into a death
    by SIGINT, or print a KeyboardInterrupt traceback from a shutdown callback.
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)
