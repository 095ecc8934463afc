"""Small tensors of a batch leave DataLoader workers by value and arrive as the same plain tensors."""

import pickle
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
import torch.multiprocessing

from launcher.data import ShardedIterableDataset, make_loader
from launcher.data.smalltensors import LIMIT_BYTES, by_value

CASES = {
    "int64 labels": torch.arange(50),
    "bfloat16": torch.randn(3, 4).to(torch.bfloat16),
    "bool": torch.tensor([True, False, True]),
    "0-dim": torch.tensor(3.5),
    "empty": torch.empty(0, 7),
    "non-contiguous": torch.arange(24.0).view(4, 6).t(),
}


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_through_the_workers_pickler(name):
    t = CASES[name]
    back = pickle.loads(ForkingPickler.dumps(by_value({"x": [t, (t,)]})))
    for got in (back["x"][0], back["x"][1][0]):
        assert type(got) is torch.Tensor and got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got, t)


def test_only_small_cpu_tensors_are_marked():
    big = torch.zeros(LIMIT_BYTES // 4 + 1)
    small = torch.zeros(4)
    grad = torch.zeros(4, requires_grad=True)
    marked = by_value((big, small, "text", 3, grad))
    assert marked[0] is big and marked[2:4] == ("text", 3) and marked[4] is grad  # torch's own way keeps grad
    assert type(marked[1]) is not torch.Tensor  # marked: pickles as bytes


def read_items(shard):
    n, offset = shard
    for i in range(n):
        yield {
            "image": torch.full((3, 8, 8), float(offset + i)),
            "label": offset + i,
            "name": f"s{offset + i}",
        }


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_from_workers_are_plain_tensors_with_the_same_values(workers):
    """Failed once in two fresh-clone ``make test`` runs (issue #41): a worker died of SIGSEGV when an earlier
    test in the same pytest process had called ``launcher.launch`` (fixed; guarded by
    ``test_spawn.py::test_two_launches_in_one_process_draw_apart_and_leave_no_store_to_a_fork``). Every
    assertion says what it saw, and a worker that never answers fails in 60 s, naming it."""
    import threading

    shards = [(7, 0), (5, 100)]
    ds = ShardedIterableDataset(shards, read_items, sizes=[7, 5], batch_size=4, rank=0, world_size=1,
                                uneven="pad")
    threads = [t.name for t in threading.enumerate()]  # forked into each worker: named if it fails
    batches = list(make_loader(ds, num_workers=workers, timeout=60))
    seen = [(type(b["label"]).__name__, b["label"].tolist(), b["name"]) for b in batches]
    labels = sorted(int(v) for b in batches for v in b["label"])
    assert set(labels) == set(range(7)) | set(range(100, 105)), (seen, threads)
    for b in batches:
        assert type(b["label"]) is torch.Tensor and b["label"].dtype == torch.int64, (type(b["label"]), seen)
        assert torch.equal(b["image"][:, 0, 0, 0], b["label"].float()), (b["image"][:, 0, 0, 0], seen)
        assert b["name"] == [f"s{int(v)}" for v in b["label"]], seen
