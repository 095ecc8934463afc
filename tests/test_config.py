import pytest

from launcher import config
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
    job = config.load(p, ["train.max_steps=7", "train.lr=1e-3", "args.width=[4, 8]", "slurm.partition=gpu"])
    assert job.train.max_steps == 7 and job.train.lr == 0.001
    assert job.args == {"width": [4, 8]} and job.slurm.partition == "gpu"


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        ("name: a\nentry: m:f\ntrain:\n  max_step: 3\n", [], ["unknown key 'train.max_step'", "max_steps"]),
        (
            "name: a\nentry: m:f\nbogus: 1\n",
            [],
            ["unknown key 'bogus'", "valid keys of the job", "distributed"],
        ),
        ("name: a\nentry: m:f\ntrain:\n  epochs: two\n", [], ["train.epochs", "expected int", "'two'"]),
        ("name: a\nentry: m:f\n", ["distributed.backend=mpi"], ["distributed.backend", "'gloo'"]),
        ("name: a\nentry: m:f\n", ["train.batch_size=true"], ["train.batch_size", "expected int"]),
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


def test_cli_reports_config_errors_without_traceback(tmp_path):
    p = write(tmp_path, "name: a\nentry: m:f\ntrain:\n  epochz: 1\n")
    r = run_cli("run", str(p))
    assert r.returncode == 2
    assert "unknown key 'train.epochz'" in r.stderr and "Traceback" not in r.stderr


def test_cli_config_prints_resolved_job():
    r = run_cli("config", "jobs/tiny.yaml", "train.max_steps=3")
    assert r.returncode == 0, r.stderr
    data = __import__("yaml").safe_load(r.stdout)
    assert data["train"]["max_steps"] == 3 and data["name"] == "tiny"
