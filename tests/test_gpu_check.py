"""`make gpu-check` (tests/gpu.py) on a machine without CUDA, and the part of its checks the CPU can run."""

import subprocess
import sys

import pytest
import torch

from tests import gpu
from tests.conftest import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the command runs every GPU check")
def test_without_cuda_the_gpu_check_says_so_and_passes():
    r = subprocess.run([sys.executable, "-m", "tests.gpu"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0 and "no CUDA device on this machine" in r.stdout, r.stdout + r.stderr


def test_the_resume_check_is_bit_exact_on_the_cpu(tmp_path):
    straight, resumed = gpu.tiny_resume(tmp_path, "auto")  # auto picks Gloo without CUDA
    assert straight["backend"] == "gloo" and straight["device"] == "cpu", straight
    assert straight["step"] == resumed["step"] == 12
    assert straight["weights"] == resumed["weights"], (straight, resumed)
