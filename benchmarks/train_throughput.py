"""Training throughput: segpipe's fit loop against a bare PyTorch/MONAI loop, same model, batch and data.

    python -m benchmarks.train_throughput [--cases 48] [--size 128] [--batch 8] [--steps N] [--epochs 3]

Ours: `segpipe.train.fit` on `segpipe.data.training_set` reading a real Zarr store (whole-frame
mode: resized once, cached), seeded sampling, BCE+Dice, AdamW + cosine, top-k checkpoints,
last.pt with the full resume state each epoch, DVCLive logging. Augmentation off for the ratio
(the bare loop has none); `ratio_with_augment` adds the Kvasir recipe of params.yaml to ours.
Bare: preloaded tensors, randperm batches, the same loss, optimizer, schedule, no checkpoints or
logging. Both validate after each epoch on the same tensors, so validation is included in both.
Prints one JSON line; `ratio_vs_bare_loop` = our samples/s / bare samples/s (goal >= 0.9). Runs with
glibc's malloc settings, as dvc.yaml starts the train stage (both loops share the process).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dvclive import Live

from benchmarks.common import emit, start_as_stages_do
from segpipe import augment, losses
from segpipe.config import DatasetConfig, TrainConfig, load_params
from segpipe.data import load_samples, training_set, validation_batches
from segpipe.device import resolve_device
from segpipe.metrics import mean_dice
from segpipe.plan import PRESETS
from segpipe.store import CaseStore
from segpipe.train import fit, new_model, seed_everything

ROOT = Path(__file__).resolve().parents[1]


def write_store(path: Path, n: int, rng: np.random.Generator) -> CaseStore:
    """n RGB images of 200-320 px with one bright disc each, and their masks: a small Kvasir stand-in."""
    store = CaseStore.create(path, dataset="bench", classes=["disc"])
    for i in range(n):
        h, w = rng.integers(200, 320, 2)
        yy, xx = np.mgrid[:h, :w]
        cy, cx, r = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, rng.uniform(0.1, 0.25) * min(h, w)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)
        image = np.clip(70 + 110 * mask[..., None] + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        store.write_case(f"c{i:03d}", {"group": f"g{i}", "kind": "image"})
        store.write_array(f"c{i:03d}", "image", image)
        store.write_array(f"c{i:03d}", "mask", mask[None])
    return store


def bare_loop(model, x, y, val, cfg: TrainConfig, device: torch.device) -> None:
    """What a minimal PyTorch/MONAI script does: tensors in memory, nothing saved or logged."""
    model.to(device)
    loss_fn = losses.build(cfg.loss, cfg.loss_options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    generator = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.epochs):
        model.train()
        for _ in range(cfg.steps_per_epoch):
            idx = torch.randperm(len(x), generator=generator)[: cfg.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx].to(device)), y[idx].to(device))
            loss.backward()
            optimizer.step()
        scheduler.step()
        model.eval()
        with torch.no_grad():
            mean_dice(np.concatenate([(model(vx.to(device)) > 0).cpu().numpy() for vx, _ in val]),
                      np.concatenate([vy.numpy() for _, vy in val]))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    start_as_stages_do()  # as dvc.yaml starts the train stage
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=48)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, help="steps per epoch (default: train.steps_per_epoch of params.yaml)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each; the fastest counts")
    args = p.parse_args()

    params = load_params(ROOT / "params.yaml")
    device = resolve_device(params.device)
    steps = args.steps or params.train.steps_per_epoch  # per-epoch costs weigh as in a real run
    cfg = params.train.model_copy(update={
        "epochs": args.epochs, "steps_per_epoch": steps, "batch_size": args.batch, "patience": args.epochs,
        "per_dataset": {},
    })
    data = DatasetConfig(raw=Path("unused"), in_channels=3, image_size=(args.size, args.size))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = write_store(tmp / "bench.zarr", args.cases, np.random.default_rng(0))
        cases = store.case_ids()
        train_cases, val_cases = cases[: -args.batch], cases[-args.batch :]
        val = validation_batches(store, store, val_cases, data, args.batch)
        x, y = load_samples(store, store, train_cases, data.image_size, data.in_channels)
        y = y.float()
        meta = {"arch": "unet", "classes": ["disc"], "in_channels": 3, "image_size": [args.size] * 2,
                "channels": list(cfg.channels)}
        kvasir_augment = augment.build(PRESETS["colour"])  # what the plan gives colour images

        def ours(aug, run: str) -> None:
            out = tmp / run
            out.mkdir()
            train = training_set(store, store, train_cases, data, cfg.foreground_fraction, aug)
            with Live(str(tmp / f"{run}.live"), save_dvc_exp=False, dvcyaml=None) as live:
                fit(new_model(meta, cfg.seed), train, val, cfg, out, device, meta, tracker=live)

        def bare() -> None:
            seed_everything(cfg.seed)
            bare_loop(new_model(meta, cfg.seed), x, y, val, cfg, device)

        times = {"ours": [], "bare": [], "ours_augment": []}
        for r in range(args.repeats):
            times["bare"].append(timed(bare))
            times["ours"].append(timed(lambda: ours(None, f"plain{r}")))
            times["ours_augment"].append(timed(lambda: ours(kvasir_augment, f"augment{r}")))

    samples = args.epochs * steps * args.batch
    rate = {k: samples / min(v) for k, v in times.items()}
    emit({
        "benchmark": "train_throughput", "device": str(device), "torch_threads": torch.get_num_threads(),
        "image_size": args.size, "batch": args.batch, "steps": args.epochs * steps, "augment": False,
        "validation": "each epoch, in both", "samples_per_s_ours": round(rate["ours"], 2),
        "samples_per_s_bare": round(rate["bare"], 2), "ratio_vs_bare_loop": round(rate["ours"] / rate["bare"], 3),
        "samples_per_s_ours_augment": round(rate["ours_augment"], 2),
        "ratio_with_augment": round(rate["ours_augment"] / rate["bare"], 3),
    })


if __name__ == "__main__":
    main()
