"""``launcher submit``: the same job on SLURM through submitit; sweeps as job arrays; ``--wait`` follows.

Each SLURM task is one rank: the submitted callable (:class:`SlurmTask`) runs exactly what ``launcher run``
runs in a rank (:func:`launcher.rank.program.run_in_place`, reached by name), with
:class:`launcher.env.SlurmEnvironment` supplying rank, world size and the rendezvous address. Preemption and
time limits are handled inside the ranks (:mod:`launcher.rank.stop`); a requeued job resumes from its newest
checkpoint because ``checkpoint.resume`` is
``auto``. submitit is imported only here, so ``launcher run`` never needs it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from .. import config as config_mod
from .. import rundir
from ..entry import check_entry
from ..errors import EXIT_FAILURE, EXIT_OK, EXIT_REQUEUE, Failure, LaunchError, RankFailure, UsageError


def tasks_per_node(job: config_mod.Job) -> int:
    """Tasks (ranks) per node: ``slurm.tasks_per_node``, else GPUs per node, else ``nproc_per_node``."""
    s = job.slurm
    if s.tasks_per_node is not None:
        return s.tasks_per_node
    return s.gpus_per_node if s.gpus_per_node > 0 else job.distributed.nproc_per_node


def executor_parameters(job: config_mod.Job) -> dict[str, Any]:
    """``job.slurm`` as keyword arguments of submitit's ``AutoExecutor.update_parameters``."""
    s = job.slurm
    params: dict[str, Any] = {
        "name": job.name,
        "timeout_min": s.time_min,
        "nodes": s.nodes,
        "tasks_per_node": tasks_per_node(job),
        "cpus_per_task": s.cpus_per_task,
        "gpus_per_node": s.gpus_per_node or None,
        "mem_gb": s.mem_gb,
        "slurm_partition": s.partition,
        "slurm_account": s.account,
        "slurm_qos": s.qos,
        "slurm_constraint": s.constraint,
        "slurm_comment": s.comment,
        "slurm_exclusive": True if s.exclusive else None,
        "slurm_additional_parameters": dict(s.additional_parameters) or None,
        "slurm_srun_args": srun_args(job),
        "slurm_setup": list(s.setup) or None,
        "slurm_signal_delay_s": s.signal_delay_s,
    }
    return {k: v for k, v in params.items() if v is not None}


def srun_args(job: config_mod.Job) -> list[str]:
    """``slurm.srun_args`` plus ``--kill-on-bad-exit=1`` unless they say otherwise: a task that fails ends the
    step at once, as torchrun's agent stops the other ranks. Without it, a rank that failed before the
    process group formed (rank 0 finding the run directory in use, say) left the others waiting
    ``distributed.startup_timeout_s`` (10 minutes) before the job failed."""
    given = list(job.slurm.srun_args)
    if any(a.startswith(("--kill-on-bad-exit", "-K")) for a in given):
        return given
    return ["--kill-on-bad-exit=1", *given]


def sweep_jobs(job: config_mod.Job, sweeps: list[str] | None = None) -> list[config_mod.Job]:
    """The jobs to submit: ``job`` itself, or one job per override set of the sweep.

    ``sweeps`` (``--sweep 'a=1 b=2'`` options) replace the job file's ``sweep:`` list. Sweep member ``i`` runs
    in ``output_dir/name/name-i``; every member is validated before anything is submitted.
    """
    sets: list[list[str]] = [shlex.split(s) for s in sweeps or []]
    if not sets:
        sets = [[f"{k}={_yaml_value(v)}" for k, v in member.items()] for member in job.sweep]
    if not sets:
        return [job]
    base = config_mod.to_dict(job)
    base["sweep"] = []
    out = []
    for i, overrides in enumerate(sets):
        naming = [f"output_dir={job.run_dir}", f"name={job.name}-{i}"]
        member = config_mod.from_dict(base, f"{job.source} (sweep member {i})", overrides + naming)
        check_entry(member)  # its args too, before anything is submitted
        out.append(member)
    return out


def _yaml_value(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


@dataclasses.dataclass
class SlurmTask:
    """The callable submitit pickles: run one rank of the job (in every task of the allocation)."""

    job_data: dict[str, Any]
    source: str

    def __call__(self) -> Any:
        from ..env import REQUEUE_LEDGER_ENV
        from ..spec import rank_function  # by name: the submitting side never imports the rank program

        job = config_mod.from_dict(self.job_data, self.source)
        # Time-limit requeues are counted here, not by SLURM_RESTART_COUNT (preemptions count there too).
        job_id = os.environ.get("SLURM_JOB_ID", "job")
        os.environ[REQUEUE_LEDGER_ENV] = str(_log_folder(job) / f"{job_id}.requeues")
        return rank_function("run_in_place")(job)


def make_executor(job: config_mod.Job, folder: Path) -> Any:
    """A submitit ``AutoExecutor`` for SLURM with ``job``'s resources."""
    import submitit

    kwargs: dict[str, Any] = {}
    if job.slurm.python:
        kwargs["slurm_python"] = job.slurm.python
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", **kwargs)
    except RuntimeError as e:  # submitit: 'Could not detect "srun"'
        raise UsageError(
            f"{job.source}: cannot submit: {e}\nHINT: run this on a SLURM login node, or start the local "
            'test cluster: slurm/cluster.sh up && eval "$(slurm/cluster.sh env)"'
        ) from None
    try:
        executor.update_parameters(**executor_parameters(job))
    except (ValueError, AssertionError) as e:
        raise LaunchError(f"{job.source}: slurm: submitit refused the parameters: {e}") from None
    return executor


def check_controller(job: config_mod.Job, timeout_s: float = 30.0) -> None:
    """A SLURM controller answers ``scontrol ping``; :class:`UsageError` with how to get one otherwise."""
    hint = ('HINT: run this on a SLURM login node, or start the local test cluster: slurm/cluster.sh up && '
            'eval "$(slurm/cluster.sh env)"')
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():  # (scontrol then looks for a controller in DNS, 30 s here)
        raise UsageError(f"{job.source}: cannot submit: SLURM_CONF={conf} does not exist\n{hint}, or unset "
                         "SLURM_CONF to use the system's configuration")
    try:
        r = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=timeout_s,
                           check=False)
    except FileNotFoundError:
        raise UsageError(f"{job.source}: cannot submit: no SLURM commands here (scontrol not found)\n"
                         f"{hint}") from None
    except subprocess.TimeoutExpired:
        raise UsageError(f"{job.source}: cannot submit: scontrol ping did not answer in {timeout_s:g} s\n"
                         f"{hint}") from None
    said = (r.stdout.strip() or r.stderr.strip()).splitlines()
    if r.returncode != 0 or "UP" not in r.stdout:
        raise UsageError(f"{job.source}: cannot submit: no SLURM controller answers (scontrol ping: "
                         f"{said[0] if said else r.returncode})\n{hint}")


def submit(job: config_mod.Job, sweeps: list[str] | None = None) -> tuple[list[config_mod.Job], list[Any]]:
    """Submit ``job`` (or its sweep, as one array); returns the jobs submitted and submitit's handles."""
    check_entry(job)
    check_controller(job)
    members = sweep_jobs(job, sweeps)
    folder = _log_folder(job).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    for member in members:
        # Tasks start in the submission directory, but an absolute output_dir survives a `cd` in slurm.setup.
        member.output_dir = str(Path(member.output_dir).resolve())
        rundir.check_job_usable(member)
        rundir.check_job_free(member)
    executor = make_executor(job, folder)
    tasks = [SlurmTask(config_mod.to_dict(m), m.source) for m in members]
    try:
        if len(tasks) == 1:
            return members, [executor.submit(tasks[0])]
        with executor.batch():
            futures = [executor.submit(t) for t in tasks]
        return members, futures
    except subprocess.CalledProcessError as e:
        raw = e.stderr or e.output or b""
        out = (raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)).strip()
        raise LaunchError(f"{job.source}: sbatch refused the job: {out or e}\nHINT: check slurm.partition, "
                          "slurm.account and the resources (sinfo shows what exists)") from None


def _log_folder(job: config_mod.Job) -> Path:
    p = Path(job.slurm.log_folder)
    return p if p.is_absolute() else job.run_dir / p


class _Tail:
    """Print what was appended to a set of files since the last call (rank 0's output across requeues)."""

    def __init__(self) -> None:
        self.offsets: dict[Path, int] = {}

    def pump_jobs(self, jobs: list[Any], prefixes: list[str]) -> None:
        """Rank 0's stdout and stderr of every job (submitit's task-0 log files)."""
        for job, prefix in zip(jobs, prefixes):
            self.pump(Path(job.paths.stdout), sys.stdout, prefix)
            self.pump(Path(job.paths.stderr), sys.stderr, prefix)

    def pump(self, path: Path, out: TextIO, prefix: str = "") -> None:
        try:
            with open(path, "rb") as f:
                f.seek(self.offsets.get(path, 0))
                data = f.read()
        except FileNotFoundError:
            return
        # Only whole lines, so a line is never split between two prefixes.
        cut = data.rfind(b"\n") + 1
        if not cut:
            return
        self.offsets[path] = self.offsets.get(path, 0) + cut
        text = data[:cut].decode(errors="replace")
        if prefix:
            text = "".join(f"{prefix}{line}\n" for line in text.splitlines())
        out.write(text)
        out.flush()


#: sacct states of a job that runs or will run again.
_LIVE = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "CONFIGURING", "COMPLETING",
         "SUSPENDED", "RESIZING")
#: States of a run that ended by node failure or preemption: SLURM requeues a requeueable job moments later
#: (squeue showed NODE_FAIL for seconds, after all four ranks of a cut-off job had written their errors), so
#: they end the job only if it stays in them for this long.
_REQUEUED_SOON, _REQUEUE_WAIT_S = ("NODE_FAIL", "PREEMPTED"), 60.0


def follow(jobs: list[Any], names: list[str], poll_s: float = 1.0, sacct_every_s: float = 5.0) -> int:
    """Stream rank 0's output of every job until all are done; report results; return the exit code.

    A job SLURM requeues (NODE_FAIL, preemption) is followed into its next run, and that run's result is
    reported: submitit takes a task's result file as the end of the job (a failed run's ranks write their
    errors there) and stops asking SLURM about a job it once saw end, so here a job with a failed task is done
    only once SLURM (squeue, then sacct: :func:`_job_state`) says it left the running and pending states.
    """
    tail = _Tail()
    prefixes = [f"[{n}] " if len(jobs) > 1 else "" for n in names]
    last_sacct = 0.0
    states: dict[str, str] = {}
    since: dict[str, float] = {}  # when a job was first seen in a _REQUEUED_SOON state
    while True:
        tail.pump_jobs(jobs, prefixes)
        force = time.monotonic() - last_sacct > sacct_every_s
        if force:
            last_sacct = time.monotonic()
            for job, name in zip(jobs, names):
                _note_state(job, name, states)
        if all(job.done(force_check=force) and _ended(job, states, since) for job in jobs):
            break
        time.sleep(poll_s)
    tail.pump_jobs(jobs, prefixes)  # what was written between the last pump and the end
    codes = [_report(job, name) for job, name in zip(jobs, names)]
    if EXIT_FAILURE in codes:
        return EXIT_FAILURE
    return EXIT_REQUEUE if EXIT_REQUEUE in codes else EXIT_OK


def _note_state(job: Any, name: str, states: dict[str, str]) -> None:
    """Record the job's state; say so (and why) when it went from running back to pending (requeued)."""
    job_id = job.job_id
    before, now = states.get(job_id), _job_state(job_id)
    states[job_id] = now
    if before in ("RUNNING", "COMPLETING", "NODE_FAIL", "PREEMPTED") and now in ("PENDING", "REQUEUED"):
        print(f"[launcher] {name}: SLURM job {job_id} was requeued (state {before} -> {now}){_lost(job)}; "
              "following its next run, which resumes from the last checkpoint", file=sys.stderr, flush=True)


def _lost(job: Any) -> str:
    """``": run N ended NODE_FAIL, lost node HOST (ranks A-B)"`` when the job's last ended run ended by node
    failure; the node is one of the run's nodes that SLURM now has down or not responding (empty if none)."""
    try:
        r = subprocess.run(["sacct", "-j", str(job.job_id), "-X", "-n", "-P", "-D", "-o", "State,NodeList"],
                           check=False, capture_output=True, text=True, timeout=30)
        runs = [line.split("|") for line in r.stdout.splitlines()]  # every run of the job, first to last
        ended = [n for n, (state, _) in enumerate(runs, 1) if state not in _LIVE or state == "REQUEUED"]
        if not ended or runs[ended[-1] - 1][0] != "NODE_FAIL":
            return ""  # e.g. a preemption after an earlier node failure
        failed = ended[-1]
        hosts = subprocess.run(["scontrol", "show", "hostnames", runs[failed - 1][1]], check=False,
                               capture_output=True, text=True, timeout=30).stdout.split()
        down = subprocess.run(["sinfo", "-h", "-N", "-t", "down,no_respond,fail", "-o", "%N"], check=False,
                              capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return ""
    per_node = job.num_tasks // max(len(hosts), 1)
    lost = [f"{h} (ranks {i * per_node}-{(i + 1) * per_node - 1})" for i, h in enumerate(hosts) if h in down]
    return f": run {failed} ended NODE_FAIL" + (f", lost node {', '.join(lost)}" if lost else "")


def _job_state(job_id: str) -> str:
    """squeue's state while SLURM holds the job in its queue, else sacct's. (sacct alone is not enough: right
    after a node failure it showed the failed run's NODE_FAIL while SLURM had already queued the next run.)"""
    try:
        r = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], check=False, capture_output=True,
                           text=True, timeout=30)
        queued = r.stdout.split()
        if r.returncode == 0 and queued:
            return queued[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return _sacct_state(job_id)[0]


def _ended(job: Any, states: dict[str, str], since: dict[str, float]) -> bool:
    """After submitit said done: True unless a task failed and SLURM runs or will run the job again."""
    if _all_returned(job):
        return True  # every rank returned: the job is over, whatever sacct still shows
    state = states.get(job.job_id, "UNKNOWN")
    if state in _REQUEUED_SOON:
        return time.monotonic() - since.setdefault(job.job_id, time.monotonic()) > _REQUEUE_WAIT_S
    since.pop(job.job_id, None)
    return state not in _LIVE


def _outcome(job: Any, rank: int) -> tuple[str, Any] | None:
    """``(outcome, value)`` of a task's result file: ``("success", returned)`` or ``("error", traceback)``;
    None without a readable one. Read directly: submitit's accessors wait 15 s per task for a missing one."""
    import pickle

    try:
        with open(job.task(rank).paths.result_pickle, "rb") as f:
            outcome, value = pickle.load(f)[:2]
    except Exception:  # noqa: BLE001  (missing, partly written, or a class this side cannot import)
        return None
    return outcome, value


def _all_returned(job: Any) -> bool:
    """Every task's result file says success."""
    return all((o := _outcome(job, rank)) is not None and o[0] == "success" for rank in range(job.num_tasks))


def _report(job: Any, name: str) -> int:
    """Print how one submitted job ended; return its exit code (see :mod:`launcher.errors`)."""
    n = job.num_tasks
    outcomes = [_outcome(job, rank) for rank in range(n)]
    failures = [(rank, o) for rank, o in enumerate(outcomes) if o is None or o[0] != "success"]
    if not failures:
        print(f"[launcher] {name}: SLURM job {job.job_id} finished on {n} rank(s); "
              f"rank 0 returned {outcomes[0][1]!r}")  # type: ignore[index]
        return EXIT_OK
    state, exit_code = _final_state(job.job_id)
    if exit_code == f"{EXIT_REQUEUE}:0":
        print(f"[launcher] {name}: SLURM job {job.job_id} stopped with its state saved and was not requeued "
              f"(state {state})\nHINT: submit it again to resume from the checkpoint", file=sys.stderr)
        return EXIT_REQUEUE
    crashed = []
    for rank, o in failures:
        log = job.task(rank).paths.stderr
        text = str(o[1]).strip() if o is not None else (
            f"no result: the task ended without one (killed, or its node lost); see {log}")
        crashed.append(Failure(rank=rank, host=_host(text), exitcode=1, signal=None, timestamp=0, message="",
                               traceback=text))
    print(f"launcher: {name}: SLURM job {job.job_id} failed (state {state}, exit code {exit_code}): "
          f"{RankFailure(crashed)}", file=sys.stderr)
    return EXIT_FAILURE


def _host(message: str) -> str:
    """The host named in the note the rank program adds to a rank's error (``?`` if none)."""
    found = re.search(r"\[launcher\] rank \d+ on (\S+),", message)
    return found.group(1) if found else "?"


def _final_state(job_id: str, timeout_s: float = 30.0) -> tuple[str, str]:
    """``(state, exit code)`` from sacct once the job left the running states (results come a bit earlier)."""
    end = time.monotonic() + timeout_s
    state, code = _sacct_state(job_id)
    while state in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", "UNKNOWN") and time.monotonic() < end:
        time.sleep(1)
        state, code = _sacct_state(job_id)
    return state, code


def _sacct_state(job_id: str) -> tuple[str, str]:
    try:
        r = subprocess.run(["sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", "State,ExitCode"],
                           check=False, capture_output=True, text=True, timeout=30)
        state, _, code = r.stdout.strip().splitlines()[0].partition("|")
        return state, code
    except (OSError, subprocess.SubprocessError, IndexError):
        return "UNKNOWN", "?"


def cmd_submit(job: config_mod.Job, wait: bool = False, sweeps: list[str] | None = None) -> int:
    """``launcher submit``: submit, print the job id and the log paths, optionally follow."""
    members, jobs = submit(job, sweeps)
    names = [m.name for m in members]
    first = jobs[0]
    array = f" as an array of {len(jobs)}" if len(jobs) > 1 else ""
    print(f"[launcher] {job.name}: submitted SLURM job {first.job_id.split('_')[0]}{array} "
          f"({tasks_per_node(job)} task(s) x {job.slurm.nodes} node(s))", flush=True)
    for j, m in zip(jobs, members):
        print(f"[launcher]   {m.name}: run dir {m.run_dir}, rank 0 log {j.paths.stdout}", flush=True)
    if not wait:
        print(
            f"[launcher] follow with: tail -f {first.paths.stdout}   (squeue -j {first.job_id} for the state)"
        )
        return EXIT_OK
    return follow(jobs, names)
