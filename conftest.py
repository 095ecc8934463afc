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
from pathlib import Path

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


pytest_collect_file = Sybil(
    parsers=[CodeBlockParser(language="python", evaluator=run_block), SkipParser()],
    patterns=["README.md", "docs/*.md"],
).pytest()
