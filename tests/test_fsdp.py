"""FSDP2 (``distributed.strategy: fsdp``) on CPU/Gloo: the same numbers as one process and as DDP, models
built on the meta device, sharded checkpoints that resume exactly, at another world size, and across
strategies; torch's traps each guarded."""

import json
import os
import pickle
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import examples.tiny
import launcher
from launcher.checkpoint import Checkpointer, CheckpointError, TrainState, load_checkpoint
from launcher.testing import run_distributed

from .conftest import ROOT, launcher_cmd, run_cli
from .test_checkpoint import assert_states_equal, final_state


def build():
    # 33 rows: shards of uneven size on 2 ranks; BatchNorm: synchronized under FSDP too
    return nn.Sequential(nn.Linear(8, 33), nn.BatchNorm1d(33), nn.ReLU(), nn.Linear(33, 3))


def _grad_error(model, ref):
    from torch.distributed.tensor import DTensor

    scale = max(q.grad.abs().max().item() for q in ref.parameters())
    worst = 0.0
    for p, q in zip(model.parameters(), ref.parameters()):
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        worst = max(worst, (g - q.grad).abs().max().item() / scale)
    return worst


def _trap(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the trap's own error is what the test reports
        return f"{type(e).__name__}: {e}"[:300]
    return None


def _async_save_keeps_the_moment(model, folder):
    """An async sharded save writes the shards as they were when it was called, training going on in place
    while the write is held back (the shards are copied into reused staging buffers)."""
    import time

    from launcher.checkpoint import sharded

    real = sharded._write

    def held_back(*args, **kwargs):
        time.sleep(0.3)
        return real(*args, **kwargs)

    sharded._write = held_back
    try:
        ck = Checkpointer(folder, async_save=True, model=model)
        kept = []
        for step in (1, 2):  # the second save copies into the first's buffers
            expected = launcher.full_state_dict(model)
            ck.save(TrainState(step=step))
            with torch.no_grad():
                for p in model.parameters():
                    p.to_local().add_(1.0)
            ck.wait()
            launcher.barrier()
            if launcher.get_rank() == 0:
                saved = load_checkpoint(folder / f"step_{step:08d}.dcp")["model"]
                kept.append(all(torch.equal(saved[k], v) for k, v in expected.items()))
            launcher.barrier()
        ck.close()
        return all(kept)
    finally:
        sharded._write = real


def _mesh_on_a_gpu_host(fsdp, config, own=True):
    """The mesh a Gloo job's model gets where torch sees an accelerator (torch's default mesh follows it, and
    fails here without CUDA): ``own=False`` asks torch's default instead of the launcher's."""
    from torch.distributed.fsdp import fully_shard

    real = torch._C._get_accelerator
    torch._C._get_accelerator = lambda: torch.device("cuda")  # type: ignore[misc]
    try:
        model = fsdp.shard(nn.Linear(4, 4), config()) if own else fully_shard(nn.Linear(4, 4))
        return model.weight.device_mesh.device_type
    except Exception as e:  # noqa: BLE001 - what torch's default does here is the answer
        return f"{type(e).__name__}: {e}"[:200]
    finally:
        torch._C._get_accelerator = real


def fsdp_facts(folder):
    """On each rank: how FSDP compares with one process holding the whole batch, and torch's traps."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    from launcher import fsdp
    from launcher.config import FsdpConfig

    rank, world = launcher.get_rank(), launcher.get_world_size()
    torch.manual_seed(0)
    ref = build()
    torch.manual_seed(0 if rank == 0 else 1234 + rank)  # the others build other weights: rank 0 wins
    model = fsdp.shard(build(), FsdpConfig())
    start_equal = all(torch.equal(launcher.full_state_dict(model)[k], v) for k, v in ref.state_dict().items()
                      if k in dict(ref.named_parameters()))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]
    for i, (x, y) in enumerate(batches):  # two micro-batches, the first without gradient reduction
        with launcher.accumulate(model, sync=i == 1):
            nn.functional.cross_entropy(model(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
        nn.functional.cross_entropy(ref(x), y).backward()
    grad_error = _grad_error(model, ref)  # pytorch#162338: summed instead of averaged on Gloo
    shard_bytes = sum(p.to_local().nelement() * p.element_size() for p in model.parameters())
    full_bytes = sum(p.nelement() * p.element_size() for p in ref.parameters())

    # a model built on the meta device: rank 0's generator draws it, each rank keeps its shards
    torch.manual_seed(7)
    cpu_built = build().state_dict()
    torch.manual_seed(7 + rank)
    with torch.device("meta"):
        meta = build()
    state = torch.get_rng_state()
    if rank == 0:
        torch.manual_seed(7)
    meta = fsdp.shard(meta, FsdpConfig())
    meta_equal = all(torch.equal(launcher.full_state_dict(meta)[k], v) for k, v in cpu_built.items())
    rng_kept = rank == 0 or torch.equal(torch.get_rng_state(), state)

    def divide_factor_on_gloo():  # torch alone: a factor other than the world size
        m = nn.Linear(4, 4)
        fully_shard(m, mesh=fsdp.mesh())
        m.set_gradient_divide_factor(3.0)
        m(torch.randn(2, 4)).sum().backward()

    # through the job key: summed over the ranks, divided by 3, in every unit (no BatchNorm: each rank's
    # gradient is then that of its own half of the batch alone)
    def mlp():
        return nn.Sequential(nn.Linear(8, 33), nn.ReLU(), nn.Linear(33, 3))

    torch.manual_seed(0)
    divided = fsdp.shard(mlp(), FsdpConfig(gradient_divide_factor=3.0))
    torch.manual_seed(0)
    summed = mlp()
    x, y = batches[0]
    nn.functional.cross_entropy(divided(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
    for i in range(world):  # the sum of the ranks' own gradients, each on its own half of the batch
        nn.functional.cross_entropy(summed(x.chunk(world)[i]), y.chunk(world)[i]).backward()
    for p in summed.parameters():
        p.grad /= 3.0
    factor_error = _grad_error(divided, summed)

    def pinned_offload_without_cuda():
        m = nn.Linear(4, 4)
        fully_shard(m, mesh=fsdp.mesh(), offload_policy=CPUOffloadPolicy())
        m(torch.randn(2, 4)).sum().backward()

    # the launcher's figures: each unit's all-gathers and reduce-scatters are timed (launcher.rank.figures);
    # rank 1 coming 50 ms late to each forward, then to each backward, shows as rank 0's wait, the straggler
    # rule's input under FSDP
    import torch.distributed as tdist

    from launcher import dist as launcher_dist
    from launcher.rank import figures

    timed = figures.watch_fsdp(fsdp.shard(mlp(), FsdpConfig()))
    waited = []
    for late in ("forward", "backward"):
        before = launcher_dist._waits["sync"]
        for _ in range(4):
            if rank == 1 and late == "forward":
                time.sleep(0.05)
            loss = timed(x.chunk(world)[rank]).sum()
            if rank == 1 and late == "backward":
                loss.register_hook(lambda grad: time.sleep(0.05))  # the backward starts 50 ms late
            loss.backward()
        waited.append(launcher_dist._waits["sync"] - before)

    class CountingAllGather:  # a user's own all-gather (set_custom_all_gather): still the one run, timed
        calls = 0

        def allocate(self, size, *, dtype, device):
            return torch.empty(*size, dtype=dtype, device=device)

        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            CountingAllGather.calls += 1
            return tdist.all_gather_into_tensor(output_tensor, input_tensor, group=group, async_op=async_op)

    own = fsdp.shard(mlp(), FsdpConfig())
    next(m for m in own.modules() if m is not own and hasattr(m, "unshard")).set_custom_all_gather(
        CountingAllGather())
    figures.watch_fsdp(own)(x.chunk(world)[rank]).sum().backward()
    own_comm_ran = CountingAllGather.calls

    moment = _async_save_keeps_the_moment(model, folder)
    gpu_host_mesh = _mesh_on_a_gpu_host(fsdp, FsdpConfig)
    torch_default_mesh = _mesh_on_a_gpu_host(fsdp, FsdpConfig, own=False)
    return {"start_equal": start_equal, "moment": moment, "grad_error": grad_error,
            "bytes_ratio": shard_bytes / full_bytes,
            "meta_equal": meta_equal, "rng_kept": rng_kept, "mesh": fsdp.mesh().device_type,
            "premul_sum": _trap(divide_factor_on_gloo), "pinned": _trap(pinned_offload_without_cuda),
            "factor_error": factor_error, "gpu_host_mesh": gpu_host_mesh,
            "torch_default_mesh": torch_default_mesh, "waited": waited, "own_comm_ran": own_comm_ran,
            "type": type(model).__name__}


@pytest.mark.slow  # starts ranks or the launcher
def test_fsdp_on_gloo_computes_what_one_process_computes(tmp_path):
    out = run_distributed(fsdp_facts, tmp_path, world_size=2, timeout_s=120)
    assert out[0]["moment"], "an async sharded save wrote shards changed after it was called"
    for phase in (0, 1):  # 4 forwards, then 4 backwards, rank 1 late by 50 ms to each
        assert out[0]["waited"][phase] - out[1]["waited"][phase] > 0.15, out
    assert out[0]["own_comm_ran"] >= 2, out  # the forward's all-gather and the backward's
    for rank, facts in out.items():
        assert facts["type"] == "FSDPSequential", facts
        assert facts["start_equal"], f"rank {rank} did not start from rank 0's weights"
        assert facts["grad_error"] < 1e-5, facts  # averaged over ranks, micro-batches accumulated
        assert facts["bytes_ratio"] <= 1.1 / 2, facts  # each rank holds about half of the parameters
        assert facts["meta_equal"], f"rank {rank}: meta-device init differs from the same model built on CPU"
        assert facts["rng_kept"], "materializing a meta model moved the rank's own generator"
        assert facts["mesh"] == "cpu", facts  # torch's default follows the accelerator, not the backend
        assert facts["gpu_host_mesh"] == "cpu", facts  # even where torch sees a GPU, where torch's own
        assert facts["torch_default_mesh"] != "cpu", facts  # default mesh is a CUDA one (failing here)
        # torch's own divide factor fails on Gloo; the job key's works there
        assert facts["premul_sum"] and "PREMUL_SUM" in facts["premul_sum"].upper(), facts["premul_sum"]
        assert facts["factor_error"] < 1e-5, facts
        # pinned offload, refused before a start without CUDA, really fails at the first step
        if not torch.cuda.is_available():
            assert facts["pinned"], "pinned CPU offload worked without CUDA: the refusal is no longer needed"


@pytest.mark.slow  # starts the launcher
@pytest.mark.parametrize("setting, named", [
    ("distributed.fsdp.cpu_offload=true", "distributed.fsdp.offload_pin_memory"),
    ("checkpoint.format=full", "checkpoint.format: full"),
])
def test_settings_that_fail_at_the_first_step_are_refused_before_the_start(tmp_path, setting, named):
    if "offload" in setting and torch.cuda.is_available():
        pytest.skip("pinned memory works on a CUDA machine")
    r = run_cli("run", "jobs/tiny.yaml", "distributed.strategy=fsdp", setting, f"output_dir={tmp_path}",
                timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert named in r.stderr and "HINT" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "starting" not in r.stderr and not (tmp_path / "tiny" / "logs").exists()


@pytest.mark.slow  # starts ranks or the launcher
def test_fsdp_resumes_bit_exactly_and_ends_where_ddp_ends(tmp_path):
    """max_steps 7 then 40 under FSDP (sharded checkpoints, every rank writing) against 40 straight under
    DDP: model and optimizer equal bit for bit, read back through load_checkpoint and the consolidate
    command. (On CPU, reduce-scatter then all-gather sums these gradients as DDP's all-reduce does.)"""
    common = ["jobs/tiny.yaml", "args.epochs=3", "checkpoint.every_steps=100"]
    straight = launcher_cmd("run", *common, "args.max_steps=40", f"output_dir={tmp_path / 'ddp'}")
    ref = subprocess.Popen(straight, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for max_steps in (7, 40):  # mid-epoch, then on across two epoch ends
            r = run_cli("run", *common, "distributed.strategy=fsdp", f"args.max_steps={max_steps}",
                        f"output_dir={tmp_path / 'fsdp'}")
            assert r.returncode == 0, r.stderr
            assert f"'step': {max_steps}" in r.stderr, r.stderr
    finally:
        _, err = ref.communicate(timeout=120)
    assert ref.returncode == 0, err
    ckdir = tmp_path / "fsdp" / "tiny" / "checkpoints"
    assert (ckdir / "step_00000040.dcp" / "__1_0.distcp").is_file(), sorted(os.listdir(ckdir))
    sharded = final_state(tmp_path / "fsdp" / "tiny")
    assert_states_equal(final_state(tmp_path / "ddp" / "tiny"), sharded)
    # each rank's generators and data position, not one rank's under a key DCP keeps once
    assert [r["data"] for r in sharded["ranks"]] != [sharded["ranks"][0]["data"]] * 2
    out = tmp_path / "one.pt"
    r = run_cli("consolidate", str(ckdir), str(out))
    assert r.returncode == 0 and f"wrote {out}: step 40" in r.stderr, r.stderr
    assert_states_equal(sharded, torch.load(out, weights_only=True))
    # the consolidated model loads into the plain module (examples/tiny.py's)
    tiny = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2))
    tiny.load_state_dict(torch.load(out, weights_only=True)["model"])


@pytest.mark.slow  # starts ranks or the launcher
def test_reshard_on_resume_and_switch_strategies(tmp_path):
    """DDP at 2 ranks -> FSDP at 3 -> FSDP at 1 -> DDP at 2: each resumes where the last stopped (a full
    checkpoint into sharded objects, a sharded one resharded, a sharded one into plain objects), the epoch
    going on with the samples not yet seen."""
    base = ["jobs/tiny.yaml", f"output_dir={tmp_path}", "checkpoint.every_steps=100", "args.log_every=1",
            "checkpoint.allow_changes=true", "data.num_workers=1"]
    steps = [("ddp", 2, 6), ("fsdp", 3, 10), ("fsdp", 1, 14), ("ddp", 2, 18)]
    for i, (strategy, ranks, max_steps) in enumerate(steps):
        r = run_cli("run", *base, f"distributed.strategy={strategy}", f"distributed.nproc_per_node={ranks}",
                    f"args.max_steps={max_steps}")
        console = r.stdout + r.stderr
        assert r.returncode == 0, console
        if i:
            before, saved = steps[i - 1][1], ("dcp" if steps[i - 1][0] == "fsdp" else "pt")
            assert f"resumed from {tmp_path / 'tiny' / 'checkpoints'}" in console and f".{saved} " in console
            if before != ranks:
                assert f"data position carried over from {before} ranks x 1 workers" in console, console
        assert f"'step': {max_steps}" in r.stderr and f"'world_size': {ranks}" in r.stderr, r.stderr


# ----------------------------------------------------------------------------- in one process, no group

def _objects():
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    return model, opt, sched


def _train(model, opt, sched, steps=3):
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        model(torch.randn(6, 8, generator=g)).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()


@pytest.mark.parametrize("async_save", [False, True])
def test_a_sharded_checkpoint_loads_as_the_same_dict_as_a_full_one(tmp_path, async_save):
    model, opt, sched = _objects()
    sharded = Checkpointer(tmp_path / "s", format="sharded", async_save=async_save, model=model,
                           optimizer=opt, scheduler=sched)
    full = Checkpointer(tmp_path / "f", format="full", model=model, optimizer=opt, scheduler=sched)
    sharded.save(TrainState(step=0))  # before the first step: torch's get_state_dict would step Adam
    assert not opt.state, "saving an optimizer without state gave it one (a zero-lr step)"
    _train(model, opt, sched)
    for c in (sharded, full):
        c.save(TrainState(step=3))
        c.close()
    a, b = load_checkpoint(tmp_path / "s"), load_checkpoint(tmp_path / "f")
    assert_states_equal(a, b)
    assert a["scheduler"] == b["scheduler"] and a["epoch"] == b["epoch"]
    # and a resume of the sharded one restores the live objects
    model2, opt2, sched2 = _objects()
    state = Checkpointer(tmp_path / "s", model=model2, optimizer=opt2, scheduler=sched2).resume()
    assert state.step == 3
    assert_states_equal({"step": 3, "model": model.state_dict(), "optimizer": opt.state_dict()},
                        {"step": 3, "model": model2.state_dict(), "optimizer": opt2.state_dict()})
    assert sched2.state_dict() == sched.state_dict()


def _save_two(tmp_path):
    model, opt, sched = _objects()
    c = Checkpointer(tmp_path, format="sharded", async_save=False, model=model, optimizer=opt)
    _train(model, opt, sched, 1)
    c.save(TrainState(step=1))
    _train(model, opt, sched, 1)
    c.save(TrainState(step=2))
    c.close()
    return tmp_path / "step_00000002.dcp"


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('TMPDIR', '/tmp')}/launcher-pwned",))


DAMAGES = ["truncated shard", "missing shard", "crafted .metadata", "crafted header"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_or_crafted_sharded_checkpoint_is_refused(tmp_path, damage, capsys):
    from launcher.checkpoint import files

    newest = _save_two(tmp_path)
    pwned = f"{os.environ.get('TMPDIR', '/tmp')}/launcher-pwned"
    if os.path.exists(pwned):
        os.unlink(pwned)
    if damage == "truncated shard":
        with open(newest / "__0_0.distcp", "r+b") as f:
            f.truncate(100)
    elif damage == "missing shard":
        (newest / "__0_0.distcp").unlink()
    else:  # an attacker rewrites the manifest too: the checksum passes, the restricted readers must refuse
        target = newest / (".metadata" if damage == "crafted .metadata" else "header.pt")
        if damage == "crafted .metadata":
            target.write_bytes(pickle.dumps(RunsCode()))
        else:
            torch.save({"format": "x", "evil": RunsCode()}, target)
        manifest = newest.with_suffix(".json")
        data = json.loads(manifest.read_text())
        data["files"][target.name] = {"crc32": files._crc32(target), "bytes": target.stat().st_size}
        manifest.write_text(json.dumps(data))
    if damage.startswith("crafted"):
        with pytest.raises(CheckpointError, match="refused"):
            load_checkpoint(newest)
        assert not os.path.exists(pwned), "a crafted checkpoint ran code on load"
        return
    model, opt, _ = _objects()
    state = Checkpointer(tmp_path, model=model, optimizer=opt).resume()
    assert state.step == 1  # the previous checkpoint, the damaged one set aside with its reason
    assert (tmp_path / "refused" / "step_00000002.dcp").is_dir()
    why = (tmp_path / "refused" / "step_00000002.why.txt").read_text()
    assert ("truncated" if damage == "truncated shard" else "missing") in why, why


def test_a_sharded_save_killed_half_way_is_never_resumed_and_is_cleaned_up(tmp_path, capsys):
    _save_two(tmp_path)
    half = tmp_path / ".step_00000003.dcp.3.tmp"  # what a rank killed mid-save leaves
    half.mkdir()
    (half / "__0_0.distcp").write_bytes(b"partial")
    model, opt, _ = _objects()
    c = Checkpointer(tmp_path, model=model, optimizer=opt)
    assert not half.exists() and "removed .step_00000003.dcp.3.tmp" in capsys.readouterr().out
    assert c.resume().step == 2


def killed_mid_save(job, args: examples.tiny.TinyArgs):
    """Entry point: the tiny job whose rank 1 is SIGKILLed inside its part of the second sharded save (the
    temp folder made, rank 0 writing into it)."""
    import signal

    from launcher.checkpoint import sharded

    real, saves = sharded._write, [0]

    def dying(*a, **kw):
        saves[0] += 1
        if saves[0] == 2 and launcher.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **kw)

    sharded._write = dying
    return examples.tiny.main(job, args)


@pytest.mark.slow  # starts the launcher
def test_a_rank_killed_mid_save_never_leaves_a_checkpoint_to_resume_from_but_the_previous_one(tmp_path):
    """The surviving rank's failed save removes the temp folder (one left by a whole job killed at once is
    removed at the next start: test_a_sharded_save_killed_half_way_is_never_resumed_and_is_cleaned_up)."""
    base = ["jobs/tiny.yaml", "distributed.strategy=fsdp", f"output_dir={tmp_path}",
            "checkpoint.every_steps=5", "args.max_steps=20"]
    r = run_cli("run", *base, "entry=tests.test_fsdp:killed_mid_save")
    assert r.returncode != 0 and "rank 1" in r.stderr and "SIGKILL" in r.stderr, r.stderr[-3000:]
    ckdir = tmp_path / "tiny" / "checkpoints"
    assert sorted(os.listdir(ckdir)) == ["latest", "step_00000005.dcp", "step_00000005.json"]
    r = run_cli("run", *base)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {ckdir}/step_00000005.dcp" in r.stdout and "'step': 20" in r.stderr, r.stdout


def test_torch_version_change_is_said_on_resume(tmp_path, capsys, monkeypatch):
    _save_two(tmp_path)
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    model, opt, _ = _objects()
    Checkpointer(tmp_path, model=model, optimizer=opt).resume()
    out = capsys.readouterr().out
    assert f"was written by torch {torch.__version__}" not in out  # the patched name is this run's
    assert "was written by torch" in out and "this run has 9.9.9" in out, out


FULL_DURING_SAVE = """
mount -t tmpfs -o size=600k tmpfs "$1"
exec {python} -c '
import sys, torch
from torch import nn
from launcher.checkpoint import Checkpointer, CheckpointError, TrainState, find_latest
model = nn.Linear(200, 200)
c = Checkpointer(sys.argv[1], format="sharded", async_save=False, model=model)
c.save(TrainState(step=1))
open(sys.argv[1] + "/filler", "wb").write(bytes(300 * 1024))
try:
    c.save(TrainState(step=2))
except CheckpointError as e:
    print("refused:", e)
print("newest:", find_latest(sys.argv[1])[0].name)
print("left:", sorted(p for p in __import__("os").listdir(sys.argv[1])))
' "$1"
"""


@pytest.mark.slow  # starts ranks or the launcher
def test_a_full_disk_during_a_sharded_save_is_named_and_the_previous_checkpoint_stays(tmp_path):
    from .test_bad_day import _in_private_mount, _needs_private_mounts

    _needs_private_mounts()
    (tmp_path / "mnt").mkdir()
    r = _in_private_mount(FULL_DURING_SAVE.format(python=sys.executable), str(tmp_path / "mnt"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "refused:" in r.stdout and "no space left on the device" in r.stdout, r.stdout + r.stderr
    assert "newest: step_00000001.dcp" in r.stdout, r.stdout
    assert "left: ['filler', 'latest', 'step_00000001.dcp', 'step_00000001.json']" in r.stdout, r.stdout
