"""The run directory's lock: one running job per directory, and the check ``launcher submit`` makes."""

import subprocess
import sys

import pytest

from launcher import rundir
from launcher.errors import UsageError

HOLD = "import sys, time; from launcher import rundir; from pathlib import Path; " \
       "rundir.lock(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)"


def test_check_free_names_the_holder_and_takes_nothing(tmp_path):
    rundir.check_free(tmp_path / "never-used")  # no lock file: free
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UsageError, match=rf"(?s)in use by another job \(pid {holder.pid} on .*HINT"):
            rundir.check_free(tmp_path, "job.yaml")
    finally:
        holder.kill()
        holder.wait()
    rundir.check_free(tmp_path)  # the kernel released the lock with its holder
    rundir.check_free(tmp_path)  # and the check kept nothing (flock conflicts across descriptors)
