"""The Python blocks of the README and docs/ are tests (Sybil): each is saved as a file and run as users do.

A block runs as ``python block.py`` from the repository root, or under pytest when it defines ``test_``
functions. A block that is deliberately partial (a fragment of a loop) starts with ``# partial`` and is only
compiled. See ``tests/test_readme.py`` for the README's shell commands.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from sybil import Sybil
from sybil.parsers.markdown import CodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parent


def run_block(example) -> None:
    code = example.parsed
    if code.lstrip().startswith("# partial"):
        compile(code, f"{example.path}:{example.line}", "exec")
        return
    with tempfile.TemporaryDirectory(prefix="readme-") as tmp:
        name = "test_readme_block.py" if "def test_" in code else "readme_block.py"
        path = Path(tmp) / name
        path.write_text(code)
        cmd = [sys.executable, str(path)]
        if "def test_" in code:
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert r.returncode == 0, (
            f"README block at line {example.line} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


#: Modules whose every test starts the launcher, ranks, a cluster or network namespaces: the slow tier.
SLOW_MODULES = {
    "test_cli", "test_faults", "test_multinode", "test_slurm", "test_slurm_nodes", "test_script_mode",
    "test_readme", "test_classify", "test_recipes", "test_byo_loop", "test_spawn", "test_gpu_check",
    "test_checkpoint", "test_checkpoint_robustness", "test_syncbn", "test_forkserver", "test_data",
    "test_hostmem", "test_interrupt", "test_bad_input",
}
#: Tests of simulated clusters spend most of their time waiting on the scheduler's cycles and on timeouts:
#: ``make test`` runs them on two pytest-xdist workers (``--dist loadgroup``) beside the rest of the suite,
#: the machines made of network namespaces one after another in one group, the one-node SLURM cluster's tests
#: (those using ``slurm_env``) in another.
NAMESPACE_MODULES = {"test_slurm_nodes", "test_multinode"}
#: ``make quick`` (``-m "not slow"``) must stay under this many seconds.
QUICK_BOUND_S = 60.0
#: ``make test`` (the whole suite, two workers) must stay under this many seconds on 2 cores: with the
#: install of a fresh clone's .venv (1 to 1.5 minutes here), the 15 minutes of issue #31 (docs/development.md;
#: 11.3 to 12.2 minutes of tests measured on 2026-12-06).
SUITE_BOUND_S = 13.5 * 60


@pytest.hookimpl(tryfirst=True)  # before xdist's worker hook, which names groups from these marks
def pytest_collection_modifyitems(config, items) -> None:
    """The tiers: ``slow`` marks every test that starts processes (its module, a ``run_root`` or
    ``distributed`` fixture, a README/docs block); the rest is the quick tier, ``make quick``."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        block = item.path.suffix == ".md"
        if item.path.stem in SLOW_MODULES or block or fixtures & {"run_root", "distributed"}:
            item.add_marker(pytest.mark.slow)
        if item.path.stem in NAMESPACE_MODULES:
            item.add_marker(pytest.mark.xdist_group("namespaces"))
        elif "slurm_env" in fixtures:
            item.add_marker(pytest.mark.xdist_group("slurm"))


def pytest_xdist_node_collection_finished(node, ids) -> None:
    """``--dist loadgroup`` reads a test's group from its id alone (``...@namespaces``): without it, one
    cluster's tests would run on two workers at once. The namespace modules' ids show whether it worked."""
    if node.config.getvalue("dist") != "loadgroup":
        return
    ungrouped = [i for i in ids if Path(i.split("::")[0]).stem in NAMESPACE_MODULES and "@" not in i]
    if ungrouped:
        pytest.exit(f"xdist groups not applied: {ungrouped[0]} (pytest-xdist#1386 with pytest 9.2: see "
                    "the pin in pyproject.toml)", returncode=pytest.ExitCode.USAGE_ERROR)


def pytest_sessionstart(session) -> None:
    session.started_at = time.monotonic()


def pytest_sessionfinish(session, exitstatus) -> None:
    """The tiers' bounds are tests of their own: over one, the run fails and says what to do."""
    config = session.config
    took = time.monotonic() - getattr(session, "started_at", time.monotonic())
    if exitstatus != 0 or hasattr(config, "workerinput"):  # an xdist worker runs part of the suite
        return
    if config.getoption("markexpr") == "not slow" and took > QUICK_BOUND_S:
        print(f"\nFAILED the quick tier took {took:.0f} s, over its {QUICK_BOUND_S:.0f} s: mark the slowest "
              "tests slow (see --durations)")
        session.exitstatus = 1
    whole = not config.getoption("markexpr") and config.args_source == pytest.Config.ArgsSource.TESTPATHS
    if whole and took > SUITE_BOUND_S:
        print(f"\nFAILED the whole suite took {took:.0f} s, over its {SUITE_BOUND_S:.0f} s: see --durations "
              "for what grew (run as make test runs it: on two workers)")
        session.exitstatus = 1


pytest_collect_file = Sybil(
    parsers=[CodeBlockParser(language="python", evaluator=run_block), SkipParser()],
    patterns=["README.md", "docs/*.md"],
).pytest()
