"""Run the benchmarks side by side and update benchmarks/RESULTS.md (the README links it).

``python -m benchmarks`` runs them all; ``python -m benchmarks NAME ...`` runs those and replaces only their
rows, keeping the other benchmarks' rows from their latest run (the last columns say which run and when).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

from . import checkpoint, data, figures, fsdp, gpu, multinode, overhead, syncbn

ALL = {"syncbn": syncbn.run, "data": data.run, "checkpoint": checkpoint.run, "overhead": overhead.run,
       "multinode": multinode.run, "fsdp": fsdp.run, "figures": figures.run, "gpu": gpu.run}
RESULTS = Path("benchmarks/RESULTS.md")
HEADER = ["| comparison | ratio | target | met | medians | benchmark | measured |",
          "|---|---|---|---|---|---|---|"]


def kept_rows(path: Path, rerun: set[str]) -> dict[str, list[str]]:
    """The table rows of ``path`` per benchmark name, except those being run again (old-format rows: none)."""
    rows: dict[str, list[str]] = {}
    if path.exists():
        for line in path.read_text().splitlines()[len(HEADER) + 2:]:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 7 and cells[5] in ALL and cells[5] not in rerun:
                rows.setdefault(cells[5], []).append(line)
    return rows


def main(names: list[str]) -> int:
    unknown = [n for n in names if n not in ALL]
    if unknown:
        print(f"unknown benchmark {', '.join(unknown)}: choose from {' '.join(ALL)}", file=sys.stderr)
        return 2
    names = names or list(ALL)
    rows = kept_rows(RESULTS, set(names))
    today = time.strftime("%Y-%m-%d")
    for name in names:
        print(f"[bench] {name} ...", flush=True)
        out = ALL[name]()
        rows[name] = []
        for r in out if isinstance(out, list) else [out]:
            print(f"  {r['name']}: {r['value']:.3f} (target {r['target']}) {r['detail']}", flush=True)
            met = "yes" if r["ok"] else "no"
            rows[name].append(f"| {r['name']} | {r['value']:.3f} | {r['target']} | {met} | {r['detail']} "
                              f"| {name} | {today} |")
    machine = f"{platform.node()} ({platform.machine()}, {len(os.sched_getaffinity(0))} cores)"
    lines = [
        (f"Measured on {machine} by `python -m benchmarks [NAME ...]`; each row is from the latest run of"
         " its benchmark."),
        "",
        *HEADER,
        *(row for name in ALL for row in rows.get(name, [])),
    ]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
