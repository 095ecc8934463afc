"""Every shell command of the README's Quick tour, Coming from torchrun, Examples and laptop-to-cluster
walkthrough runs here as written, through the installed console script, bounded with appended overrides, or
names the test that runs it already (the same command with bounds: not run twice).

``COMMANDS`` maps each command, exactly as the README spells it, to how the test bounds it. A command added to
those sections without an entry here fails ``test_every_readme_command_is_covered``. (The README's Python
blocks are run by Sybil, see ``conftest.py`` at the repository root.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .conftest import ROOT

SECTIONS = ("## Quick tour", "## Coming from torchrun", "## Coming from accelerate / Fabric",
            "## DDP to FSDP: one key", "## Examples", "### From a laptop to a cluster")
BIN = Path(sys.executable).parent
TINY = ["args.max_steps=4"]
CLASSIFY = ["args.max_steps=2", "args.epochs=1", "data.num_workers=0", "args.data_dir={data}"]

#: README command -> (overrides appended, or None to run as written; where to run it). ``{tmp}``, ``{data}``
#: are filled in. Commands that need a SLURM cluster name the test that runs them there.
COMMANDS: dict[str, tuple[list[str] | None, str] | str] = {
    "launcher run jobs/tiny.yaml":
        "tests/test_cli.py::test_the_tiny_job_runs_on_two_ranks_shows_progress_and_run_again_says_so",
    "launcher run jobs/tiny.yaml args.epochs=4": (TINY, "root"),
    "launcher config jobs/classify.yaml args.lr=0.05": ([], "root"),
    "launcher run --nproc-per-node 2 examples/ddp_tutorial.py 4 1 --snapshot_path runs/snapshot.pt":
        (None, "scripts"),
    "torchrun --standalone --nproc-per-node 2 -m launcher run jobs/tiny.yaml name=tiny-torchrun":
        "tests/test_cli.py::test_torchrun_runs_the_same_job_in_place",
    "python -m launcher run jobs/tiny.yaml name=tiny-module": (TINY, "root"),
    "launcher run jobs/classify.yaml distributed.nproc_per_node=8 args.model=resnet18":
        ([*CLASSIFY, "args.max_steps=1", "args.batch_size=2", "distributed.startup_timeout_s=120"], "root"),
    "srun --ntasks-per-node 4 launcher run jobs/tiny.yaml":
        "tests/test_slurm.py::test_srun_launcher_run_inside_an_allocation",
    "torchrun --standalone --nproc-per-node 2 train.py 10 5 --batch_size 32":
        "tests/test_script_mode.py::test_the_script_runs_unchanged_and_trains_as_under_torchrun",
    "launcher run --nproc-per-node 2 train.py 10 5 --batch_size 32":
        "tests/test_script_mode.py::test_the_script_runs_unchanged_and_trains_as_under_torchrun",
    "launcher run --nproc-per-node 2 -m mypkg.train 10 5": (None, "scripts"),
    "launcher run --nproc-per-node 2 --log-line-prefix-template '' tests/scripts/result_json.py "
    "2>/dev/null | tail -1": (None, "root"),
    "launcher run --nproc-per-node 2 examples/accelerate_loop.py":
        "tests/test_real_scripts.py::test_loops_written_for_accelerate_and_fabric_run_unchanged",
    "launcher run --nproc-per-node 2 examples/fabric_loop.py":
        "tests/test_real_scripts.py::test_loops_written_for_accelerate_and_fabric_run_unchanged",
    "launcher run jobs/tiny.yaml distributed.strategy=fsdp":
        "tests/test_fsdp.py::test_fsdp_resumes_bit_exactly_and_ends_where_ddp_ends",
    "launcher run jobs/classify.yaml distributed.strategy=fsdp": (CLASSIFY, "root"),
    "launcher consolidate runs/tiny/checkpoints tiny.pt":
        "tests/test_fsdp.py::test_fsdp_resumes_bit_exactly_and_ends_where_ddp_ends",
    "python -m launcher.tools.tarshards ~/data/cifar10 data/cifar10 --format cifar10": (None, "home"),
    "python -m launcher.tools.tarshards ~/data/flowers data/flowers --val-fraction 0.1": (None, "home"),
    "launcher run jobs/classify.yaml args.data_dir=data/cifar10": ([*CLASSIFY[:3]], "home"),
    "launcher run jobs/classify.yaml": (CLASSIFY, "root"),
    "torchrun --nproc-per-node 8 -m launcher run jobs/classify.yaml":
        ([*CLASSIFY, "args.batch_size=2", "distributed.startup_timeout_s=120"], "root"),
    "torchrun --standalone --nproc-per-node 2 examples/byo_loop.py":
        (["--steps", "6", "--out", "{tmp}/byo"], "root"),
    "launcher submit jobs/classify.yaml slurm.partition=gpu slurm.nodes=2 slurm.gpus_per_node=8":
        "tests/test_slurm.py::test_submit_wait_trains_on_two_tasks",
    "launcher run --nnodes 2 --rdzv-endpoint node01:29400 jobs/tiny.yaml":
        "tests/test_multinode.py::test_two_machines_of_two_ranks_train_one_model",
    "torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint node01:29400 -m launcher run "
    "jobs/tiny.yaml": "tests/test_multinode.py::test_torchrun_across_machines_runs_the_launcher_as_its_ranks",
}


def readme_commands() -> list[str]:
    """The shell commands of the tested sections: bash blocks' lines and inline `launcher`/`torchrun` code."""
    text = (ROOT / "README.md").read_text()
    out: list[str] = []
    for title in SECTIONS:
        section = text.split(title, 1)[1].split("\n## ", 1)[0]
        if title.startswith("###"):
            section = section.split("\n### ", 1)[0]
        for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL):
            for line in block.splitlines():
                cmd = re.sub(r"(^|\s)#.*$", "", line).strip()
                if cmd:
                    out.append(cmd)
        prose = re.sub(r"```.*?```", "", section, flags=re.DOTALL)
        out += [c for c in re.findall(r"`((?:launcher|torchrun|srun) [^`]+)`", prose.replace("\n   ", " "))
                if len(c.split()) > 2 and (".yaml" in c or ".py" in c)]
    return list(dict.fromkeys(" ".join(c.split()) for c in out))


def test_every_readme_command_is_covered():
    missing = [c for c in readme_commands() if c not in COMMANDS]
    assert not missing, f"README commands without a test here: {missing}"
    stale = [c for c in COMMANDS if c not in readme_commands()]
    assert not stale, f"tested commands no longer in the README: {stale}"


def test_the_readme_lists_exactly_what_import_launcher_gives():
    import launcher

    text = (ROOT / "docs" / "api.md").read_text()
    listed = text.split("`import launcher` gives everything a loop needs", 1)[1].split("\n\n", 1)[0]
    names = set(re.findall(r"`([A-Za-z_]+)`", listed)) - {"__all__"}
    assert names == set(launcher.__all__)
    text += (ROOT / "README.md").read_text()
    used = set(re.findall(r"\blauncher\.([A-Za-z_]+)\(", text))  # every launcher.name(...) the docs call
    assert used <= set(launcher.__all__), used - set(launcher.__all__)
    for name in launcher.__all__:
        getattr(launcher, name)


def test_slurm_commands_name_an_existing_test():
    for how in COMMANDS.values():
        if isinstance(how, str):
            path, _, name = how.partition("::")
            assert f"def {name}(" in (ROOT / path).read_text(), how


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from examples.shapes import generate

    return generate(tmp_path_factory.mktemp("shapes"), train=128, val=32, per_shard=32)


def _home(tmp: Path) -> Path:
    """A home folder with the README's ~/data/cifar10 (a fake CIFAR-10 copy) and ~/data/flowers."""
    from PIL import Image

    from .test_tarshards import fake_cifar10

    home = tmp / "home"
    fake_cifar10(home / "data" / "cifar10", per_batch=16)
    for cls in ("daisy", "rose"):
        (home / "data" / "flowers" / cls).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (8, 8), "red").save(home / "data" / "flowers" / cls / f"{i}.png")
    for folder in ("jobs", "examples"):
        shutil.copytree(ROOT / folder, home / folder)
    # The fake copy cannot match torchvision's checksums of the real files: the converter's process skips the
    # check, as tests/test_tarshards.py does in-process.
    (tmp / "site").mkdir()
    (tmp / "site" / "sitecustomize.py").write_text(
        "import torchvision.datasets.cifar as c\nc.check_integrity = lambda *a, **k: True\n"
        "c.CIFAR10._check_integrity = lambda self: True\n")
    return home


def _scripts(tmp: Path) -> Path:
    """A folder holding the user's train.py and mypkg/train.py (the DDP-tutorial-style test script)."""
    where = tmp / "scripts"
    (where / "mypkg").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "ddp_tutorial.py", where / "train.py")
    shutil.copy(ROOT / "examples" / "ddp_tutorial.py", where / "mypkg" / "train.py")
    (where / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "ddp_tutorial.py", where / "examples" / "ddp_tutorial.py")
    (where / "mypkg" / "__init__.py").write_text("")
    return where


RUNNABLE = [c for c, how in COMMANDS.items() if not isinstance(how, str)]


@pytest.mark.parametrize("command", RUNNABLE)
def test_readme_command_runs_as_written(command, tmp_path, shapes, monkeypatch, request):
    if command.startswith("python -m launcher.tools.tarshards ~/data/cifar10"):
        pytest.importorskip("torchvision")
    overrides, where = COMMANDS[command]  # type: ignore[misc]
    # torchrun's log folders, multiprocessing's sockets: in a folder of the test's own, with a short path (a
    # socket's path has at most 107 bytes; pytest's folder names for this test grow with its index)
    tmp = Path(tempfile.mkdtemp(prefix="rd-"))
    request.addfinalizer(lambda: shutil.rmtree(tmp, ignore_errors=True))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "TMPDIR": str(tmp)}
    cwd = ROOT
    if where == "home":
        cwd = env["HOME"] = str(_home(tmp_path))
        env["PYTHONPATH"] = f"{tmp_path / 'site'}{os.pathsep}{ROOT}"
        if "classify" in command:  # the README converts the data first; so does the test
            for line in COMMANDS:
                if line.startswith("python -m launcher.tools.tarshards ~/data/cifar10"):
                    subprocess.run(["bash", "-c", line], cwd=cwd, env=env, check=True, capture_output=True)
    elif where == "scripts":
        cwd = _scripts(tmp_path)
    line = command
    if overrides is not None:
        job = ".yaml" in command and not command.startswith("launcher config")
        extra = [o.format(tmp=tmp_path, data=shapes)
                 for o in [f"output_dir={tmp_path}/runs"] * job + overrides]
        line = f"{command} {' '.join(extra)}"
    r = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
                       check=False)
    assert r.returncode == 0, f"$ {line}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    out = r.stdout + r.stderr
    if "result_json" in command:  # the output a sweep runner reads: the result line alone
        assert r.stdout == '{"result": 0.5}\n', r.stdout
    if command.startswith(("launcher run jobs", "python -m launcher run")):
        assert "finished on" in out, out[-2000:]
    if "train.py" in command or "mypkg" in command or "ddp_tutorial" in command:
        assert "RESULT rank=0 world=2" in out, out[-2000:]
    if "tarshards" in command:
        assert "wrote" in out and "/val" in out, out
    if command.startswith("launcher config"):
        assert "lr: 0.05" in r.stdout
