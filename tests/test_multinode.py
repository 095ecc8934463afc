"""`launcher run` across machines: network namespaces with their own addresses and hostnames stand for nodes.

Every machine runs the same command; they meet at the first one's address (torch elastic's c10d rendezvous).
"""

import ast
import re

import pytest

from tests import nodes
from tests.conftest import ROOT, cmdline, killable_env, launcher_cmd

pytestmark = [
    pytest.mark.skipif(bool(nodes.available()), reason=nodes.available() or "ok"),
]


def returned(out: str) -> tuple[str, dict]:
    """``(ranks, value)`` from the launcher's "finished on ... rank(s) A-B; rank A returned {...}" line."""
    m = re.search(r"finished on 2 rank\(s\) (\d-\d); rank \d returned (\{.*\})", out)
    assert m, out
    return m.group(1), ast.literal_eval(m.group(2))


def test_two_machines_of_two_ranks_train_one_model(tmp_path):
    with nodes.Nodes(2) as machines:
        endpoint = f"{machines.addresses[0]}:29400"
        # the README's command: launcher run --nnodes 2 --rdzv-endpoint node01:29400 jobs/tiny.yaml
        argv = launcher_cmd("run", "--nnodes", "2", "--rdzv-endpoint", endpoint, "jobs/tiny.yaml",
                            f"output_dir={tmp_path / 'runs'}", "args.max_steps=8")
        procs = [machines.popen(i, argv, cwd=ROOT, env=killable_env(tmp_path), stdout=-1, stderr=-2)
                 for i in range(2)]
        outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    spans = dict(returned(o) for o in outs)
    assert set(spans) == {"0-1", "2-3"}, outs  # global ranks split over the machines
    a, b = spans["0-1"], spans["2-3"]
    assert a["world_size"] == b["world_size"] == 4 and a["step"] == b["step"] == 8
    assert a["weights"] == b["weights"]  # one model on all four ranks


def test_torchrun_across_machines_runs_the_launcher_as_its_ranks(tmp_path):
    import shutil
    import sys

    torchrun = (shutil.which("torchrun", path=str(ROOT / ".venv" / "bin"))
                or f"{sys.executable} -m torch.distributed.run")
    with nodes.Nodes(2) as machines:
        hosts = machines.hosts_file(tmp_path)  # torchrun needs the machines' names to resolve
        argv = [*torchrun.split(), "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"{machines.names[0]}:29400", "-m", "launcher", "run", "jobs/tiny.yaml",
                f"output_dir={tmp_path / 'runs'}", "args.max_steps=8"]
        env = {**killable_env(tmp_path), "TORCHELASTIC_ERROR_FILE": ""}
        procs = [machines.popen(i, argv, hosts=hosts, cwd=ROOT, env=env, stdout=-1, stderr=-2)
                 for i in range(2)]
        outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    from launcher import load_checkpoint

    state = load_checkpoint(tmp_path / "runs" / "tiny" / "checkpoints")  # written by global rank 0
    assert state["step"] == 8 and state["world_size"] == 4 and len(state["ranks"]) == 4


def _start(machines, tmp_path, *overrides, until_step):
    """Start the tiny job on both machines (output collected in threads); return once rank 0 logged
    ``until_step``: ``(argv, processes, outputs)``. Without DataLoader workers: each rank's worker server
    imports torch once more, about 5 s of each start on 2 cores, and these tests are about the machines
    (``test_two_machines_of_two_ranks_train_one_model`` runs the job with its workers)."""
    import threading
    import time

    argv = launcher_cmd("run", "jobs/tiny.yaml", f"output_dir={tmp_path / 'runs'}", "args.epochs=100000",
                        "args.log_every=1", "args.step_sleep=0.05", "data.num_workers=0",
                        "distributed.nnodes=2", f"distributed.rdzv_endpoint={machines.addresses[0]}:29400",
                        *overrides)
    procs = [machines.popen(i, argv, cwd=ROOT, env=killable_env(tmp_path), stdout=-1, stderr=-2)
             for i in range(2)]
    outs = [[], []]
    for i, p in enumerate(procs):
        threading.Thread(target=lambda i=i, p=p: outs[i].extend(p.stdout), daemon=True).start()
    deadline = time.monotonic() + 60
    while not any(f"step {until_step} " in line for line in outs[0]):
        assert time.monotonic() < deadline and procs[0].poll() is None, "".join(outs[0])
        time.sleep(0.05)
    return argv, procs, outs


@pytest.mark.parametrize("how", ["killed", "cut off"])
def test_a_lost_machine_ends_the_job_on_both_sides_within_the_timeout(tmp_path, how):
    import time

    timeout_s = 10
    with nodes.Nodes(2) as machines:
        _, procs, outs = _start(machines, tmp_path, "args.max_steps=100000", "checkpoint.every_steps=0",
                                f"distributed.timeout_s={timeout_s}", until_step=10)
        lost_at = time.monotonic()
        if how == "killed":
            machines.kill(1)
        else:
            machines.cut(1)
        ended = {}
        for i, p in enumerate(procs):
            p.wait(timeout=timeout_s + 60)
            ended[i] = time.monotonic() - lost_at
        time.sleep(1)
        left = {i: [f"{pid}: {cmdline(pid)[:200]}" for pid in machines.pids(i)] for i in range(2)}
    survivor = "".join(outs[0])
    assert procs[0].returncode == 1 and ended[0] < timeout_s + 10, (ended, survivor)
    assert "lost machine 1 (" in survivor and "ranks 2-3)" in survivor, survivor
    if how == "cut off":  # the cut-off machine's launcher gives up too, instead of waiting forever
        cut_off = "".join(outs[1])
        assert procs[1].returncode == 1 and ended[1] < timeout_s + 10, (ended, cut_off)
        assert "rendezvous (" in cut_off and "does not answer" in cut_off, cut_off
        # nor a temp folder of multiprocessing's (the watchdog ends the launcher with os._exit)
        assert not list((tmp_path / "tmp").glob("pymp-*")), list((tmp_path / "tmp").iterdir())
    assert left == {0: [], 1: []}  # no process of ours left on either machine


def test_a_machine_that_comes_back_is_rejoined_and_the_job_resumes_from_its_checkpoint(tmp_path):
    with nodes.Nodes(2) as machines:
        argv, (first, second), (out, _) = _start(
            machines, tmp_path, "args.max_steps=40", "checkpoint.every_steps=5", "distributed.max_restarts=1",
            until_step=12)
        machines.kill(1)
        second.wait()
        back = machines.popen(1, argv, cwd=ROOT, env=killable_env(tmp_path), stdout=-1, stderr=-2)
        back_out = back.communicate(timeout=180)[0]
        first.wait(timeout=60)
    survivor = "".join(out)
    assert first.returncode == 0 and back.returncode == 0, (survivor, back_out)
    assert re.search(r"resumed from .*step_000000(05|10)\.pt \(step (5|10),", survivor), survivor
    a, b = returned(survivor)[1], returned(back_out)[1]
    assert a["step"] == b["step"] == 40 and a["weights"] == b["weights"]
