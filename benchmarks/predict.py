"""Throughput of `segpipe predict` on the 300 real Kvasir images, against the members' bare forward passes.

    python -m benchmarks.predict [--repo TRAINED_REPO] [--budget-minutes 2]

Without --repo, a temporary copy of this repository first trains Kvasir on the real pairs (the set-up
of benchmarks/real_kvasir.py, with a short training budget: how fast a model predicts does not depend
on how well it learned, and the plan sizes it for the real images). Then, on the 300 real images as
an images-only folder, in the same run:
    predict  `python -m tasks.predict --dataset kvasir --input <folder> --out <dir>`, the whole command:
             start-up, JPEG decoding and ingest, every member's inference on Dask, the ensemble, PNG
             masks and overlays, the CSV;
    bare     each member's network alone, in this process with every core, on the same images already
             decoded, normalised and resized: as many forward passes as predict makes (a pass an image
             and view, test-time flips included), and nothing else.
Prints both rates in images/s and their ratio, bare seconds / predict seconds (target >= 0.7).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import emit, start_as_stages_do
from benchmarks.kvasir_baseline import RAW, held_out_ids, read_image
from benchmarks.real_kvasir import pipeline_repo, repro
from segpipe.config import InferConfig
from segpipe.infer_core import tta_logits
from segpipe.preprocess import frames_to_input, resize
from segpipe.train import load_model

TARGET_RATIO = 0.7


def bare_seconds(repo: Path, images: list[str], raw: Path) -> tuple[float, int]:
    """Seconds of every member's forward passes over `images` (inputs prepared beforehand), and the passes made."""
    recorded = json.loads((repo / "reports" / "kvasir" / "ensemble.json").read_text())
    plan = json.loads((repo / "plans" / "kvasir.json").read_text())["plan"]
    cfg = InferConfig(hflip=plan["hflip"]["value"], vflip=plan["vflip"]["value"])
    passes, seconds = 0, 0.0
    for member in recorded["members"]:
        model, meta = load_model(repo / "models" / "kvasir" / member["arch"] / f"fold{member['fold']}" / "best.pt",
                                 torch.device("cpu"))
        inputs = [resize(frames_to_input(read_image(raw, case)[None], meta["in_channels"]), meta["image_size"])
                  for case in images]
        with torch.inference_mode():
            start = time.perf_counter()
            for x in inputs:
                tta_logits(model, x, cfg.tta_flips())
            seconds += time.perf_counter() - start
        passes += len(inputs) * (1 + len(cfg.tta_flips()))
    return seconds, passes


def main() -> None:
    start_as_stages_do()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--raw", type=Path, default=RAW)
    p.add_argument("--repo", type=Path, help="a repo where ensemble@kvasir has run (default: train one here)")
    p.add_argument("--budget-minutes", type=float, default=2.0, help="training budget of the repo trained here")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        repo = args.repo
        if repo is None:
            repo = work / "repo"
            repo.mkdir()
            pipeline_repo(repo, args.raw, held_out_ids(args.raw), {"plan.budget_minutes.kvasir": args.budget_minutes})
            repro(repo)
        images = sorted(path.stem for path in (args.raw / "images").glob("*.jpg"))
        shutil.copytree(args.raw / "images", work / "new" / "images")  # images only: no masks/ beside them
        command = [sys.executable, "-m", "tasks.predict", "--dataset", "kvasir", "--input", str(work / "new"),
                   "--out", str(work / "out")]
        start = time.perf_counter()
        subprocess.run(command, cwd=repo, check=True, stdout=sys.stderr)
        predict = time.perf_counter() - start
        written = len(list((work / "out" / "masks").glob("*.png")))
        bare, passes = bare_seconds(repo, images, args.raw)
        plan = {key: item["value"] for key, item in
                json.loads((repo / "plans" / "kvasir.json").read_text())["plan"].items()
                if key in ("image_size", "channels", "hflip", "vflip")}
    ratio = bare / predict
    emit({"benchmark": "predict", "images": len(images), "masks_written": written, "plan": plan,
          "predict": {"seconds": round(predict, 2), "images_per_s": round(len(images) / predict, 2)},
          "bare": {"seconds": round(bare, 2), "images_per_s": round(len(images) / bare, 2), "forward_passes": passes},
          "ratio": round(ratio, 3), "target": TARGET_RATIO, "met": ratio >= TARGET_RATIO})


if __name__ == "__main__":
    main()
