#!/usr/bin/env python3
"""Summarise several runs of one `nolock bench` (their `--json` files): for every cell and ratio, the median
over the runs of each run's median, with the smallest and largest run median.

Each run's median is itself the median of its `--reps` repetitions; the spread printed here is between runs
(separate processes, possibly minutes apart on a noisy machine), which is what a reader re-running the
command sees.

    for i in 1 2 3 4 5; do target/release/nolock bench rcu --json /tmp/rcu-$i.json; done
    python3 crates/nolock-cli/scripts/runs_summary.py /tmp/rcu-*.json
"""

import json
import statistics
import sys


def fmt(values):
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def main(paths):
    if not paths:
        sys.exit(__doc__)
    runs = [json.load(open(p)) for p in paths]
    cells, ratios = {}, {}
    for run in runs:
        for r in run.get("results", []):
            key = " | ".join(str(v) for k, v in r.items() if isinstance(v, str))
            cells.setdefault(key, []).append(r["median"])
        rs = run.get("ratios", {})
        for item in rs if isinstance(rs, list) else [rs]:
            label = item.get("workload", "")
            for k, v in item.items():
                if k != "workload" and v is not None:
                    ratios.setdefault(f"{label} {k}".strip(), []).append(v)
    print(f"{len(runs)} runs: median [min-max] of the runs' medians")
    width = max(len(k) for k in list(cells) + list(ratios))
    for k, v in cells.items():
        print(f"{k:<{width}}  {fmt(v)}  (n={len(v)})")
    print("ratios")
    for k, v in ratios.items():
        print(f"{k:<{width}}  {fmt(v)}  (n={len(v)})")


if __name__ == "__main__":
    main(sys.argv[1:])
