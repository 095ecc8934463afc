"""``launcher consolidate CHECKPOINT OUT.pt``: one file from a checkpoint, for inference or sharing.

Offline and in one process (no process group): a sharded checkpoint's tensors are read whole, so this
process needs memory for the whole state (the training ranks never did). The file has the shape of a full
checkpoint (``model`` a plain state_dict, optimizers numbered as ``optimizer.state_dict()`` is) and loads
with ``torch.load(weights_only=True)`` or :func:`launcher.load_checkpoint`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import EXIT_FAILURE, EXIT_OK


def cmd_consolidate(source: Path, out: Path) -> int:
    from ..checkpoint.files import CheckpointError, _payload_bytes, atomic_write_bytes, load_checkpoint

    if out.is_dir():
        print(f"launcher: error: {out} is a folder\nHINT: name the file to write, e.g. {out / 'model.pt'}",
              file=sys.stderr)
        return EXIT_FAILURE
    started = time.monotonic()
    print(f"[launcher] reading {source} ...", file=sys.stderr, flush=True)
    try:
        data = load_checkpoint(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, obj=data)
    except (CheckpointError, OSError) as e:
        print(f"launcher: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    mb = _payload_bytes(data) / (1 << 20)
    print(f"[launcher] wrote {out}: step {data.get('step')}, {mb:.1f} MB of tensors, in "
          f"{time.monotonic() - started:.1f} s (torch.load(weights_only=True) reads it)", file=sys.stderr)
    return EXIT_OK
