#!/usr/bin/env python3
"""Print the Markdown tables of docs/performance.md from a benchmarks/run.py result.

    python benchmarks/table.py [benchmarks/results/latest.json]

Times are medians with their min-max spread; `xN` is the speed relative to native; a
rofs cell is bold where rofs is at least as fast as fuse-overlayfs.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
NO_RATIO = {"seq_read_cold", "copyup_small", "copyup_big"}  # see docs/performance.md


def cell(row: dict, name: str) -> str:
    r = row["results"].get(name)
    if r is None:
        return "-"
    text = "%.3f" % r["median_s"] if r["median_s"] >= 0.01 else "%.4f" % r["median_s"]
    ratio = r.get("ratio_to_native")
    if name != "native" and ratio is not None and row["workload"] not in NO_RATIO:
        text += " x%.2f" % ratio
    if name.startswith("rofs") and r.get("ratio_to_fuse-overlayfs", 0) >= 1:
        text = "**%s**" % text
    return text


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else os.path.join(HERE, "results", "latest.json")
    with open(path) as f:
        data = json.load(f)
    names = data["filesystems"]
    print("| workload | %s |" % " | ".join(names))
    print("|---|" + "---|" * len(names))
    for row in data["workloads"]:
        print("| %s | %s |" % (row["workload"], " | ".join(cell(row, n) for n in names)))
    for ours in ("rofs", "rofs-noopen"):
        for ref in ("fuse-overlayfs", "kernel-overlayfs"):
            ratios = sorted(((row["results"][ours].get("ratio_to_" + ref), row["workload"])
                             for row in data["workloads"] if ours in row["results"]),
                            key=lambda x: -(x[0] or 0))
            if any(r for r, _ in ratios):
                print("\n%s against %s (their time / %s time): %s" % (
                    ours, ref, ours, ", ".join(("**%s %.2f**" if r >= 1 else "%s %.2f") %
                                               (w, r) for r, w in ratios if r)))
    costs = [(row["workload"], row["results"]["rofs"]["log_cost"]) for row in data["workloads"]
             if "log_cost" in row["results"].get("rofs", {})]
    if costs:
        print("\nThe write log's cost (rofs time / rofs --no-log time): " + ", ".join(
            "%s %.2f" % c for c in costs))
    fuse = [n for n in names if n in ("fuse-overlayfs", "unionfs-fuse", "rofs",
                                      "rofs-noopen")]
    if any(row["results"].get("rofs", {}).get("fuse_requests") for row in data["workloads"]):
        print("\n| workload | %s |" % " | ".join(fuse))
        print("|---|" + "---|" * len(fuse))
        for row in data["workloads"]:
            reqs = [row["results"].get(n, {}).get("fuse_requests") for n in fuse]
            print("| %s | %s |" % (row["workload"], " | ".join(
                "-" if not q else ("%.2f" % q["per_op"] if q["per_op"] < 100 else
                                   "%d" % q["per_op"]) for q in reqs)))
    if data.get("memory"):
        print("\n| daemon | entries | idle | after the walk | after the kernel forgot |")
        print("|---|---|---|---|---|")
        for name, m in data["memory"].items():
            print("| %s | %d | %s |" % (name, m["entries"], " | ".join(
                "%.0f MiB" % (m[k] / 1024) if m[k] else "?"
                for k in ("idle_kib", "after_walk_kib", "after_forget_kib"))))
    if data.get("peak_rss_kib"):
        print("\nPeak daemon RSS over the timed workloads: " + ", ".join(
            "%s %d MiB" % (k, v // 1024) for k, v in data["peak_rss_kib"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
