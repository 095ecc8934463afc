"""``launcher run|config|submit``: parse, load the job, dispatch; one place reports errors and exit codes."""

from __future__ import annotations

import argparse
import signal
import sys

from . import config as config_mod
from . import env as env_mod
from . import forkserver
from .errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, LaunchError, RankFailure

# torch is imported only once the ranks' fork server is importing it too (see launcher.forkserver).


def cmd_run(job: config_mod.Job) -> int:
    if not env_mod.detect().spawns_here():
        from .worker import exit_now, run_in_place

        run_in_place(job)  # under torchrun or in an srun step: this process is one rank of the job
        exit_now(EXIT_OK)  # done and saved: skip interpreter shutdown (see worker.exit_now)
    nproc = job.distributed.nproc_per_node
    forkserver.start(nproc)
    from torch.distributed.elastic.multiprocessing import SignalException

    from .spawn import spawn
    from .worker import job_spec, write_resolved

    spec = job_spec(job)
    write_resolved(job)
    print(f"[launcher] {job.name}: starting {nproc} rank(s); logs in {job.run_dir / 'logs'}", flush=True)
    try:
        results = spawn(spec, nproc, job.run_dir / "logs", max_restarts=job.distributed.max_restarts)
    except SignalException as e:
        print(f"launcher: stopped by {e.sigval.name}; all ranks were stopped", file=sys.stderr)
        return 128 + int(e.sigval)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the ranks are gone, the outcome known: see console()
    print(f"[launcher] {job.name}: finished on {len(results)} rank(s); rank 0 returned {results[0]!r}")
    return EXIT_OK


def cmd_config(job: config_mod.Job) -> int:
    print(config_mod.dump(job), end="")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launcher", description="Run the same PyTorch DDP job on a laptop, a GPU box or SLURM."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "run the job on this machine (or as one rank under torchrun / srun)"),
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``launcher`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        job = config_mod.load(args.job, args.overrides)
        if args.command == "config":
            return cmd_config(job)
        if args.command == "submit":
            from .slurm import cmd_submit  # submitit is only imported when submitting

            return cmd_submit(job, wait=args.wait, sweeps=args.sweep)
        return cmd_run(job)
    except config_mod.ConfigError as e:
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

    Once the outcome is known, Ctrl-C is ignored: the interpreter's shutdown (about 0.4 s with torch loaded,
    much of it after Python has put back the default handler) would otherwise turn a finished job into a death
    by SIGINT, or print a KeyboardInterrupt traceback from a shutdown callback.
    """
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)
