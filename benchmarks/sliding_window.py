"""Tiled inference over Zarr vs its baselines, all on one model and measured in this run.

    python -m benchmarks.sliding_window [--model-size 256] [--small 2048] [--large 8192]   (from the repo root)

Prints one JSON line. Each measurement runs in its own child process, every child importing the same
libraries and loading the same model; the kernel's peak-RSS mark is then reset (/proc/self/clear_refs),
so peak RSS is the process's high-water mark during a first, cold run; times are the best of warm runs
after it (a 3-class MONAI UNet, one thread):
    tiled_<n>   segpipe.infer.predict_store on an n x n uint8 Zarr image (chunks 512), written to a
                prediction store: time and peak RSS, n = small and large
    monai       the small image read into memory, MONAI sliding_window_inference (same roi, overlap,
                gaussian blending, sw_batch_size), sigmoid, float16 and written to a store: the same
                work, with glibc malloc as a MONAI script gets it
    monai_tuned the same with malloc tuned as segpipe's stages start (tasks.common.MALLOC_ENV), to
                show how much of the difference that tuning makes
    forward     the model's forward pass alone on the same tiles, same batch size, malloc tuned: the
                fastest this model runs these tiles
The tiled runs start with malloc tuned, as the stages do.
Ratios: ratio_vs_forward = forward time / tiled time (1.0: tiling costs nothing beyond the model);
speed_ratio_vs_monai = MONAI time / tiled time (and speed_ratio_vs_monai_tuned); rss_ratio_vs_monai = tiled RSS / MONAI RSS;
rss_ratio_8192_vs_2048 = large RSS / small RSS (flat memory: close to 1).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from benchmarks.common import emit
from segpipe.config import InferConfig
from segpipe.infer import cached_model, predict_store
from segpipe.preprocess import frames_to_input, to_float16
from segpipe.store import CaseStore
from segpipe.tiling import Grid
from segpipe.train import new_model, save_checkpoint
from tasks.common import MALLOC_ENV

CFG = InferConfig(overlap=0.25, mode="gaussian", batch_size=4)
CHUNK = 512


def make_inputs(root: Path, model_size: int, sizes: list[int]) -> None:
    meta = {"arch": "unet", "classes": ["a", "b", "c"], "in_channels": 1, "image_size": [model_size] * 2,
            "channels": [16, 32, 64], "tile_scale": 1.0, "val_dice": 0.0}
    save_checkpoint(root / "model.pt", new_model(meta, 0), meta)
    rng = np.random.default_rng(0)
    for size in sizes:
        store = CaseStore.create(root / f"image{size}.zarr", dataset="bench", classes=["fg"])
        store.write_case("case", {"kind": "image"})
        # Smooth blobs plus noise: compresses like an X-ray, not like pure noise.
        coarse = rng.integers(0, 200, (size // 64, size // 64), dtype=np.uint8)
        image = np.kron(coarse, np.ones((64, 64), np.uint8)) + rng.integers(0, 40, (size, size), dtype=np.uint8)
        store.write_array("case", "image", image, chunk=CHUNK)


def reset_peak_rss() -> None:
    """Start the high-water mark afresh from the current RSS, so imports and model loading, the same
    in every child, do not mask what a run itself holds."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def cold_then_timed(fn, repeats: int) -> dict:
    """Peak RSS of a first, cold run (a warm-up's freed memory, kept by the allocator, would hide what
    the run itself holds), then the best time of `repeats` warm runs."""
    reset_peak_rss()
    fn()
    rss, best = peak_rss_mb(), float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return {"seconds": best, "peak_rss_mb": rss}


def child(kind: str, root: Path, size: int, repeats: int) -> dict:
    torch.set_num_threads(1)
    model, meta = cached_model(root / "model.pt", "cpu")
    tile = tuple(meta["image_size"])
    images = CaseStore(root / f"image{size}.zarr")
    if kind == "tiled":
        def run():
            predict_store(root / "model.pt", images, {"case": "test"}, root / f"pred{size}.zarr", CFG)
    elif kind in ("monai", "monai_tuned"):
        def run():
            x = frames_to_input(images.array("case", "image")[:][None], 1)
            with torch.inference_mode():
                logits = sliding_window_inference(x, tile, CFG.batch_size, model, overlap=CFG.overlap, mode=CFG.mode)
            out = CaseStore.create(root / f"monai{size}.zarr", dataset="bench", classes=meta["classes"])
            out.write_case("case", {"kind": "image"})
            out.write_array("case", "prob", to_float16(torch.sigmoid(logits)[0]), chunk=CHUNK)
    else:
        x = frames_to_input(images.array("case", "image")[:][None], 1)
        grid = Grid.of(x.shape[-2:], tile, CFG.overlap)
        tiles = torch.cat([x[..., y : y + tile[0], s : s + tile[1]] for y in grid.ys for s in grid.xs])

        def run():
            with torch.inference_mode():
                for i in range(0, len(tiles), CFG.batch_size):
                    model(tiles[i : i + CFG.batch_size])
    return cold_then_timed(run, repeats)


def measure(kind: str, root: Path, size: int, repeats: int) -> dict:
    tuned = MALLOC_ENV if kind != "monai" else {}
    env = {**{k: v for k, v in os.environ.items() if k not in MALLOC_ENV}, "OMP_NUM_THREADS": "1", **tuned}
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.sliding_window", "--child", kind, "--root", str(root), "--size", str(size), "--repeats", str(repeats)],
        check=True, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1],
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-size", type=int, default=256)
    p.add_argument("--small", type=int, default=2048)
    p.add_argument("--large", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs")
    p.add_argument("--child", choices=["tiled", "monai", "monai_tuned", "forward"], help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.root, args.size, args.repeats)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_inputs(root, args.model_size, [args.small, args.large])
        small = measure("tiled", root, args.small, args.repeats)
        large = measure("tiled", root, args.large, 0)
        monai = measure("monai", root, args.small, args.repeats)
        monai_tuned = measure("monai_tuned", root, args.small, args.repeats)
        forward = measure("forward", root, args.small, args.repeats)
    mpx = args.small**2 / 1e6
    emit({
        "benchmark": "sliding_window", "model_size": args.model_size, "small": args.small, "large": args.large, "threads": 1,
        "tiled_mpx_per_s": round(mpx / small["seconds"], 3),
        "forward_mpx_per_s": round(mpx / forward["seconds"], 3),
        "monai_mpx_per_s": round(mpx / monai["seconds"], 3),
        "ratio_vs_forward": round(forward["seconds"] / small["seconds"], 3),
        "speed_ratio_vs_monai": round(monai["seconds"] / small["seconds"], 3),
        "speed_ratio_vs_monai_tuned": round(monai_tuned["seconds"] / small["seconds"], 3),
        "rss_mb_small": round(small["peak_rss_mb"], 1), "rss_mb_large": round(large["peak_rss_mb"], 1),
        "rss_mb_monai": round(monai["peak_rss_mb"], 1), "rss_mb_forward": round(forward["peak_rss_mb"], 1),
        "rss_ratio_vs_monai": round(small["peak_rss_mb"] / monai["peak_rss_mb"], 3),
        "rss_ratio_8192_vs_2048": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
    })


if __name__ == "__main__":
    main()
