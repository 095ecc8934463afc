"""SLURM across nodes: a 3-node cluster of network namespaces (``LAUNCHER_SLURM_NODES=3 slurm/cluster.sh``),
with a partition whose jobs preempt the default one's. The jobs use 2 nodes: a job requeued after losing one
runs on the other two. (With 2 nodes the requeued run started on the node that had just come back, and SLURM's
order to end the failed run's step there, same job and step id, killed the new run's tasks: seen in CI and
locally, also with the job held until the node was idle.)

Every client command runs "on node 1" (``cluster.sh on 1 ...``): the controller is reachable from the
namespaces only. The module brings the cluster up once and takes it down at the end, namespaces included.
"""

from __future__ import annotations

import datetime
import itertools
import os
import pickle
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests import nodes
from tests.conftest import ROOT, cluster_cannot_run, killable_env, launcher_cmd, wait_until

CLUSTER = ROOT / "slurm" / "cluster.sh"

pytestmark = [
    pytest.mark.skipif(bool(nodes.available()), reason=nodes.available() or "ok"),
]


class Cluster:
    def __init__(self, folder: Path) -> None:
        base = 18817 + 4 * (os.getpid() % 50)  # other tests' clusters use other ports, names and job ids
        self.env = {**os.environ, "LAUNCHER_SLURM_NODES": "3", "LAUNCHER_SLURM_DIR": str(folder),
                    "LAUNCHER_SLURM_PORT_BASE": str(base), "SLURM_CONF": str(folder / "etc" / "slurm.conf")}
        self.tag = f"lsl{base % 10000}"

    def script(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(CLUSTER), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def on(self, node: int, argv: list[str], env: dict[str, str] | None = None,
           **kw: Any) -> subprocess.Popen[str]:
        """``argv`` on ``node``, from the repository root."""
        return subprocess.Popen(["bash", str(CLUSTER), "on", str(node), *argv], cwd=ROOT,
                                env={**(env or self.env), **self.env}, text=True, start_new_session=True,
                                **kw)

    def run(self, node: int, argv: list[str]) -> str:
        p = self.on(node, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out = p.communicate(timeout=60)[0]
        assert p.returncode == 0, out
        return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("slurm2"))
    r = c.script("up", timeout=600)
    if r.returncode == 3:
        cluster_cannot_run(f"no 2-node SLURM cluster: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, f"cluster.sh up failed:\n{r.stderr}"
    yield c
    assert c.script("clean").returncode == 0
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert c.tag not in left, left  # no namespace (and so no process of the cluster) is left


def runs_of(c: Cluster, job_id: str) -> list[tuple[str, str, str]]:
    """``(state, start, end)`` of every run of the job (``sacct -D``: requeued runs too)."""
    out = c.run(1, ["sacct", "-j", job_id, "-X", "-n", "-P", "-D", "-o", "State,Start,End"])
    return [tuple(line.split("|")) for line in out.strip().splitlines()]  # type: ignore[misc]


def results(log_folder: Path, job_id: str) -> list[dict]:
    """Every rank's returned value, from submitit's result pickles."""
    out = []
    for path in sorted(log_folder.glob(f"{job_id}_*_result.pkl"), key=lambda p: int(p.name.split("_")[1])):
        status, value = pickle.loads(path.read_bytes())[:2]
        assert status == "success", (path, value)
        out.append(value)
    return out


def finish(c: Cluster, proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """``--wait``'s output once it returns; if it does not within ``timeout``, a failure that shows what SLURM
    and the ranks were doing (the test's own time limit would show only where the test waited)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            out, err = "", "(--wait's output pipes stayed open after it was killed)"
        ctld = (Path(c.env["LAUNCHER_SLURM_DIR"]) / "log" / "slurmctld.log").read_text().splitlines()[-30:]
        asked = (["squeue", "-o", "%i %P %T %r %N"], ["sinfo", "-N"],
                 ["sacct", "-X", "-P", "-D", "-o", "JobID,State,Start,End,NodeList"])
        seen = [c.run(1, argv) for argv in asked]
        pytest.fail(f"--wait still waiting after {timeout} s\n"
                    + "\n".join([*seen, *ctld, out[-3000:], err[-3000:]]))


def back_after_requeue(c: Cluster, job_id: str, back: str) -> None:
    """Node 2 lost: once SLURM has it down and the job's next run started on nodes 1 and 3, bring it back
    (``back``: node-up or link-up). Not sooner: a run started on node 2 just back had its tasks killed by
    SLURM's late order to end the failed run's step there (same job and step id; seen with 3 test workers)."""
    assert wait_until(lambda: node_state(c, 2).startswith("down"), 90), node_state(c, 2)
    assert wait_until(lambda: runs_of(c, job_id)[-1][0] == "PENDING", 30), runs_of(c, job_id)
    time.sleep(6)  # longer than --wait's 5 s between sacct calls: it sees the job pending again
    assert wait_until(lambda: runs_of(c, job_id)[-1][0] == "RUNNING", 60), runs_of(c, job_id)
    assert c.script(back, "2").returncode == 0


def cancel_all(c: Cluster) -> None:
    """No job left in the cluster: a failed test leaves the nodes to the next one."""
    c.on(1, ["scancel", "--user", "root"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait(30)


def submit_2x2(c: Cluster, tmp_path: Path, *overrides: str) -> subprocess.Popen[str]:
    """``launcher submit --wait`` on node 1 of the tiny job on 2 nodes x 2 ranks: 30 steps of 0.2 s, a
    checkpoint every 5, run directory ``tmp_path/runs``."""
    argv = launcher_cmd("submit", "jobs/tiny.yaml", f"output_dir={tmp_path / 'runs'}", "slurm.nodes=2",
                        "slurm.time_min=5", "args.max_steps=30", "args.epochs=100", "args.step_sleep=0.2",
                        "checkpoint.every_steps=5", "distributed.startup_timeout_s=60", *overrides, "--wait")
    return c.on(1, argv, env=killable_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def last_saved_step(runs: Path) -> int:
    """The step of the tiny job's latest checkpoint (0 before the first)."""
    latest = runs / "tiny" / "checkpoints" / "latest"
    found = re.search(r"step_(\d+)\.pt", latest.read_text()) if latest.exists() else None
    return int(found.group(1)) if found else 0


def rank0_log_of(runs: Path) -> str:
    """Rank 0's output so far, every run of the job (SLURM appends a requeued run's)."""
    return "".join(p.read_text() for p in (runs / "tiny" / "slurm_logs").glob("*_0_log.out"))


def test_a_two_node_job_preempted_twice_then_losing_a_node_resumes_each_time(cluster, tmp_path):
    """One job's life on 2 nodes x 2 ranks: preempted by the urgent partition with USR2 first
    (preempt_send_user_signal), then with SIGTERM first and a grace time; each time it saves at the step
    boundary, requeues itself although max_requeues is 0, and resumes from the saved step. Then every process
    of node 2 is killed: NODE_FAIL, SLURM requeues it, and once the node is back it resumes from its last
    checkpoint; ``--wait`` names the lost node, follows every run and reports the last: one model on all four
    ranks. (One job for all three: each start of a 2 x 2 job costs about 15 s here; a link cut is below.)"""
    runs, node2 = tmp_path / "runs", f"{cluster.tag}n2"
    saved_step, rank0_log = lambda: last_saved_step(runs), lambda: rank0_log_of(runs)

    def preempt(mode: str) -> None:
        cluster.run(1, ["sbatch", "-p", "urgent", "-N", "3", "--ntasks-per-node", "2", "-t", "1", "-o",
                        str(tmp_path / f"urgent-{mode}.out"), "--wrap", "sleep 1"])

    def trains_again(stops: int) -> None:
        """After the ``stops``-th stop: the requeued run resumed and wrote a checkpoint (its stop handlers are
        in place)."""
        assert wait_until(lambda: rank0_log().count("stop requested") == stops, 60), rank0_log()
        at = int(re.findall(r"stop requested at step (\d+)", rank0_log())[-1])
        assert wait_until(lambda: rank0_log().count("resumed from") == stops and saved_step() > at, 120), (
            rank0_log())

    assert cluster.script("preempt-signal", "user").returncode == 0
    proc = submit_2x2(cluster, tmp_path, "slurm.max_requeues=0", "args.max_steps=70")
    try:
        assert wait_until(lambda: saved_step() >= 5, 120), "no checkpoint"
        job_id = next((runs / "tiny" / "slurm_logs").glob("*_0_log.out")).name.split("_")[0]
        preempt("user")
        assert wait_until(lambda: "stop requested" in rank0_log(), 60), rank0_log()
        assert cluster.script("preempt-signal", "term").returncode == 0
        trains_again(1)
        preempt("term")
        trains_again(2)
        assert cluster.script("node-down", "2").returncode == 0
        back_after_requeue(cluster, job_id, "node-up")
        out, err = finish(cluster, proc, 150)
    except BaseException:
        cancel_all(cluster)
        raise
    finally:
        proc.kill()
        cluster.script("node-up", "2")
    assert proc.returncode == 0, out + err
    assert "SIGUSR2: preempted; state saved; requeued job" in err, err
    assert "SIGTERM: preempted; state saved; requeued job" in err, err
    assert re.search(rf"SLURM job {job_id} was requeued \(state \w+ -> PENDING\): run 3 ended NODE_FAIL, "
                     rf"lost node {node2} \(ranks 2-3\)", err), err
    assert err.count("ended NODE_FAIL") == 1, err  # a preemption is not told as a lost node
    stopped = [int(s) for s in re.findall(r"stop requested at step (\d+)", out)]
    resumed = [int(s) for s in re.findall(r"resumed from .*step_(\d+)\.pt", out)]
    assert len(stopped) == 2 and 5 <= stopped[0] < stopped[1] and resumed[:2] == stopped, out  # none lost
    assert len(resumed) == 3 and stopped[1] < resumed[2] < 70, out  # the last checkpoint before the loss
    ranks = results(runs / "tiny" / "slurm_logs", job_id)
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3] and {r["world_size"] for r in ranks} == {4}
    assert {r["step"] for r in ranks} == {70} and len({r["weights"] for r in ranks}) == 1
    # Never two copies of the job at once: each run ends before the next starts.
    assert wait_until(lambda: runs_of(cluster, job_id)[-1][0] == "COMPLETED", 60), runs_of(cluster, job_id)
    assert runs_of(cluster, job_id)[2][0] == "NODE_FAIL", runs_of(cluster, job_id)
    spans = [(datetime.datetime.fromisoformat(s), datetime.datetime.fromisoformat(e))
             for _, s, e in runs_of(cluster, job_id)]
    overlap = [(a, b) for a, b in itertools.pairwise(spans) if a[1] > b[0]]
    assert len(spans) == 4 and not overlap, runs_of(cluster, job_id)


def node_state(c: Cluster, node: int) -> str:
    return c.run(1, ["sinfo", "-h", "-n", f"{c.tag}n{node}", "-o", "%t"]).strip()


def rank_pids(c: Cluster, node: int) -> list[str]:
    """The job's processes on ``node`` (``"PID ARGV"``): its ranks (submitit's task program), their DataLoader
    workers and helpers; not SLURM's daemons, not ``launcher submit --wait``."""
    pids = subprocess.run(["ip", "netns", "pids", f"{c.tag}n{node}"], capture_output=True, text=True,
                          check=False).stdout.split()
    ours = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        python = Path(argv.split(b"\0")[0].decode(errors="replace")).name.startswith("python")
        # (srun's argv names submitit's program too)
        if python and (b"submitit.core._submit" in argv or b"multiprocessing" in argv):
            ours.append(f"{pid} " + argv.replace(b"\0", b" ").decode(errors="replace")[:100])
    return ours


def test_a_lost_node_requeues_the_job_and_wait_follows_it_to_the_end(cluster, tmp_path):
    """Node 2's link cut mid-run: the ranks on both sides give up within ``distributed.timeout_s`` + 10 s
    (none waits forever for a peer); SLURM marks the node down, the job NODE_FAIL, and requeues it; once the
    node is back the job resumes from its last checkpoint; ``--wait`` names the lost node and reports the
    requeued run. (A node whose processes are all killed: the test above.)"""
    timeout_s, runs, node2 = 10, tmp_path / "runs", f"{cluster.tag}n2"
    proc = submit_2x2(cluster, tmp_path, "args.max_steps=40", f"distributed.timeout_s={timeout_s}")
    ends: dict[int, float] = {}
    late: dict[int, list[str]] = {}  # what still ran on a node timeout_s + 10 s after the cut
    try:
        assert wait_until(lambda: last_saved_step(runs) >= 5, 120), "no checkpoint"
        job_id = next((runs / "tiny" / "slurm_logs").glob("*_0_log.out")).name.split("_")[0]
        assert rank_pids(cluster, 1) and rank_pids(cluster, 2)
        cut_at = time.monotonic()
        assert cluster.script("link-cut", "2").returncode == 0

        def gone() -> bool:
            for node in (1, 2):
                left = rank_pids(cluster, node)
                if node not in ends and not left:
                    ends[node] = time.monotonic() - cut_at
                elif left and time.monotonic() - cut_at > timeout_s + 10:
                    late.setdefault(node, left)
            return len(ends) == 2

        assert wait_until(gone, timeout_s + 30, interval=0.2), (ends, [rank_pids(cluster, n) for n in (1, 2)])
        back_after_requeue(cluster, job_id, "link-up")
        out, err = finish(cluster, proc, 120)
    except BaseException:
        cancel_all(cluster)
        raise
    finally:
        proc.kill()
        cluster.script("link-up", "2")
    assert proc.returncode == 0, out + err
    # seconds from the cut to each side's last rank gone
    print(f"link cut: last rank gone after {ends[1]:.1f} s on node 1, {ends[2]:.1f} s on node 2 (cut off)")
    assert max(ends.values()) < timeout_s + 10, (ends, late, rank0_log_of(runs)[-3000:])
    lost = re.findall(rf"SLURM job {job_id} was requeued \(state \w+ -> PENDING\): run (\d) ended NODE_FAIL, "
                      rf"lost node {node2} \(ranks 2-3\)", err)
    assert lost == ["1"], err
    resumed = [int(s) for s in re.findall(r"resumed from .*step_(\d+)\.pt", out)]
    assert len(resumed) == 1 and 5 <= resumed[0] < 40, out
    assert f"SLURM job {job_id} finished on 4 rank(s)" in out and "'step': 40" in out, out
    assert wait_until(lambda: runs_of(cluster, job_id)[-1][0] == "COMPLETED", 60), runs_of(cluster, job_id)
    assert [state for state, _, _ in runs_of(cluster, job_id)] == ["NODE_FAIL", "COMPLETED"]
    # nothing of the job is left on either node (the cut-off node's SLURM step is SLURM's to end)
    assert wait_until(lambda: not any(rank_pids(cluster, n) for n in (1, 2, 3)), 30), (
        [rank_pids(cluster, n) for n in (1, 2, 3)])
