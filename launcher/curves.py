"""``launcher curves RUN_DIR``: the curves of a run as one PNG, from ``metrics.jsonl`` (what
:func:`launcher.log_metrics` wrote) and ``logs/perf.jsonl`` (the launcher's samples/s). Needs matplotlib;
no process group, no torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .errors import EXIT_FAILURE, EXIT_OK

_NOT_CURVES = {"step", "time", "epoch", "kind"}


def series(run_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """``{"kind/name": [(step, value), ...]}`` of every number logged, and ``perf/samples_per_s``."""
    out: dict[str, list[tuple[float, float]]] = {}
    for path, fixed in ((run_dir / "metrics.jsonl", None), (run_dir / "logs" / "perf.jsonl", "perf")):
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            try:
                row: dict[str, Any] = json.loads(line)
            except ValueError:  # a line cut short by a kill: the rest is good
                continue
            kind = fixed or row.get("kind")
            for name, v in row.items():
                if name in _NOT_CURVES or not isinstance(v, (int, float)) or isinstance(v, bool):
                    continue
                if fixed and name != "samples_per_s":
                    continue
                out.setdefault(f"{kind}/{name}" if kind else name, []).append((row["step"], v))
    return out


def draw(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw every curve of ``run_dir`` into ``out`` (default ``RUN_DIR/curves.png``), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    target = Path(out) if out else run_dir / "curves.png"
    curves = series(run_dir)
    if not curves:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl or logs/perf.jsonl with numbers in it")
    cols = min(3, len(curves))
    rows = -(-len(curves) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (name, points) in zip(axes.flat, sorted(curves.items())):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 20 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    fig.tight_layout()
    tmp = target.with_name(f".{target.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(target)
    return target


def cmd_curves(run_dir: Path, out: Path | None) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("launcher: error: drawing curves needs matplotlib\nHINT: pip install matplotlib",
              file=sys.stderr)
        return EXIT_FAILURE
    try:
        path = draw(run_dir, out)
    except (OSError, KeyError) as e:
        print(f"launcher: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"[launcher] wrote {path} ({len(series(run_dir))} curves)", file=sys.stderr)
    return EXIT_OK
