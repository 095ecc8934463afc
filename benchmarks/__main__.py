"""Run the benchmarks side by side and write benchmarks/RESULTS.md (the README links it)."""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

from . import checkpoint, data, gpu, overhead, syncbn

ALL = {"syncbn": syncbn.run, "data": data.run, "checkpoint": checkpoint.run, "overhead": overhead.run,
       "gpu": gpu.run}


def main(names: list[str]) -> int:
    rows = []
    for name in names or list(ALL):
        print(f"[bench] {name} ...", flush=True)
        out = ALL[name]()
        rows += out if isinstance(out, list) else [out]
        for r in rows[-(len(out) if isinstance(out, list) else 1):]:
            print(f"  {r['name']}: {r['value']:.3f} (target {r['target']}) {r['detail']}", flush=True)
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.node()} ({platform.machine()}, "
        f"{len(__import__('os').sched_getaffinity(0))} cores), `python -m benchmarks`.",
        "",
        "| comparison | ratio | target | met | medians |",
        "|---|---|---|---|---|",
    ] + [f"| {r['name']} | {r['value']:.3f} | {r['target']} | {'yes' if r['ok'] else 'no'} | {r['detail']} |"
         for r in rows]
    Path("benchmarks/RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
