"""A benchmark of this working tree against the same benchmark of an earlier commit, run alternately.

    python -m benchmarks.against REF BENCHMARK [--runs 3] [-- BENCHMARK ARGS]   (from the repo root)

REF's tree is checked out in a temporary git worktree; the two runs of each pair follow one
another on the same machine, REF first, so that load from elsewhere falls on both alike. Prints
one JSON line: each run's figures for REF and for this tree, and for every numeric figure that
both print, its values side by side and `head / ref` of their medians.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT, emit


def run(tree: Path, benchmark: str, args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", f"benchmarks.{benchmark}", *args], cwd=tree, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def side_by_side(pairs: list[dict[str, dict]]) -> dict[str, dict]:
    """Every numeric figure both trees print: the values of each run and the ratio of the medians."""
    shared = [k for k, v in pairs[0]["ref"].items()
              if isinstance(v, (int, float)) and isinstance(pairs[0]["head"].get(k), (int, float))]
    figures = {}
    for key in shared:
        ref, head = [p["ref"][key] for p in pairs], [p["head"][key] for p in pairs]
        ratio = statistics.median(head) / statistics.median(ref) if statistics.median(ref) else None
        figures[key] = {"ref": ref, "head": head, "head_vs_ref": None if ratio is None else round(ratio, 3)}
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ref", help="the commit to compare with")
    p.add_argument("benchmark", help="a module of benchmarks/, e.g. train_throughput")
    p.add_argument("--runs", type=int, default=3)
    ns, args = p.parse_known_args()  # what follows `--` is the benchmark's own
    args = [a for a in args if a != "--"]
    ref = subprocess.run(["git", "rev-parse", "--short", ns.ref], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix=f"segpipe-{ref}-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), ref], cwd=ROOT, check=True, capture_output=True)
        try:
            pairs = [{"ref": run(tree, ns.benchmark, args), "head": run(ROOT, ns.benchmark, args)}
                     for _ in range(ns.runs)]
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)
    emit({"benchmark": f"{ns.benchmark}_against", "ref": ref, "runs": pairs, "figures": side_by_side(pairs)})


if __name__ == "__main__":
    main()
