import pytest

from launcher import config, entry
from launcher.config import ConfigError

from .conftest import ROOT, run_cli


def write(tmp_path, text):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_tiny_job_loads_with_defaults():
    job = config.load(ROOT / "jobs/tiny.yaml")
    assert job.name == "tiny" and job.entry == "examples.tiny:main"
    assert job.distributed.nproc_per_node == 2 and job.distributed.backend == "gloo"
    assert job.checkpoint.resume == "auto"


def test_overrides_are_parsed_as_yaml(tmp_path):
    p = write(tmp_path, "name: a\nentry: m:f\n")
    job = config.load(p, ["data.num_workers=7", "distributed.timeout_s=1e-3", "args.width=[4, 8]",
                          "slurm.partition=gpu"])
    assert job.data.num_workers == 7 and job.distributed.timeout_s == 0.001
    assert job.args == {"width": [4, 8]} and job.slurm.partition == "gpu"


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        ("name: a\nentry: m:f\ndata:\n  num_worker: 3\n", [],
         ["unknown key 'data.num_worker'", "num_workers"]),
        (
            "name: a\nentry: m:f\nbogus: 1\n",
            [],
            ["unknown key 'bogus'", "valid keys of the job", "distributed"],
        ),
        ("name: a\nentry: m:f\ndata:\n  num_workers: two\n", [],
         ["data.num_workers", "expected int", "'two'"]),
        ("name: a\nentry: m:f\n", ["distributed.backend=mpi"], ["distributed.backend", "'gloo'"]),
        ("name: a\nentry: m:f\n", ["data.shuffle_buffer=true"], ["data.shuffle_buffer", "expected int"]),
        ("entry: m:f\n", [], ["missing required key name"]),
        ("name: a\nentry: nocolon\n", [], ["entry", "module:function"]),
        ("name: a\nentry: m:f\n", ["novalue"], ["key.path=value"]),
        ("- a\n- b\n", [], ["expected a mapping"]),
        ("name: [unclosed\n", [], ["not valid YAML"]),
    ],
)
def test_errors_name_file_key_and_fix(tmp_path, text, overrides, expected):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        config.load(p, overrides)
    msg = str(e.value)
    if "novalue" not in overrides:
        assert str(p) in msg
    for part in expected:
        assert part in msg


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["args.max_step=3"], ["unknown key 'args.max_step' in TinyArgs", "max_steps"]),
        (["args.epochs=two"], ["args.epochs", "expected int", "'two'"]),
        (["args.lr=[1]"], ["args.lr", "expected float"]),
    ],
)
def test_the_entry_declares_its_args_and_they_are_checked_like_the_jobs(overrides, expected):
    job = config.load(ROOT / "jobs/tiny.yaml", overrides)
    with pytest.raises(ConfigError) as e:
        entry.check_entry(job)
    for part in expected:
        assert part in str(e.value)


def test_the_entry_gets_its_args_as_the_declared_dataclass():
    from examples.tiny import TinyArgs, main

    job = config.load(ROOT / "jobs/tiny.yaml", ["args.lr=0.5"])
    args = entry.entry_args(main, job)
    assert isinstance(args, TinyArgs) and args.lr == 0.5 and args.max_steps == 40


def test_exact_resume_keys_are_declared_on_the_fields():
    job = config.load(ROOT / "jobs/tiny.yaml")
    exact = entry.resume_keys(job, "exact")
    assert {"seed", "distributed.nproc_per_node", "data.num_workers", "args.batch_size"} <= exact
    assert "args.lr" not in exact and "checkpoint.resume" in entry.resume_keys(job, "ignore")


def test_every_field_has_a_docstring():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(config))
    for node in tree.body:
        if (
            isinstance(node, ast.ClassDef)
            and node.name.endswith(("Config", "Job"))
            and node.name != "ConfigError"
        ):
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), (
                        f"{node.name}.{stmt.target.id} has no docstring"
                    )


@pytest.mark.slow  # starts a process that imports torch
def test_cli_reports_config_errors_without_traceback(tmp_path):
    p = write(tmp_path, "name: a\nentry: examples.tiny:main\nargs:\n  epochz: 1\n")
    r = run_cli("run", str(p), f"output_dir={tmp_path}")
    assert r.returncode == 2
    assert "unknown key 'args.epochz'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "a").exists()  # refused before the run directory was written


def test_cli_config_prints_resolved_job():
    r = run_cli("config", "jobs/tiny.yaml", "args.max_steps=3")
    assert r.returncode == 0, r.stderr
    data = __import__("yaml").safe_load(r.stdout)
    assert data["args"]["max_steps"] == 3 and data["name"] == "tiny"


def test_the_override_hint_names_a_key_that_exists():
    import re

    from launcher import config

    with pytest.raises(config.ConfigError) as e:
        config.parse_overrides(["max_steps"])
    example = re.search(r"HINT: e\.g\. (\S+)", str(e.value)).group(1)
    assert config.load(ROOT / "jobs" / "tiny.yaml", [example])  # the hinted key is a real one
