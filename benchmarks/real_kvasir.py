"""Real Kvasir-SEG through the real pipeline, against the bare MONAI baseline on the same held-out cases.

    python -m benchmarks.real_kvasir [--budget-minutes M] [--baseline-minutes 20] [--set KEY=VALUE ...]

In a temporary copy of this repository whose `datasets.kvasir.raw` points at a copy of the 300 real
pairs in ../shared/data, runs `dvc repro ensemble@kvasir` (ingest, labels, split, plan, train, infer,
ensemble) with the default plan and budget (params.yaml; `--budget-minutes` sets
plan.budget_minutes.kvasir, `--set` any other param, for experiments). A fixed 60 of the pairs
(benchmarks/kvasir_baseline.held_out_ids) are the split's test set through `split.test_list`: no
training and no threshold tuning sees them. The ensemble's masks of those 60 are scored at their
original size against the raw JPEG masks (> 127), per image, then averaged. In the same run the
baseline (benchmarks/kvasir_baseline.py) trains on the other 240 for `--baseline-minutes` and is
scored alike. Prints one JSON line: both scores, the chain's wall time per stage, and the plan.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks.common import copy_source_tree, emit
from benchmarks.kvasir_baseline import RAW, dice_iou, held_out_ids, read_image, predict_mask, read_truth, train_baseline
from segpipe.store import CaseStore

TARGETS = {"chain_minutes_at_most": 60, "dice_at_least": 0.80, "gain_over_baseline_at_least": 0.15}


def set_param(params: dict, dotted: str, value: object) -> None:
    *path, last = dotted.split(".")
    for key in path:
        params = params.setdefault(key, {})
    params[last] = value


def pipeline_repo(dest: Path, raw: Path, held_out: list[str], settings: dict[str, object]) -> None:
    """A git + DVC copy of this repository on the real pairs, Kvasir only, `held_out` as its test set."""
    copy_source_tree(dest)
    shutil.copytree(raw, dest / "raw" / "kvasir-seg")
    (dest / "held_out.txt").write_text("\n".join(held_out) + "\n")
    path = dest / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["datasets"] = {"kvasir": {**params["datasets"]["kvasir"], "raw": "raw/kvasir-seg"}}
    params["train"]["per_dataset"] = {k: v for k, v in params["train"]["per_dataset"].items() if k == "kvasir"}
    set_param(params, "split.test_list", {"kvasir": "held_out.txt"})
    for key, value in settings.items():
        set_param(params, key, value)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "real Kvasir benchmark"]):
        subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b", *args], cwd=dest, check=True)


def repro(repo: Path) -> dict[str, float]:
    """Run `dvc repro ensemble@kvasir`, streaming its output; the wall seconds of each stage."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "ensemble@kvasir"], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stages, current, started = {}, None, time.perf_counter()
    for line in proc.stdout:
        print(line, end="", file=sys.stderr)
        if line.startswith("Running stage '"):
            now = time.perf_counter()
            if current:
                stages[current] = round(now - started, 1)
            current, started = line.split("'")[1], now
    if proc.wait() != 0:
        sys.exit(f"error: dvc repro failed in {repo} (exit {proc.returncode}); see the output above")
    if current:
        stages[current] = round(time.perf_counter() - started, 1)
    return stages


def scores(predict, raw: Path, held_out: list[str]) -> dict[str, float]:
    pairs = [dice_iou(predict(case), read_truth(raw, case)) for case in held_out]
    dice, iou = np.mean(pairs, axis=0)
    return {"mean_dice": round(float(dice), 4), "mean_iou": round(float(iou), 4)}


def parse_settings(pairs: list[str]) -> dict[str, object]:
    """KEY=VALUE pairs, each value read as YAML (numbers, lists, null)."""
    return {key: yaml.safe_load(value) for key, value in (pair.split("=", 1) for pair in pairs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--raw", type=Path, default=RAW)
    p.add_argument("--budget-minutes", type=float, help="plan.budget_minutes.kvasir (default: params.yaml's)")
    p.add_argument("--baseline-minutes", type=float, default=20.0, help="0: no baseline (experiments)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other params, e.g. plan.res_units=2")
    p.add_argument("--keep", type=Path, help="run in this new folder and keep it (default: a temporary one)")
    args = p.parse_args()
    held_out = held_out_ids(args.raw)
    settings = parse_settings(args.set)
    if args.budget_minutes is not None:
        settings["plan.budget_minutes.kvasir"] = args.budget_minutes

    with tempfile.TemporaryDirectory() as tmp:
        repo = args.keep or Path(tmp)
        repo.mkdir(parents=True, exist_ok=True)
        pipeline_repo(repo, args.raw, held_out, settings)
        start = time.perf_counter()
        stages = repro(repo)
        chain_minutes = (time.perf_counter() - start) / 60
        ensemble = CaseStore(repo / "data" / "predictions" / "kvasir" / "ensemble.zarr")
        ours = scores(lambda case: ensemble.read(case, "mask")[0] > 0, args.raw, held_out)
        plan = json.loads((repo / "plans" / "kvasir.json").read_text())["plan"]

    train_ids = sorted({f.stem for f in (args.raw / "images").glob("*.jpg")} - set(held_out))
    result = {
        "benchmark": "real_kvasir", "held_out": len(held_out), "train_cases": len(train_ids), "settings": settings,
        "segpipe": {**ours, "chain_minutes": round(chain_minutes, 1), "stage_seconds": stages},
        "targets": TARGETS, "plan": {key: item["value"] for key, item in plan.items()},
    }
    if args.baseline_minutes > 0:
        baseline = train_baseline(args.raw, train_ids, args.baseline_minutes)
        theirs = scores(lambda case: predict_mask(baseline.model, read_image(args.raw, case)), args.raw, held_out)
        gain = round(ours["mean_dice"] - theirs["mean_dice"], 4)
        result |= {
            "baseline": {**theirs, "minutes": args.baseline_minutes, "steps": baseline.steps}, "dice_gain": gain,
            "met": {"chain_minutes": chain_minutes <= TARGETS["chain_minutes_at_most"],
                    "dice": ours["mean_dice"] >= TARGETS["dice_at_least"],
                    "gain": gain >= TARGETS["gain_over_baseline_at_least"]},
        }
    emit(result)


if __name__ == "__main__":
    main()
