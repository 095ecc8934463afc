"""The run directory's lock: one running job per directory, and the check ``launcher submit`` makes."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from launcher import rundir
from launcher.errors import UsageError

HOLD = "import sys, time; from launcher import rundir; from pathlib import Path; " \
       "rundir.lock(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)"


def hold(run_dir):
    """Another process holding ``run_dir`` (once it has printed "held")."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_check_free_names_the_holder_and_takes_nothing(tmp_path):
    rundir.check_free(tmp_path / "never-used")  # no lock file: free
    holder = hold(tmp_path)
    try:
        with pytest.raises(UsageError, match=rf"(?s)in use by another job \(pid {holder.pid} on .*HINT"):
            rundir.check_free(tmp_path, "job.yaml")
    finally:
        holder.kill()
        holder.wait()
    rundir.check_free(tmp_path)  # the kernel released the lock with its holder
    rundir.check_free(tmp_path)  # and the check kept nothing (flock conflicts across descriptors)


@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_the_lock_file_never_reaches_another_file(tmp_path, link):
    """In a shared output folder, a link named .lock must not let the launcher truncate its target."""
    victim = tmp_path / "someone-elses-file"
    victim.write_text("precious")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").symlink_to(victim) if link == "symbolic" else os.link(victim, run_dir / ".lock")
    with pytest.raises(UsageError, match=r"(?s)lock file .*(is a symbolic link|has other names).*HINT"):
        rundir.lock(run_dir, "job.yaml")
    with pytest.raises(UsageError, match="lock file"):
        rundir.check_free(run_dir, "job.yaml")
    assert victim.read_text() == "precious"


def test_a_run_directory_deleted_under_its_job_lets_no_second_job_in(tmp_path):
    run_dir = tmp_path / "run"
    holder = hold(run_dir)
    try:
        shutil.rmtree(run_dir)
        time.sleep(rundir.WATCH_S * 3)
        with pytest.raises(UsageError, match=rf"in use by another job \(pid {holder.pid} "):
            rundir.lock(run_dir, "job.yaml")
    finally:
        holder.kill()
        _, err = holder.communicate()
    assert "was removed while this job ran: the job goes on and holds it again" in err, err
