"""Bring your own loop: the Python API alone, no job file.

    python examples/byo_loop.py                                     # spawns 2 ranks itself (Gloo on CPU)
    torchrun --standalone --nproc-per-node 2 examples/byo_loop.py   # the same script, ranks from torchrun
    python examples/byo_loop.py --nproc 4 --steps 200 --out runs/byo

`launcher.launch` starts the ranks (or, under torchrun / srun, runs this process as its rank); the rest is an
ordinary DDP loop with the model wrapper, the sharded dataset and the checkpointer. Run it twice: the second
run resumes from the checkpoint and has nothing left to do.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import launcher


def read_shard(shard_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One shard of a synthetic problem: 100 samples drawn from a generator seeded by the shard id."""
    g = torch.Generator().manual_seed(shard_id)
    x = torch.randn(100, 10, generator=g)
    return list(zip(x, (x[:, :3].sum(1) > 0).long()))


def train(steps: int, out: str, workers: int) -> dict[str, float]:
    """One rank's work: every rank runs this with the process group ready."""
    torch.manual_seed(0)  # the same initial weights on every rank
    model = launcher.wrap_model(
        nn.Sequential(nn.Linear(10, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 2))
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = launcher.ShardedIterableDataset(list(range(8)), read_shard, sizes=[100] * 8, batch_size=16, seed=0)
    loader = launcher.make_loader(data, num_workers=workers)
    ckpt = launcher.Checkpointer(out, keep_last=2, every_steps=20, per_rank={"data": loader}, model=model,
                                 optimizer=opt)
    state = ckpt.resume("auto")
    loss = torch.tensor(float("nan"))
    while state.step < steps:
        data.set_epoch(state.epoch)
        for x, y in loader:
            loss = nn.functional.cross_entropy(
                model(x.to(launcher.get_device())), y.to(launcher.get_device())
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            state.step += 1
            ckpt.step(state)  # saves every 20 steps; SLURM preemption: save, requeue, exit (free elsewhere)
            if state.step >= steps:
                break
        else:
            state.epoch += 1
    ckpt.finish(state)
    return {"step": state.step, "loss": loss.item(), "world_size": launcher.get_world_size()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="ranks to start (ignored under torchrun / srun)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    parser.add_argument("--out", default="runs/byo_loop/checkpoints")
    args = parser.parse_args()
    results = launcher.launch(train, nproc=args.nproc, args=(args.steps, args.out, args.workers))
    if 0 in results:  # rank 0's process (the only one that spawned, or rank 0 under torchrun)
        r = results[0]
        loss = "n/a (resumed after the last step)" if r["loss"] != r["loss"] else f"{r['loss']:.3f}"
        print(f"byo_loop: {r['step']} steps on {r['world_size']} rank(s), final loss {loss}")


if __name__ == "__main__":
    main()
