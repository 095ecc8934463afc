"""Sharded data for DDP: the epoch plan (pure), the dataset, the loader, and how workers start."""

from .dataset import ShardedIterableDataset
from .loader import make_loader
from .plan import EmptyEpoch, EpochPlan, SlotPlan

__all__ = ["EmptyEpoch", "EpochPlan", "ShardedIterableDataset", "SlotPlan", "make_loader"]
