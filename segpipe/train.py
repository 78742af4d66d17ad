"""The training loop: seeded, early-stopped on validation Dice, top-k checkpointed, resumable.

Files in the output directory:
    top/epochNNN.pt  the k best epochs by validation Dice ({"state_dict", "meta"}); with ema_decay, the
                     moving average of the weights, which is what was validated
    best.pt          a copy of the best of them, written when training ends
    last.pt          the latest epoch, plus everything a resumed run needs under "resume": optimizer,
                     scheduler, AMP scaler, every RNG, the top-k ranking, the early-stopping state, the
                     metrics of every epoch so far, and what the run was made from (settings, inputs)

A resumed run replays the metrics of the epochs it continues after into its tracker, so a tracker
that starts empty (DVCLive's folder, which DVC deletes before it reruns a stage) ends as an
uninterrupted run's would.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from segpipe import losses, models
from segpipe.config import TrainConfig
from segpipe.data import TrainingSet
from segpipe.errors import ConfigError
from segpipe.metrics import confusion, scores

log = logging.getLogger(__name__)

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
SCHEDULES = {
    "cosine": lambda opt, cfg: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs),
    "poly": lambda opt, cfg: torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=cfg.epochs, power=cfg.poly_power),
}
METRICS = ("train/loss", "val/dice", "train/lr")  # logged every epoch, in this order
# never: start at epoch 0; auto: resume last.pt when it was made from the same settings and inputs,
# else start at epoch 0 (logged); require: resume, or raise ConfigError saying why not.
Resume = Literal["never", "auto", "require"]


class MetricLogger(Protocol):
    """What the loop needs from a tracker (DVCLive's `Live` fits)."""

    def log_metric(self, name: str, val: float) -> None: ...
    def next_step(self) -> None: ...


@dataclass
class FitResult:
    best_epoch: int
    best_dice: float
    epochs_run: int
    stopped_early: bool
    resumed_from: int | None = None  # the last finished epoch a resumed run started after


def next_batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """`steps` batches of indices into n samples, drawn from successive seeded permutations, so
    every sample is seen equally often however the steps fall across epochs (nnU-Net style:
    an epoch is a fixed number of steps, not one pass over a possibly tiny dataset)."""
    pending = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # cuBLAS is deterministic only with a fixed workspace (read when CUDA starts; harmless on CPU).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG a run draws from, in types `torch.load(weights_only=True)` reads back."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(), "loop": generator.get_state(), "python": random.getstate(),
        "numpy": (kind, key.tolist(), pos, has_gauss, gauss),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["loop"])
    random.setstate(state["python"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(key, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(obj: Any, path: Path) -> None:
    """torch.save through a temporary file: a kill never leaves a half-written checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def plain(obj: Any) -> Any:
    """A copy of nested dicts, lists and tuples that shares no container and interns every string.
    Pickle writes an object it met before as a reference to it, so without this last.pt's bytes
    would depend on which objects a resumed run loaded from a checkpoint rather than built, and the
    output would differ from an uninterrupted run's (DVC compares outputs by their bytes)."""
    if isinstance(obj, str):
        return sys.intern(obj)
    if isinstance(obj, dict):
        return {plain(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj


def save_checkpoint(path: Path, model: nn.Module, meta: dict[str, Any], **extra: Any) -> None:
    save({"state_dict": model.state_dict(), "meta": meta, **extra}, path)


class TopK:
    """The k best epochs by validation Dice as top/epochNNN.pt; ties keep the earlier epoch."""

    def __init__(self, out_dir: Path, k: int, ranking: list[tuple[float, int]] | None = None):
        self.dir, self.k = out_dir / "top", k
        self.dir.mkdir(exist_ok=True)
        self.ranking = [tuple(r) for r in ranking or []]  # (dice, epoch), best first
        self.evicted: list[int] = []
        # Files of an epoch whose run was killed before last.pt recorded it are not part of the ranking.
        kept = {self.path(e).name for _, e in self.ranking}
        for f in self.dir.iterdir():
            if f.name not in kept:
                f.unlink()

    def path(self, epoch: int) -> Path:
        return self.dir / f"epoch{epoch:03d}.pt"

    @property
    def best(self) -> tuple[float, int]:
        return self.ranking[0] if self.ranking else (-1.0, -1)

    def offer(self, epoch: int, dice: float, model: nn.Module, meta: dict[str, Any]) -> None:
        ranking = sorted(self.ranking + [(dice, epoch)], key=lambda r: (-r[0], r[1]))
        self.ranking, dropped = ranking[: self.k], ranking[self.k :]
        if (dice, epoch) in self.ranking:
            save_checkpoint(self.path(epoch), model, meta)
        self.evicted += [e for _, e in dropped if e != epoch]

    def prune(self) -> None:
        """Delete evicted epochs; called once last.pt recorded the new ranking."""
        for epoch in self.evicted:
            self.path(epoch).unlink(missing_ok=True)
        self.evicted = []


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, roi: tuple[int, int], batch_size: int, amp: bool) -> torch.Tensor:
    """Logits of a batch: one forward pass at the model's size, MONAI's sliding window when larger."""
    with torch.autocast(device_type=x.device.type, enabled=amp):
        if tuple(x.shape[-2:]) == tuple(roi):
            return model(x).float()
        return sliding_window_inference(x, roi, batch_size, model, overlap=0.25, mode="gaussian").float()


def validate(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], roi: tuple[int, int],
    batch_size: int, device: torch.device, amp: bool,
) -> float:
    """Mean Dice over validation samples and classes, as metrics.mean_dice counts it."""
    model.eval()
    dice = [
        scores(confusion((predict_logits(model, x.to(device), roi, batch_size, amp) > 0).cpu().numpy(), y.numpy()))["dice"]
        for x, y in batches
    ]
    return float(np.concatenate(dice).mean())


def train_step(
    model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], device: torch.device, amp: bool,
) -> float:
    x, y, w = (t.to(device) if t is not None else None for t in batch)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.type, enabled=amp):
        logits = model(x)
    # The loss in float32: sums over many pixels lose too much in float16.
    loss = losses.output_loss(loss_fn, logits.float(), y, w)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.item()


def files_digest(files: Iterable[Path], root: Path) -> str:
    """sha256 of files, by their paths relative to `root` and their bytes: the same in every copy of
    the repository, so that last.pt, which records it, is too (DVC compares outputs by content)."""
    total = hashlib.sha256()
    for path in sorted(Path(f) for f in files):
        with path.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        total.update(f"{path.relative_to(root).as_posix()}\0{digest}\n".encode())
    return total.hexdigest()


def folder_digest(folder: Path) -> str:
    """files_digest of every file under `folder`: a Zarr store read as plain files, so any change
    to its arrays or attrs changes the digest, whatever wrote it."""
    folder = Path(folder)
    return files_digest((p for p in folder.rglob("*") if p.is_file()), folder)


def run_key(config: dict[str, Any], meta: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """What a run is made from, flat, so that a refusal can name each difference."""
    return {**config, **{f"meta.{k}": v for k, v in meta.items()}, **{f"inputs.{k}": v for k, v in inputs.items()}}


def resume_state(out_dir: Path, cfg: TrainConfig, meta: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """The state last.pt holds for resuming, after checking it was made with the same settings and
    inputs; a ConfigError says why not."""
    path = out_dir / "last.pt"
    if not path.exists():
        raise ConfigError(f"{path}: no checkpoint to resume")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt["resume"]
    # A checkpoint of an earlier segpipe records no inputs: each `inputs.` key then differs.
    saved = run_key(state["config"], state["meta"], state.get("inputs", {}))
    now = run_key(cfg.model_dump(mode="json"), meta, inputs)
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if changed:
        raise ConfigError(f"{path}: cannot resume, made with different settings or inputs: {', '.join(changed)}")
    return {**state, "state_dict": ckpt["state_dict"]}


def checkpoint_to_resume(
    out_dir: Path, cfg: TrainConfig, meta: dict[str, Any], inputs: dict[str, Any], resume: Resume,
) -> dict[str, Any] | None:
    """resume_state as `resume` asks: None to start at epoch 0 (for "auto", with one line saying why)."""
    if resume == "never":
        return None
    try:
        return resume_state(out_dir, cfg, meta, inputs)
    except ConfigError as exc:
        if resume == "require":
            raise
        log.info("starting at epoch 0: %s", exc)
        return None


def record(tracker: MetricLogger, values: tuple[float, ...]) -> None:
    """Log one epoch's METRICS and close its step."""
    for name, value in zip(METRICS, values):
        tracker.log_metric(name, value)
    tracker.next_step()


def fit(
    model: nn.Module,
    train: TrainingSet,
    val: list[tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    out_dir: Path,
    device: torch.device,
    meta: dict[str, Any],
    tracker: MetricLogger | None = None,
    resume: Resume = "never",
    progress: Callable[[int, int], None] | None = None,
    inputs: dict[str, Any] | None = None,
) -> FitResult:
    """Train `model` on `train`, keep the k epochs with the best validation Dice (see module doc).

    resume (see Resume): continue the run whose last.pt lies in out_dir; on CPU the result is
    bitwise the one an uninterrupted run gives. inputs: what else the run is made from besides cfg
    and meta (digests of the data and code, settings from elsewhere); last.pt records it, and only
    a run made from equal ones is resumed. `progress(done_steps, total_steps)` is called after every step.
    """
    inputs = inputs or {}
    seed_everything(cfg.seed)
    model.to(device)
    amp = cfg.amp and device.type == "cuda"
    loss_fn = losses.build(cfg.loss, cfg.loss_options)
    weight_map = loss_fn.weight_map if getattr(loss_fn, "needs_weight_map", False) else None
    optimizer = OPTIMIZERS[cfg.optimizer](model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = SCHEDULES[cfg.schedule](optimizer, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    generator = torch.Generator().manual_seed(cfg.seed)
    # The moving average is what is validated and kept; the trained weights go on only in last.pt.
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
           if cfg.ema_decay else None)
    evaluated = ema.module if ema is not None else model
    roi = tuple(meta["image_size"])
    start, stopped, ranking, history = 0, False, None, []
    state = checkpoint_to_resume(out_dir, cfg, meta, inputs, resume)
    if state is not None:
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], generator)
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start, stopped, ranking, history = state["epoch"] + 1, state["stopped"], state["top"], state["history"]
        log.info("resuming after epoch %d", state["epoch"])
    if tracker is not None:
        for values in history:
            record(tracker, values)
    top = TopK(out_dir, cfg.top_k, ranking)
    total_steps, epoch = cfg.epochs * cfg.steps_per_epoch, start - 1

    for epoch in range(start, cfg.epochs if not stopped else start):
        model.train()
        total = 0.0
        for step, idx in enumerate(next_batches(len(train), cfg.batch_size, cfg.steps_per_epoch, generator)):
            batch = train.batch(idx, generator, weight_map)
            total += train_step(model, loss_fn, optimizer, scaler, batch, device, amp)
            if ema is not None:
                ema.update_parameters(model)
            if progress is not None:
                progress(epoch * cfg.steps_per_epoch + step + 1, total_steps)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()

        val_dice = validate(evaluated, val, roi, cfg.batch_size, device, amp)
        train_loss = total / cfg.steps_per_epoch
        log.info("epoch %d: train loss %.4f, val dice %.4f, lr %.3g", epoch, train_loss, val_dice, lr)
        history.append((train_loss, val_dice, lr))
        if tracker is not None:
            record(tracker, history[-1])

        epoch_meta = {**meta, "epoch": epoch, "val_dice": val_dice}
        top.offer(epoch, val_dice, evaluated, epoch_meta)
        stopped = epoch - top.best[1] >= cfg.patience
        save_checkpoint(out_dir / "last.pt", model, epoch_meta, resume=plain({
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "rng": rng_state(generator), "epoch": epoch, "stopped": stopped, "top": top.ranking,
            "config": cfg.model_dump(mode="json"), "meta": meta, "inputs": inputs, "history": history,
            "ema": ema.state_dict() if ema is not None else None,
        }))
        top.prune()
        if stopped:
            log.info("early stop at epoch %d: no better val dice since epoch %d", epoch, top.best[1])
            break

    best_dice, best_epoch = top.best
    tmp = out_dir / ".best.pt.tmp"
    shutil.copyfile(top.path(best_epoch), tmp)
    os.replace(tmp, out_dir / "best.pt")
    return FitResult(best_epoch, best_dice, epoch + 1, stopped, start - 1 if state is not None else None)


def new_model(meta: dict[str, Any], seed: int, encoder_weights: Path | None = None) -> nn.Module:
    """The network `meta` describes, its initial weights fixed by the seed (and encoder_weights, if any)."""
    seed_everything(seed)
    extra = {key: meta[key] for key in ("encoder", "res_units") if key in meta}
    return models.build(
        meta["arch"], meta["in_channels"], len(meta["classes"]), tuple(meta["channels"]),
        encoder_weights=encoder_weights, **extra,
    )


def load_model(path: Path, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a network from a checkpoint alone: its meta names the architecture and shapes."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    meta = ckpt["meta"]
    model = new_model(meta, seed=0)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), meta
