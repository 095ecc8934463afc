"""Shared fixtures: leak guards, the tiny job on a temporary run directory, and process-tree helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as tdist

ROOT = Path(__file__).resolve().parents[1]
pytest_plugins = ["launcher.testing"]


@pytest.fixture(autouse=True)
def _no_leaks():
    """Fail a test that leaks environment variables or leaves a process group behind."""
    before = dict(os.environ)
    yield
    leaked_pg = tdist.is_available() and tdist.is_initialized()
    if leaked_pg:
        tdist.destroy_process_group()
    after = dict(os.environ)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    # torch sets TORCHINDUCTOR_CACHE_DIR itself on the first backward pass
    # (torch/_inductor/runtime/cache_dir_utils.py)
    changed -= {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR"}
    os.environ.clear()
    os.environ.update(before)
    assert not leaked_pg, "the test left a process group initialized"
    assert not changed, f"the test leaked environment variables: {sorted(changed)}"


def killable_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a run the test kills: temp files of its processes (multiprocessing's ``pymp-*``
    folders of SIGKILLed DataLoader workers) land in the test's own folder instead of staying in /tmp."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp)}


def long_tmpdir(tmp_path: Path) -> Path:
    """A folder whose path is as long as a Unix socket's may be (107 bytes): a socket in a folder made in it
    cannot be bound ("AF_UNIX path too long"), as under a long TMPDIR."""
    from launcher.processes import SOCKET_PATH_MAX

    folder = tmp_path / ("t" * max(1, SOCKET_PATH_MAX - len(str(tmp_path))))
    folder.mkdir()
    return folder


def launcher_cmd(*args: str) -> list[str]:
    """The CLI as users type it: the venv's console script, run from the repository root."""
    return [str(Path(sys.executable).with_name("launcher")), *args]


def run_cli(*args: str, timeout: float = 180, cwd: Path = ROOT, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        launcher_cmd(*args), cwd=cwd, check=False, capture_output=True, text=True, timeout=timeout, **kw
    )


def cmdline(pid: int) -> str:
    """The process's command line, arguments joined by spaces ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def comm(pid: int) -> str:
    """The process's name as ``ps -o comm`` shows it ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == pid:
                out.append(int(entry.name))
    return out


def _stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name: state, ppid, pgrp, session, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children_of(todo.pop())
        out += kids
        todo += kids
    return out


def rank_pids(launcher_pid: int) -> list[int]:
    """The ranks a launcher started: processes below it named ``launcher-rank*`` leading their own session."""
    out = []
    for pid in descendants(launcher_pid):
        try:
            named = Path(f"/proc/{pid}/comm").read_text().startswith("launcher-rank")
            if named and int(_stat(pid)[3]) == pid:
                out.append(pid)
        except OSError:
            continue
    return out


def left_behind(pids: list[int], sessions: list[int]) -> list[int]:
    """Live processes among ``pids`` or in ``sessions`` (a rank's session holds its DataLoader workers)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = _stat(int(entry.name))
            except OSError:
                continue
            if fields[0] != "Z" and (int(entry.name) in pids or int(fields[3]) in sessions):
                out.append(int(entry.name))
    return out


def wait_until(cond, timeout: float, interval: float = 0.1):
    """The first true value of ``cond()`` within ``timeout`` seconds, else its last (false) value. Use the
    value returned: asking again may see a state that changed since (an epoch's workers being replaced)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := cond():
            return value
        time.sleep(interval)
    return cond()


def semaphores() -> set[str]:
    """multiprocessing's named semaphores on this machine (DataLoader queues' locks, until unlinked)."""
    return {p.name for p in Path("/dev/shm").glob("sem.mp-*")}


def semaphores_open_in(pids: list[int]) -> set[str]:
    """The semaphores of ``semaphores()`` that these processes have open by name (a DataLoader worker opens
    its queues' locks so; the rank that made one maps it under a temporary name)."""
    held: set[str] = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        held |= {line.rsplit("/", 1)[-1] for line in maps.splitlines() if "/sem.mp-" in line}
    return held


def torchrun_finished(r: subprocess.CompletedProcess[str]) -> bool:
    """A reference run under plain torchrun ended as it should: exit 0, or the abort at interpreter shutdown
    that torch 2.14/2.15 ranks sometimes die of once their work is done ("terminate called without an active
    exception", SIGABRT; the launcher's ranks leave by os._exit and never hit it, see
    launcher.rank.process.exit_now). Seen failing tests/test_script_mode.py once in a loaded make test."""
    aborted = "terminate called without an active exception" in r.stderr and "SIGABRT" in r.stderr
    return r.returncode == 0 or aborted


def cluster_cannot_run(why: str) -> None:
    """``slurm/cluster.sh`` said it cannot run here (exit 3): skip, except under CI (``CI=true``), where a
    cluster that cannot start (a bad package mirror, say) must fail the run instead of turning every cluster
    test into a skip of a green ``make test``."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI: the SLURM cluster could not start: {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture
def run_root(tmp_path: Path) -> Path:
    """A run directory root unique to the test (every process of the run mentions it)."""
    return tmp_path / "runs"
