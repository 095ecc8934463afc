"""Checkpoints: the file format (:mod:`.files`, no collectives) and the collective :class:`Checkpointer`."""

from .checkpointer import Checkpointer, TrainState
from .files import (
    CheckpointError,
    atomic_write_bytes,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    load_file,
    verify,
)

__all__ = ["CheckpointError", "Checkpointer", "TrainState", "atomic_write_bytes", "find_latest",
           "list_checkpoints", "load_checkpoint", "load_file", "verify"]
