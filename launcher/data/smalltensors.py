"""Small tensors leave DataLoader workers by value, not through shared memory.

torch sends every tensor of a batch from a worker to the rank through a shared-memory file whose descriptor
the rank fetches over a fresh authenticated connection to the worker: 0.2 to 0.3 ms of the rank's CPU per
tensor on a 2-core machine, whatever its size, so a batch's labels (a few hundred bytes) cost as much as its
images. :func:`by_value` marks the small tensors of a batch so that they are pickled as bytes instead; they
arrive as ordinary tensors. Used by :class:`launcher.data.ShardedIterableDataset` inside workers only (without
workers nothing is pickled and the batch is returned as it is).
"""

from __future__ import annotations

from typing import Any

import torch

#: Tensors of at most this many bytes travel by value (copying 64 KiB costs far less than an fd hand-over).
LIMIT_BYTES = 64 * 1024


class _Small:
    """A tensor that pickles as its bytes (the receiving side gets a plain tensor back)."""

    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def __reduce__(self) -> tuple[Any, ...]:
        t = self.t.detach()
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return (_rebuild, (data, t.dtype, tuple(t.shape)))


def _rebuild(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def by_value(batch: Any) -> Any:
    """``batch`` with its small CPU tensors (in tuples, lists and dicts, nested) marked to pickle by value."""
    if isinstance(batch, torch.Tensor):
        plain = (type(batch) is torch.Tensor and batch.device.type == "cpu" and batch.layout == torch.strided
                 and not (batch.requires_grad or batch.is_quantized or batch.is_conj() or batch.is_neg()))
        return _Small(batch) if plain and batch.nbytes <= LIMIT_BYTES else batch
    if isinstance(batch, dict) and type(batch) is dict:
        return {k: by_value(v) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(by_value(v) for v in batch))
    if type(batch) in (tuple, list):
        return type(batch)(by_value(v) for v in batch)
    return batch
