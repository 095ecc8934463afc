"""Sharded IterableDataset: exactly-once per epoch, equal batches per rank, resume, no DDP hang."""

import collections

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import launcher
from launcher.data import ShardedIterableDataset, make_loader, plan_epoch, slot_streams
from launcher.testing import run_distributed


def all_refs(sizes):
    return {(s, i) for s, n in enumerate(sizes) for i in range(n)}


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 15), min_size=1, max_size=20),
    world=st.integers(1, 4),
    workers=st.integers(0, 3),
    batch=st.integers(1, 5),
    uneven=st.sampled_from(["drop", "pad"]),
    buffer=st.sampled_from([0, 4]),
    epoch=st.integers(0, 3),
)
def test_plan_every_sample_once_and_equal_batches(sizes, world, workers, batch, uneven, buffer, epoch):
    if uneven == "pad" and sum(sizes) == 0:
        return
    plans = plan_epoch(
        sizes, world, workers, batch, seed=7, epoch=epoch, uneven=uneven, shuffle_buffer=buffer
    )
    per_rank = [sum(p.batches for p in row) for row in plans]
    assert len(set(per_rank)) == 1, per_rank  # equal batch count on every rank: no DDP hang
    for row in plans:
        for p in row:
            assert len(p.order) == p.batches * batch
    everything = all_refs(sizes)
    if uneven == "drop":
        kept = [r for row in plans for p in row for r in p.order]
        assert len(kept) == len(set(kept)) and set(kept) <= everything
        assert sum(p.num_padded for row in plans for p in row) == 0
        # the documented rule: every rank keeps the smallest rank's number of full batches
        streams = slot_streams(sizes, world, workers, seed=7, epoch=epoch, shuffle_buffer=buffer)
        assert sorted(r for row in streams for st_ in row for r in st_) == sorted(everything)
        assert per_rank[0] == min(sum(len(st_) // batch for st_ in row) for row in streams)
    else:
        real = [r for row in plans for p in row for r in p.order[: len(p.order) - p.num_padded]]
        assert sorted(real) == sorted(everything)  # exactly once, padding aside
        pad = sum(p.num_padded for row in plans for p in row)
        assert pad == per_rank[0] * batch * world - len(everything)


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(1, 10), min_size=2, max_size=12), world=st.integers(1, 3),
       workers=st.integers(0, 2))
def test_order_depends_on_seed_and_epoch_only(sizes, world, workers):
    a = plan_epoch(sizes, world, workers, 1, seed=3, epoch=1, uneven="pad")
    b = plan_epoch(sizes, world, workers, 1, seed=3, epoch=1, uneven="pad")
    assert a == b
    if sum(sizes) >= 8:
        # with a shuffle buffer the order within every slot changes with the epoch (shard order alone can
        # legitimately repeat when there are only two shards)
        orders = {tuple(r for row in plan_epoch(sizes, world, workers, 1, seed=3, epoch=e, uneven="pad",
                                                shuffle_buffer=4)
                        for p in row for r in p.order) for e in range(8)}
        assert len(orders) > 1  # different order across epochs


def read_range(shard):
    lo, n = shard
    return [{"id": torch.tensor(lo + i)} for i in range(n)]


def make_ds(rank, world, sizes=(7, 3, 9, 1, 5), **kw):
    shards, lo = [], 0
    for n in sizes:
        shards.append((lo, n))
        lo += n
    return ShardedIterableDataset(shards, read_range, sizes=list(sizes), batch_size=2, rank=rank,
                                  world_size=world, seed=1, **kw)


@pytest.mark.parametrize("workers", [0, 2, 3])
@pytest.mark.parametrize("uneven", ["drop", "pad"])
def test_through_the_dataloader_with_workers(workers, uneven):
    world = 2
    seen, counts = [], []
    for rank in range(world):
        ds = make_ds(rank, world, uneven=uneven)
        ds.set_epoch(1)
        batches = [b["id"].tolist() for b in make_loader(ds, num_workers=workers)]
        counts.append(len(batches))
        seen += [i for b in batches for i in b]
    assert counts[0] == counts[1]
    c = collections.Counter(seen)
    if uneven == "drop":
        assert max(c.values()) == 1
    else:
        assert set(c) == set(range(25))


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resume_mid_epoch_gives_no_duplicate_and_no_missing_sample(workers):
    for stop_after in (1, 3, 5):
        ds = make_ds(0, 1, uneven="pad", shuffle_buffer=3)
        ds.set_epoch(2)
        loader = make_loader(ds, num_workers=workers)
        first, state = [], None
        for k, b in enumerate(loader):
            first += b["id"].tolist()
            if k + 1 == stop_after:
                state = loader.state_dict()
                break
        ds2 = make_ds(0, 1, uneven="pad", shuffle_buffer=3)
        ds2.set_epoch(2)
        loader2 = make_loader(ds2, num_workers=workers)
        loader2.load_state_dict(state)
        rest = [i for b in loader2 for i in b["id"].tolist()]
        ds_full = make_ds(0, 1, uneven="pad", shuffle_buffer=3)
        ds_full.set_epoch(2)
        full = [i for b in make_loader(ds_full, num_workers=workers) for i in b["id"].tolist()]
        assert sorted(first + rest) == sorted(full), (workers, stop_after)
        assert first + rest == full  # the very same order, not only the same set


def ddp_over_uneven_shards():
    model = launcher.wrap_model(torch.nn.Linear(1, 1))
    ds = make_ds(None, None, sizes=(11, 2, 5, 1, 8, 3, 1))
    steps = 0
    for batch in make_loader(ds, num_workers=2):
        loss = model(batch["id"].float()[:, None]).sum()
        loss.backward()  # all-reduce: a rank with one batch more would hang here
        steps += 1
    return steps


def test_two_rank_ddp_over_uneven_shards_finishes():
    out = run_distributed(ddp_over_uneven_shards, world_size=2, timeout_s=30)
    assert out[0] == out[1] > 0


def _slow_first_shard(shard):
    """Shard 0 takes ``shard_delay`` seconds to open (slow storage, a stuck worker)."""
    import os
    import time

    if shard == 0:
        time.sleep(float(os.environ.get("SHARD_DELAY", "0")))
    return [(torch.zeros(2), 0) for _ in range(8)]


@pytest.mark.parametrize("delay, wait, fails", [(3.0, 60.0, False), (30.0, 3.0, True)])
def test_a_slow_first_batch_is_allowed_and_a_stuck_worker_is_not(monkeypatch, delay, wait, fails):
    import time

    monkeypatch.setenv("SHARD_DELAY", str(delay))
    ds = ShardedIterableDataset([0, 1, 2, 3], _slow_first_shard, sizes=[8] * 4, batch_size=4, rank=0,
                                world_size=1, shuffle=False)
    loader = make_loader(ds, num_workers=2, timeout=wait)  # the wait bound is ours; torch polls every 2 s
    start = time.monotonic()
    if fails:
        with pytest.raises(RuntimeError, match=r"no batch from its DataLoader workers for 3 s"):
            list(loader)
        assert time.monotonic() - start < wait + 3
    else:
        assert len(list(loader)) == 8 and time.monotonic() - start >= delay
