"""Real scripts behave as under torchrun (issue 40): the first error is the one reported, exit handlers run,
Ctrl-C gives a rank its cleanup, output a program can read, and loops written for HF Accelerate or Lightning
Fabric run unchanged. Each script in ``tests/scripts`` (or ``examples``) is the kind users bring, unmodified;
the same script runs under torchrun beside ours where the behaviour is torchrun's."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, descendants, killable_env, launcher_cmd, long_tmpdir, torchrun_finished

SCRIPTS = ROOT / "tests" / "scripts"


def torchrun_cmd(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("torchrun")), "--standalone", *args]


def _run(argv: list[str], tmp_path: Path, timeout: float = 180,
         tmpdir: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``argv`` to its end; past ``timeout``, it and every process below it are killed (torchrun's ranks,
    in sessions of their own, ran on when only torchrun was) and :class:`subprocess.TimeoutExpired`
    raised."""
    env = killable_env(tmp_path) if tmpdir is None else {**os.environ, "TMPDIR": str(tmpdir)}
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _stopped(argv: list[str], tmp_path: Path, after: str) -> tuple[subprocess.Popen[str], float, str]:
    """Start ``argv``, send SIGINT once ``after`` was printed; the process, the seconds it took to exit
    after the signal, and its stderr."""
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=killable_env(tmp_path))
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if after in line:
                break
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=90)
        return proc, time.monotonic() - sent, err
    finally:
        proc.kill()


def test_the_first_error_is_the_one_reported_while_dataloader_workers_run(tmp_path):
    """A rank raising with DataLoader workers up: torch's SIGCHLD handler raised "DataLoader worker ... is
    killed by signal" when the rank killed its workers, and the report showed torch's placeholder."""
    # with a TMPDIR too long for a socket's path in it (107 bytes): torch's workers pass the batches'
    # shared-memory files through a multiprocessing.resource_sharer socket there
    ours = _run(launcher_cmd("run", "--nproc-per-node", "2", str(SCRIPTS / "boom.py")), tmp_path,
                tmpdir=long_tmpdir(tmp_path))
    assert ours.returncode == 1 and "RuntimeError: boom on rank 0" in ours.stderr, ours.stderr
    try:
        # torchrun beside it (a TMPDIR of the usual length): the same error. Under the long one its ranks
        # never get their first batch ("AF_UNIX path too long" in each worker's feeder thread; the launcher
        # moves that folder) and it waits forever; a CI run once had such a TMPDIR.
        theirs = _run(torchrun_cmd("--nproc-per-node", "2", str(SCRIPTS / "boom.py")), tmp_path, timeout=60)
        assert theirs.returncode == 1 and "RuntimeError: boom on rank 0" in theirs.stderr, theirs.stderr
    except subprocess.TimeoutExpired:
        print("torchrun's run of boom.py hung; its session was killed")
    assert "rank 0 failed first" in ours.stderr and "is killed by signal" not in ours.stderr, ours.stderr
    assert "To enable traceback" not in ours.stderr, ours.stderr
    # each rank's traceback is in its own log too (rank 1's: its peer went away), with its rank
    logs = {p.parent.name: p.read_text() for p in (tmp_path / "runs" / "boom" / "logs").rglob("stderr.log")}
    assert "RuntimeError: boom on rank 0" in logs["0"] and "[launcher] rank 0 on" in logs["0"], logs
    assert "Traceback" in logs["1"] and "[launcher] rank 1 on" in logs["1"], logs


@pytest.mark.parametrize("end", ["normal", "ctrl-c"])
def test_atexit_handlers_run_after_the_threads_as_under_torchrun(tmp_path, end):
    """A script closing its logging run in an atexit handler: under ``launcher run`` the handler never ran."""
    script = str(SCRIPTS / "exit_handlers.py")
    runs = {"ours": launcher_cmd("run", "--nproc-per-node", "2", script)}
    if end == "normal":  # beside torchrun once: its Ctrl-C exit differs anyway
        runs["torchrun"] = torchrun_cmd("--nproc-per-node", "2", script)
    for name, argv in runs.items():
        out = tmp_path / name
        out.mkdir()
        if end == "normal":
            r = _run([*argv, str(out)], tmp_path)
            assert r.returncode == 0 or (name == "torchrun" and torchrun_finished(r)), r.stderr
        else:
            proc, _, err = _stopped([*argv, str(out), "wait"], tmp_path, "rank 0 trained")
            assert proc.returncode in (130, 1), err  # torchrun's own exit code on SIGINT is 1
        closed = {p.name: p.read_text() for p in out.glob("closed-rank*")}
        expected = {"closed-rank0": "after the thread", "closed-rank1": "after the thread"}
        assert closed == expected, (name, closed)


def test_ctrl_c_gives_a_rank_its_cleanup_and_a_finished_rank_never_holds_the_exit(tmp_path):
    """Rank 0 finished, rank 1 cleans up for 2 s on Ctrl-C: torchrun gives it 30 s, so do we
    (``distributed.stop_grace_s``, ``--stop-grace-s``); with a grace of 1 s it is killed after 1 s."""
    script = str(SCRIPTS / "slow_cleanup.py")
    out = tmp_path / "default"
    out.mkdir()
    env_argv = ["env", "CLEANUP_S=2"]
    proc, took, err = _stopped([*env_argv, *launcher_cmd("run", "--nproc-per-node", "2", "--tee", "3", script,
                                                        str(out))], tmp_path, "rank 1 training")
    assert proc.returncode == 130, err
    assert (out / "cleaned").exists(), err
    assert 2 <= took < 2 + 3, took  # the cleanup's time, and rank 0 (finished) held nothing
    short = tmp_path / "short"
    short.mkdir()
    proc, took, err = _stopped([*env_argv, *launcher_cmd("run", "--nproc-per-node", "2", "--tee", "3",
                                                        "--stop-grace-s", "1", script, str(short))],
                               tmp_path, "rank 1 training")
    assert proc.returncode == 130 and not (short / "cleaned").exists(), err
    assert took < 1 + 3, took
    quick = tmp_path / "quick"
    quick.mkdir()
    proc, took, err = _stopped(launcher_cmd("run", "--nproc-per-node", "2", "--tee", "3", script, str(quick)),
                               tmp_path, "rank 1 training")
    assert proc.returncode == 130 and took < 3, (took, err)
    print(f"Ctrl-C with rank 0 finished and no cleanup: exit {took:.2f} s after the signal")


def test_output_a_program_can_read(tmp_path):
    """torchrun's --log-line-prefix-template '' (no prefix) and --local-ranks-filter; the launcher's own lines
    on stderr; each rank's stdout lines in their order."""
    script = str(SCRIPTS / "result_json.py")
    r = _run(launcher_cmd("run", "--nproc-per-node", "2", "--log-line-prefix-template", "", script), tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["rank 0 line 0", "rank 0 line 1", "rank 0 line 2", '{"result": 0.5}']
    assert "[launcher] result_json: finished on 2 rank(s)" in r.stderr, r.stderr
    r = _run(launcher_cmd("run", "--nproc-per-node", "2", "--local-ranks-filter", "1",
                          "--log-line-prefix-template", "${local_rank}|", script), tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["1|rank 1 line 0", "1|rank 1 line 1", "1|rank 1 line 2"], r.stdout


@pytest.mark.parametrize("script", ["accelerate_loop.py", "fabric_loop.py"])
def test_loops_written_for_accelerate_and_fabric_run_unchanged(tmp_path, script):
    """The same numbers as under torchrun (which is how both tools run on several machines)."""
    import importlib.util

    # found, not imported: lightning_fabric's import sets environment variables
    if importlib.util.find_spec("accelerate" if "accelerate" in script else "lightning_fabric") is None:
        pytest.skip("accelerate / lightning-fabric not installed (make test installs them)")
    path = str(ROOT / "examples" / script)
    ours = _run(launcher_cmd("run", "--nproc-per-node", "2", "--log-line-prefix-template", "", path),
                tmp_path)
    theirs = _run(torchrun_cmd("--nproc-per-node", "2", path), tmp_path)
    assert ours.returncode == 0 and torchrun_finished(theirs), ours.stderr[-3000:] + theirs.stderr[-3000:]
    result = [line for line in ours.stdout.splitlines() if line.startswith("RESULT")]
    assert result == [line for line in theirs.stdout.splitlines() if line.startswith("RESULT")], ours.stdout
    assert result[0].startswith("RESULT processes=2 loss="), result
