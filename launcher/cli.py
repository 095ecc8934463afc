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
from typing import Any

from . import config as config_mod
from . import entry as entry_mod
from . import env as env_mod
from . import rundir
from .errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, LaunchError, RankFailure, UsageError


def cmd_run(job: config_mod.Job) -> int:
    rundir.check_job_usable(job)  # before anything is written or started
    _check_entry_findable(job)
    if not env_mod.detect().spawns_here():
        entry_mod.check_entry(job)
        from .spec import rank_function

        rank_function("run_in_place_and_exit")(job)  # this process is one rank of the job
    nproc = job.distributed.nproc_per_node
    from torch.distributed.elastic.multiprocessing import SignalException

    from .launching import rankserver
    from .launching.local import spawn
    from .spec import RankSpec

    # A fork of this process, torch imported once: before the entry is imported (its import-time code runs
    # in each rank, as in a fresh process) and before the run directory's lock is opened.
    rankserver.start(nproc, fork=True)
    from .launching.streams import survive_closed_pipes

    survive_closed_pipes()  # `launcher run ... | head`: the ranks' server keeps the plain streams
    entry_mod.check_entry(job)
    _check_resumable(job)
    _check_strategy(job)

    spec = RankSpec.for_job(job)
    d = job.distributed
    nodes = d.node_range()
    rundir.lock_job(job, per_machine=nodes != (1, 1))  # one running job per run and checkpoint folder
    config_mod.write_resolved(job)
    what = f"{job.script} {' '.join(job.script_args)}".strip() if job.script else job.entry
    where = "" if nodes == (1, 1) else f" on this machine, meeting {d.nnodes} machine(s) at {d.rdzv_endpoint}"
    # The launcher's own lines go to stderr: stdout is the ranks' (a sweep runner parses a script's output).
    print(f"[launcher] {job.name}: starting {nproc} rank(s) of {what}{where}; logs in {job.run_dir / 'logs'}",
          file=sys.stderr, flush=True)
    try:
        results = spawn(spec, nproc, job.run_dir / "logs", max_restarts=d.max_restarts, nodes=nodes,
                        console_ranks=d.console_ranks(nproc), log_line_prefix=d.log_line_prefix,
                        rdzv_endpoint=d.rdzv_endpoint, rdzv_id=d.rdzv_id or job.name)
    except SignalException as e:
        if rundir.lost():
            raise LaunchError(f"{rundir.lost()}: another job holds it now; this job's ranks were stopped\n"
                              "HINT: give each job its own name= (run directory); this job's checkpoints "
                              "there may be mixed with the other's") from None
        print(f"launcher: stopped by {e.sigval.name}; all ranks were stopped", file=sys.stderr)
        return 128 + int(e.sigval)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the ranks are gone, the outcome known: see console()
    ranks = f"rank(s) {_span(results)}" if nodes != (1, 1) else "rank(s)"
    if job.script:
        print(f"[launcher] {job.name}: finished on {len(results)} {ranks}", file=sys.stderr)
    else:
        first = min(results)
        print(f"[launcher] {job.name}: finished on {len(results)} {ranks}; rank {first} returned "
              f"{results[first]!r}", file=sys.stderr)
    return EXIT_OK


def _span(ranks: dict[int, object]) -> str:
    return f"{min(ranks)}-{max(ranks)}" if len(ranks) > 1 else str(min(ranks))


def _check_entry_findable(job: config_mod.Job) -> None:
    """Before any process starts: the entry's module or the script exists (importing it comes later, once
    the ranks' server has started), and so does a checkpoint named to resume from."""
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

#: torchrun's rendezvous backends; only c10d (torchrun's default) is ours.
RDZV_BACKENDS = ("c10d", "static", "etcd", "etcd-v2")


def _check_strategy(job: config_mod.Job) -> None:
    """FSDP settings that would fail at the first step on this machine are refused before it starts."""
    d = job.distributed
    if d.strategy == "fsdp" and job.script is None:
        import torch

        from . import dist, fsdp

        cuda = torch.cuda.is_available()
        fsdp.check(d.fsdp, dist.resolve_backend(d.backend, d.nproc_per_node), cuda, job.source)


def _run_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``launcher run``, torchrun's spellings accepted (dashes or underscores)."""
    def add(*names: str, **kw: Any) -> None:
        flags = [n for name in names for n in dict.fromkeys((name, "--" + name[2:].replace("-", "_")))]
        parser.add_argument(*flags, **kw)

    add("--nproc-per-node", dest="nproc",
        help="ranks on this machine: N, or gpu (one per GPU), cpu (one per core), auto (gpu if any, "
        "else cpu) (distributed.nproc_per_node)")
    add("--max-restarts", dest="max_restarts", type=int,
        help="restart all ranks this many times after a failure (distributed.max_restarts)")
    add("--nnodes", help="machines: N or MIN:MAX (distributed.nnodes)")
    add("--rdzv-endpoint", dest="rdzv_endpoint",
        help="HOST:PORT where the machines meet (distributed.rdzv_endpoint)")
    add("--rdzv-id", dest="rdzv_id",
        help="the run's name at the rendezvous, the same on every machine (distributed.rdzv_id)")
    add("--rdzv-backend", dest="rdzv_backend", choices=RDZV_BACKENDS, help="c10d (torchrun's default) only")
    add("--master-addr", dest="master_addr", help="with --master-port: the rendezvous endpoint, as torchrun")
    add("--master-port", dest="master_port", type=int, help="with --master-addr (see there)")
    add("--node-rank", dest="node_rank", type=int,
        help="accepted for torchrun's command lines; the c10d rendezvous numbers the machines")
    add("--standalone", action="store_true", help="one machine, rendezvous on this one (the default)")
    add("--stop-grace-s", dest="stop_grace_s", type=float,
        help="seconds a rank gets after Ctrl-C or SIGTERM before SIGKILL (distributed.stop_grace_s, 30)")
    add("--tee", help="show every rank's output on the console (torchrun's 0-3; default: rank 0 only)")
    add("--local-ranks-filter", dest="local_ranks_filter",
        help="the local ranks whose output the console shows, as 0,2 (distributed.console)")
    add("--log-line-prefix-template", dest="log_line_prefix",
        help="prefix of each rank's console lines, ${rank} and ${local_rank} substituted; '' for none "
        "(distributed.log_line_prefix; default [rank${rank}]:)")
    add("--run-path", dest="run_path", action="store_true", help="the target is a script path, any suffix")
    add("--name", help="the run's name (name=; a script's defaults to the script's name)")
    add("--output-dir", dest="output_dir", help="parent folder of run directories (output_dir=)")
    parser.add_argument("-m", "--module", action="store_true", help="the target is a module, run as __main__")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launcher", description="Run the same PyTorch DDP job on a laptop, a GPU box or SLURM."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the job on this machine (or as one rank under torchrun / srun)",
                         usage=RUN_HELP, allow_abbrev=False)
    _run_options(run)
    run.add_argument("target", help="job file (YAML), script (.py) or, with -m, a module")
    run.add_argument("rest", nargs=argparse.REMAINDER,
                     help="overrides and options (job file), or the script's arguments")
    stacks = sub.add_parser("stacks", help="print every live rank's Python stacks (a job on this machine)",
                            description="print every live rank's Python stacks, all threads, within 5 s")
    stacks.add_argument("run_dir", help="the job's run directory (output_dir/name)")
    curves = sub.add_parser("curves", help="draw a run's curves (metrics.jsonl, perf.jsonl) to a PNG",
                            description="draw a run's curves (metrics.jsonl, logs/perf.jsonl) to a PNG")
    curves.add_argument("run_dir", help="the job's run directory (output_dir/name)")
    curves.add_argument("-o", "--out", help="the PNG to write (default RUN_DIR/curves.png)")
    merge = sub.add_parser("consolidate", help="write one file from a checkpoint (sharded or full)",
                           description="write one file from a checkpoint, offline, in this process")
    merge.add_argument("checkpoint", help="a checkpoint (step_N.dcp, step_N.pt) or a checkpoint folder")
    merge.add_argument("out", help="the file to write (torch.load(weights_only=True) reads it)")
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, overrides accepted anywhere after the job file (``submit job.yaml --wait a=1``), and
    ``launcher run JOB.yaml``'s options after it too; a script's arguments are its own, as under torchrun."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "run":
        if not _is_script(args):
            options = argparse.ArgumentParser(prog="launcher run", usage=RUN_HELP, allow_abbrev=False)
            _run_options(options)
            later, rest = options.parse_known_args(args.rest + extra, argparse.Namespace(**vars(args)))
            extra = [a for a in rest if a.startswith("-")]
            later.rest = [a for a in rest if not a.startswith("-")]
            args = later
    elif args.command not in ("stacks", "consolidate", "curves"):
        args.overrides += [a for a in extra if "=" in a and not a.startswith("-")]
        extra = [a for a in extra if "=" not in a or a.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _is_script(args: argparse.Namespace) -> bool:
    return bool(args.module or args.run_path or args.target.endswith(".py"))


def _nproc(value: str) -> int:
    """``--nproc-per-node``: a count, or torchrun's gpu / cpu / auto."""
    if value.isdigit():
        return int(value)
    if value not in ("gpu", "cpu", "auto"):
        raise UsageError(f"--nproc-per-node {value}: expected a number, gpu, cpu or auto\n"
                         "HINT: --nproc-per-node 2, or gpu for one rank per GPU")
    gpus = 0
    if value != "cpu":
        import torch

        gpus = torch.cuda.device_count()
    if value == "gpu" and gpus == 0:
        raise UsageError("--nproc-per-node gpu: this machine has no CUDA device\n"
                         "HINT: --nproc-per-node cpu (one rank per core) or a number")
    return gpus or len(os.sched_getaffinity(0))


def load_run_job(args: argparse.Namespace) -> config_mod.Job:
    """The job ``launcher run`` was given: a job file with overrides, or a script with its arguments."""
    options = []
    if args.nproc is not None:
        options.append(f"distributed.nproc_per_node={_nproc(str(args.nproc))}")
    if args.max_restarts is not None:
        options.append(f"distributed.max_restarts={args.max_restarts}")
    if args.rdzv_backend not in (None, "c10d"):
        raise UsageError(f"--rdzv-backend {args.rdzv_backend}: the launcher's machines meet through c10d "
                         "(torchrun's default)\nHINT: drop --rdzv-backend, or say --rdzv-backend c10d")
    # One machine: the rendezvous is on loopback, port 0 (no port to pick, none to collide): ignored there.
    if args.nnodes not in (None, "1", "1:1") and args.rdzv_endpoint is None and (
            args.master_addr is not None or args.master_port is not None):
        if args.master_addr is None or args.master_port is None:
            raise UsageError("--master-addr and --master-port go together (the machine where all meet)\n"
                             "HINT: give both, or --rdzv-endpoint HOST:PORT")
        args.rdzv_endpoint = f"{args.master_addr}:{args.master_port}"  # torchrun's static rendezvous, as c10d
    if args.standalone and args.nnodes not in (None, "1", "1:1"):
        raise UsageError(f"--standalone runs on this one machine, --nnodes says {args.nnodes}\n"
                         "HINT: drop one of them")
    for key in ("nnodes", "rdzv_endpoint", "rdzv_id"):
        if getattr(args, key) is not None:
            options.append(f"distributed.{key}={json.dumps(str(getattr(args, key)))}")  # a string, as given
    for key in ("name", "output_dir"):
        if getattr(args, key) is not None:
            options.append(f"{key}={json.dumps(getattr(args, key))}")
    if args.stop_grace_s is not None:
        options.append(f"distributed.stop_grace_s={args.stop_grace_s}")
    if args.tee is not None:
        options.append("distributed.console=all")
    if args.local_ranks_filter is not None:
        options.append(f"distributed.console={json.dumps(args.local_ranks_filter)}")
    if args.log_line_prefix is not None:
        options.append(f"distributed.log_line_prefix={json.dumps(args.log_line_prefix)}")
    if _is_script(args):
        script = f"-m {args.target}" if args.module else args.target
        name = args.target.rsplit(".", 1)[-1] if args.module else Path(args.target).stem
        data = {"name": name, "script": script, "script_args": list(args.rest)}
        return config_mod.from_dict(data, f"launcher run {args.target}", options)
    return config_mod.load(args.target, list(args.rest) + options)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``launcher`` console script; returns the exit code."""
    args = parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(load_run_job(args))
        if args.command == "stacks":
            from .launching.stacks import cmd_stacks

            return cmd_stacks(Path(args.run_dir))
        if args.command == "curves":
            from .curves import cmd_curves

            return cmd_curves(Path(args.run_dir), Path(args.out) if args.out else None)
        if args.command == "consolidate":
            from .tools.consolidate import cmd_consolidate

            return cmd_consolidate(Path(args.checkpoint), Path(args.out))
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
    for stream in (sys.stdout, sys.stderr):  # through the closed-pipe guard, not at the interpreter's exit
        stream.flush()
    sys.exit(code)
