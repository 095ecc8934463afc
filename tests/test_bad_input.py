"""Bad input is refused before anything starts: exit 2, the key named, a HINT, no traceback, nothing
written."""

from __future__ import annotations

import os
import subprocess

import pytest

from .conftest import ROOT, launcher_cmd

BOMB = "name: a\nentry: examples.tiny:main\nx:\n  a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"  {c}: &{c} [{', '.join([f'*{chr(ord(c) - 1)}'] * 9)}]\n" for c in "bcdefghi")

CASES = [
    # (job file text or None for jobs/tiny.yaml, extra arguments, what the message must name)
    (None, ["distributed.nproc_per_node=0"], "distributed.nproc_per_node"),
    (None, ["distributed.nproc_per_node=-1"], "distributed.nproc_per_node"),
    (None, ["args.batch_size=0"], "args.batch_size"),
    (None, ["args.batch_size=-4"], "args.batch_size"),
    (None, ["data.num_workers=-1"], "data.num_workers"),
    (None, ["distributed.timeout_s=-1"], "distributed.timeout_s"),
    (None, ["distributed.timeout_s=0"], "distributed.timeout_s"),
    (None, ["checkpoint.resume=/nonexistent/step_00000001.pt"], "checkpoint.resume"),
    (None, ["entry=launcher:__version__"], "not callable"),
    (None, ["entry=nosuch_module:main"], "no module named 'nosuch_module'"),
    (None, ["entry=examples.tiny:nosuch"], "has no attribute 'nosuch'"),
    (None, ["distributed.max_restarts=-1"], "distributed.max_restarts"),
    (None, ["checkpoint.keep_last=0"], "checkpoint.keep_last"),
    (None, ["checkpoint.keep_last=-1"], "checkpoint.keep_last"),
    (None, ["args.max_steps=-5"], "args.max_steps"),
    (None, ["args.lr=.nan"], "args.lr"),
    (None, ["checkpoint.every_steps=-1"], "checkpoint.every_steps"),
    (None, ["args.epochz=1"], "unknown key 'args.epochz'"),
    ("name: a\nentry: examples.tiny:main\ndata: {num_workers: 1}\ndata: {shuffle_buffer: 2}\n", [],
     "key 'data' is given twice"),
    (BOMB, [], "YAML aliases"),
    ("name: a\nentry: examples.tiny:main\n# " + "x" * (2 << 20) + "\n", [], "larger than 1 MiB"),
    (b"\xff\xfe" + os.urandom(4094), [], "not UTF-8"),
    ("name: a\nentry: examples.tiny:main\nx: " + "[" * 5000 + "]" * 5000 + "\n", [], "nested too deeply"),
    # names that would put the run directory outside output_dir, or nowhere
    (None, ["name=../x"], "name: '../x' holds a '/'"),
    (None, ["name=.."], "name: '..' would be output_dir itself"),
    (None, ["name=/tmp/launcher-abs"], "holds a '/'"),
    (None, ["name="], "name: '' is empty"),
    (None, ["name=" + "a" * 300], "is 300 bytes long"),
    ('name: "a\\0b"\nentry: examples.tiny:main\n', [], "control character"),
    (None, ["output_dir=/proc/launcher-x"], "output_dir: /proc/launcher-x is under /proc"),
    # YAML's null where a string is needed: what the value was is said
    (None, ["name= "], "name: expected str, got null (YAML reads an empty value, ~ and null as null)"),
    (None, ["name=~"], "name: expected str, got null"),
    (None, ["args." + "a." * 20000 + "a=1"], "the key is nested 20002 levels deep; at most 32"),
]


def _run(tmp_path, text, extra):
    job = ROOT / "jobs" / "tiny.yaml"
    if text is not None:
        job = tmp_path / "job.yaml"
        job.write_bytes(text if isinstance(text, bytes) else text.encode())
    return subprocess.run(launcher_cmd("run", str(job), f"output_dir={tmp_path / 'runs'}", *extra), cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("text, extra, named", CASES, ids=[c[2][:40] + str(i) for i, c in enumerate(CASES)])
def test_bad_job_is_refused_before_anything_starts(tmp_path, text, extra, named):
    r = _run(tmp_path, text, extra)
    assert r.returncode == 2, r.stdout + r.stderr
    assert named in r.stderr and "HINT" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists()  # no run directory, no rank started
    assert {p.name for p in tmp_path.iterdir()} <= {"job.yaml"}  # nothing beside it either (name=../x)
    assert not os.path.exists("/tmp/launcher-abs")
    assert "starting" not in r.stdout + r.stderr


@pytest.mark.parametrize("what", ["a FIFO job file", "output_dir a file", "run directory a file"])
def test_what_is_in_the_way_on_disk_is_named_and_nothing_hangs(tmp_path, what):
    job, output_dir = "jobs/tiny.yaml", tmp_path / "runs"
    if what == "a FIFO job file":
        job = str(tmp_path / "job.yaml")
        os.mkfifo(job)  # open() would wait for a writer forever
        named = "job.yaml: cannot read the job file (a FIFO, not a plain file)"
    elif what == "output_dir a file":
        output_dir.write_text("mine")
        named = f"output_dir: {output_dir} is a file, not a folder"
    else:
        output_dir.mkdir()
        (output_dir / "tiny").write_text("mine")
        named = f"the run directory: {output_dir / 'tiny'} is a file"
    r = subprocess.run(launcher_cmd("run", job, f"output_dir={output_dir}"), cwd=ROOT, capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 2 and named in r.stderr and "HINT" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not output_dir.is_dir() or [p.name for p in output_dir.iterdir()] == ["tiny"]


@pytest.mark.parametrize("argv, named", [
    (["nosuch.py", "1"], "does not exist"),
    (["-m", "nosuch_pkg.train", "1"], "no module named 'nosuch_pkg.train'"),
])
def test_missing_script_or_module_is_refused(tmp_path, argv, named):
    r = subprocess.run(launcher_cmd("run", "--nproc-per-node", "2", *argv), cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 2 and named in r.stderr and "HINT" in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv, named", [
    (["--rdzv-backend", "static", "x.py"], "--rdzv-backend static"),
    (["--nnodes", "2", "--master-addr", "10.0.0.1", "x.py"], "--master-addr and --master-port go together"),
    (["--standalone", "--nnodes", "2", "--rdzv-endpoint", "h:1", "x.py"], "--standalone runs on this one"),
    (["--nproc-per-node", "many", "x.py"], "--nproc-per-node many"),
])
def test_torchrun_options_that_cannot_work_are_refused(tmp_path, argv, named):
    (tmp_path / "x.py").write_text("print('ran')\n")
    r = subprocess.run(launcher_cmd("run", *argv), cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 2 and named in r.stderr and "HINT" in r.stderr, r.stderr
    assert "ran" not in r.stdout and not (tmp_path / "runs").exists()


def test_options_and_overrides_go_anywhere_after_the_job_file(tmp_path):
    r = subprocess.run(launcher_cmd("config", "jobs/tiny.yaml", "args.lr=0.3"), cwd=ROOT, capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0 and "lr: 0.3" in r.stdout, r.stderr
    from launcher.cli import load_run_job, parse_args

    job = load_run_job(parse_args(["run", "jobs/tiny.yaml", "args.lr=0.2", "--nproc-per-node", "3",
                                   "--name", "b", "args.epochs=5"]))
    assert (job.args["lr"], job.args["epochs"], job.distributed.nproc_per_node, job.name) == (0.2, 5, 3, "b")
    assert parse_args(["submit", "jobs/tiny.yaml", "--wait", "args.lr=0.2"]).overrides == ["args.lr=0.2"]


def test_submit_without_a_controller_is_refused(tmp_path):
    env = {**os.environ, "SLURM_CONF": str(tmp_path / "no-such-slurm.conf"), "PATH": os.environ["PATH"]}
    r = subprocess.run(launcher_cmd("submit", "jobs/tiny.yaml", f"output_dir={tmp_path}"), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "cannot submit" in r.stderr and "HINT" in r.stderr and "Traceback" not in r.stderr
    assert "no-such-slurm.conf does not exist" in r.stderr  # at once, not after scontrol's DNS search
