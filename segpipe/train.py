"""The training loop: seeded, early-stopped on validation Dice, checkpointed."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from segpipe import losses, models
from segpipe.config import TrainConfig
from segpipe.metrics import mean_dice

log = logging.getLogger(__name__)


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


def random_hflip(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror half of the samples left-right, image and every mask channel alike."""
    flip = torch.rand(len(x), generator=generator) < 0.5
    x, y = x.clone(), y.clone()
    x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
    return x, y


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])


def save_checkpoint(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    torch.save({"state_dict": model.state_dict(), "meta": meta}, path)


def fit(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    cfg: TrainConfig,
    out_dir: Path,
    device: torch.device,
    meta: dict[str, Any],
    tracker: MetricLogger | None = None,
) -> FitResult:
    """Train `model` on (x, y) tensors, keep the epoch with the best validation Dice.

    Writes best.pt and last.pt ({"state_dict", "meta"}) and train_state.pt (optimizer,
    scheduler, epoch, early-stopping state) into out_dir.
    """
    seed_everything(cfg.seed)
    model.to(device)
    loss_fn = losses.build(cfg.loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    x_train, y_train = train
    best_dice, best_epoch, epoch = -1.0, -1, -1

    for epoch in range(cfg.epochs):
        model.train()
        total = 0.0
        for idx in next_batches(len(x_train), cfg.batch_size, cfg.steps_per_epoch, shuffle):
            x, y = x_train[idx], y_train[idx]
            if cfg.hflip:
                x, y = random_hflip(x, y, shuffle)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x.to(device)), y.to(device))
            loss.backward()
            optimizer.step()
            total += loss.item()
        scheduler.step()

        val_pred = predict_logits(model, val[0], cfg.batch_size, device) > 0
        val_dice = mean_dice(val_pred.numpy(), val[1].numpy())
        train_loss = total / cfg.steps_per_epoch
        log.info("epoch %d: train loss %.4f, val dice %.4f", epoch, train_loss, val_dice)
        if tracker is not None:
            tracker.log_metric("train/loss", train_loss)
            tracker.log_metric("val/dice", val_dice)
            tracker.next_step()

        if val_dice > best_dice:
            best_dice, best_epoch = val_dice, epoch
            save_checkpoint(out_dir / "best.pt", model, {**meta, "epoch": epoch, "val_dice": val_dice})
        save_checkpoint(out_dir / "last.pt", model, {**meta, "epoch": epoch, "val_dice": val_dice})
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "best_dice": best_dice,
                "best_epoch": best_epoch,
            },
            out_dir / "train_state.pt",
        )
        if epoch - best_epoch >= cfg.patience:
            log.info("early stop at epoch %d: no better val dice since epoch %d", epoch, best_epoch)
            return FitResult(best_epoch, best_dice, epoch + 1, stopped_early=True)
    return FitResult(best_epoch, best_dice, epoch + 1, stopped_early=False)


def new_model(meta: dict[str, Any], seed: int) -> nn.Module:
    """The network `meta` describes, its initial weights fixed by the seed."""
    seed_everything(seed)
    return models.build(meta["arch"], meta["in_channels"], len(meta["classes"]), tuple(meta["channels"]))


def load_model(path: Path, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a network from a checkpoint alone: its meta names the architecture and shapes."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    meta = ckpt["meta"]
    model = new_model(meta, seed=0)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), meta
