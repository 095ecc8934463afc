"""Ranks keep freed host memory: a CPU step's allocate/free churn stops page-faulting (glibc mallopt)."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys

import pytest
import torch

import launcher

from .conftest import ROOT

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting exists only in glibc")


def churn_faults(rounds: int = 20) -> int:
    """Minor page faults while allocating, touching and freeing six 16 MiB tensors a round (after warm-up)."""

    def one_round() -> None:
        tensors = [torch.ones(4 << 20) for _ in range(6)]
        del tensors

    for _ in range(5):
        one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        one_round()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


# glibc's defaults, pinned: left dynamic, whether the churn faults depends on the heap's layout at the time
# (the same command faults 490 000 times or not at all from run to run), which is the luck the rank removes.
GLIBC_DEFAULTS = "glibc.malloc.trim_threshold=131072:glibc.malloc.mmap_threshold=131072"


def faults_in_fresh_process(keep: bool) -> int:
    code = (
        "from launcher.rank import hostmem; from tests.test_hostmem import churn_faults; "
        f"assert hostmem.keep_freed_memory() if {keep} else True; print(churn_faults())"
    )
    env = {**os.environ, "GLIBC_TUNABLES": GLIBC_DEFAULTS}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    return int(out.stdout.split()[-1])


def test_keep_freed_memory_stops_the_page_faults_of_glibc_defaults():
    assert faults_in_fresh_process(keep=False) > 100_000  # 16 MiB blocks mmapped and faulted in every round
    assert faults_in_fresh_process(keep=True) < 100


def test_ranks_keep_freed_memory(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", GLIBC_DEFAULTS)  # the ranks start with glibc's defaults
    out = launcher.launch(churn_faults, nproc=2, backend="gloo")
    assert all(faults < 100 for faults in out.values()), out


def test_the_job_option_turns_it_off():
    from launcher.config import load
    from launcher.spec import RankSpec

    assert RankSpec.for_job(load(ROOT / "jobs/tiny.yaml", [])).keep_freed_memory is True
    off = load(ROOT / "jobs/tiny.yaml", ["distributed.keep_freed_memory=false"])
    assert RankSpec.for_job(off).keep_freed_memory is False
