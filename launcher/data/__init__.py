"""Sharded data for DDP: the epoch plan (pure), the dataset, the loader, and how workers start."""

from .dataset import ShardedIterableDataset
from .loader import make_loader
from .plan import SlotPlan, epoch_stream, plan_epoch, slot_streams

__all__ = ["ShardedIterableDataset", "SlotPlan", "epoch_stream", "make_loader", "plan_epoch", "slot_streams"]
