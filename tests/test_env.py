import pytest

from launcher import env


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("node1", "node1"),
        ("node[3-5,7]", "node3"),
        ("gpu[003-005],cpu1", "gpu003"),
        ("a1,b[2-3]", "a1"),
        ("rack1-node[10,12]", "rack1-node10"),
    ],
)
def test_slurm_first_host(nodelist, first):
    assert env.slurm_first_host(nodelist) == first


def test_slurm_port_is_derived_from_job_id():
    assert env.slurm_port("123456") == env.slurm_port("123456")
    assert env.slurm_port("123456") != env.slurm_port("123457")
    assert all(15000 <= env.slurm_port(str(j)) < 25000 for j in range(0, 100000, 997))


def test_detection_order(monkeypatch):
    for k in ("TORCHELASTIC_RUN_ID", "RANK", "SLURM_PROCID", "SLURM_STEP_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    assert isinstance(env.detect(), env.LocalEnvironment) and env.detect().spawns_here()
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[7-8]")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    e = env.detect()
    assert isinstance(e, env.SlurmEnvironment) and not e.spawns_here()
    assert (e.rank(), e.world_size(), e.local_rank()) == (1, 4, 1)
    assert e.master_addr() == "n7" and e.master_port() == env.slurm_port("42")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("RANK", "0")
    assert isinstance(env.detect(), env.TorchElasticEnvironment)


def test_salloc_shell_is_not_a_rank(monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert isinstance(env.detect(), env.LocalEnvironment)
