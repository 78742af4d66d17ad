"""Teacher-student refinement of pseudo-labels (params `pseudolabel.rounds`).

Round 0 is the classical labeller (segpipe.pseudolabel). Each round r >= 1:

1. A student (segpipe.models by name, trained by segpipe.train.fit on whole frames at
   pseudolabel.student.image_size, no augmentation) learns from the kept frames of round r-1. A
   seeded `val_fraction` of the groups (speakers) is held out whole for early stopping, scored against
   round r-1's labels: the only labels there are.
2. The student relabels every steady-state frame of every video (segpipe.infer.predict_frames).
   The mask is its raw prediction, p > 0.5, with no post-processing: a round's Dice against the
   truth over all steady-state frames *is* its student's, before any confidence filtering.
3. A frame's confidence is its crispness: the share of its possibly-airway pixels (p > 0.1) that
   are surely airway (p > 0.9). 1 where the student is sure of every airway pixel it sees, low
   where it hedges (a blurred boundary, an airway it half recognises), 0 for an empty mask.
   Frames with confidence >= `min_confidence` are kept, as in round 0.

Warm-up frames stay unlabelled (empty mask, confidence 0, not kept) in every round. A round that
keeps no frame stops the stage: its store could not train anything. Every student starts from
`student.seed`, so a round is reproducible on its own.

Layout of the rounds folder, one DVC-cached out of the `labels` stage:
    round0.zarr, round1.zarr, ...   each round's labels store, laid out as round 0's
                                    (mask, confidence, keep per case; attrs `student` from round 1)
    round<k>.student/best.pt        the student of round k
The final round is linked (hard links, no copy) to the labels store training reads.

One stage runs every round, rather than a stage per round: the number of rounds is a param, and
dvc.yaml cannot make stages from a count; the `labels` stage is a foreach over datasets, so per-round
stages would exist, empty, for datasets with given masks too. All rounds rerun together, and only
when the `pseudolabel` params, the dataset's params, the device or the code they run change; the
student's settings live in `pseudolabel.student`, so tuning `train:` leaves the labels cached.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segpipe import models
from segpipe.atomic import Owner, atomic_dir
from segpipe.config import DatasetConfig, InferConfig, PseudolabelConfig, StudentConfig
from segpipe.data import training_set, validation_batches
from segpipe.errors import ConfigError
from segpipe.infer_core import predict_frames
from segpipe.pseudolabel import CLASSES, pseudolabel_store, write_labelled_video
from segpipe.store import CaseStore, labelled_frames
from segpipe.train import fit, load_model, new_model

log = logging.getLogger(__name__)

UNSURE, SURE = 0.1, 0.9  # probability bounds of "possibly" and "surely" airway (crispness)


def refine(images: CaseStore, out: Path, cfg: PseudolabelConfig, data: DatasetConfig,
           device: torch.device) -> list[CaseStore]:
    """Round 0 and `cfg.rounds` student rounds into the folder `out` (replaced atomically); the
    stores of every round, in order."""
    if cfg.rounds and data.tile_scale is not None:
        raise ConfigError("pseudolabel.rounds: teacher-student rounds need whole-frame models (tile_scale: null)")
    with atomic_dir(Path(out), Owner("labels", images.attrs.get("dataset", "unknown"))) as tmp:
        teacher = pseudolabel_store(images, tmp / "round0.zarr", cfg)
        for r in range(1, cfg.rounds + 1):
            teacher = student_round(images, teacher, tmp, r, cfg, data, device)
    return [CaseStore(Path(out) / f"round{r}.zarr") for r in range(cfg.rounds + 1)]


def student_round(images: CaseStore, teacher: CaseStore, folder: Path, r: int, cfg: PseudolabelConfig,
                  data: DatasetConfig, device: torch.device) -> CaseStore:
    """Train round r's student on `teacher`'s kept frames, and write its labels as `round<r>.zarr`."""
    train_cases, val_cases = hold_out_groups(teacher, cfg.student.val_fraction, cfg.student.seed)
    model, meta, info = train_student(images, teacher, train_cases, val_cases, folder / f"round{r}.student",
                                      cfg.student, data, device)
    log.info("round %d: student trained on %d frames, best val Dice %.3f at epoch %d", r,
             info["train_frames"], info["best_val_dice"], info["best_epoch"])
    labels = relabel(images, teacher.case_ids(), model, meta, folder / f"round{r}.zarr", cfg, device,
                     {"round": r, "val_cases": val_cases, **info})
    # A store without one trusted frame would only fail later, in training, far from the cause.
    if not any(labelled_frames(labels, c).size for c in labels.case_ids()):
        raise ConfigError(
            f"{images.path}: round {r}'s student is sure of no frame (confidence below pseudolabel.min_confidence="
            f"{cfg.min_confidence} everywhere; best validation Dice {info['best_val_dice']:.3f}): train it longer "
            f"(pseudolabel.student) or run fewer pseudolabel.rounds"
        )
    return labels


def hold_out_groups(labels: CaseStore, fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Cases split (train, val) by whole groups: a seeded `fraction` of the groups, at least one,
    validates, so early stopping judges speakers the student never saw."""
    groups = {c: str(labels.case_attrs(c).get("group", c)) for c in labels.case_ids()}
    names = sorted(set(groups.values()))
    if len(names) < 2:
        raise ConfigError(f"{labels.path}: teacher-student rounds need at least 2 groups (speakers); found {names}")
    n_val = min(len(names) - 1, max(1, round(fraction * len(names))))
    val = set(np.random.default_rng(seed).choice(names, n_val, replace=False).tolist())
    return [c for c, g in groups.items() if g not in val], [c for c, g in groups.items() if g in val]


def train_student(images: CaseStore, teacher: CaseStore, train_cases: list[str], val_cases: list[str],
                  out: Path, cfg: StudentConfig, data: DatasetConfig,
                  device: torch.device) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """The best epoch's student (by validation Dice), its meta, and what its training did."""
    data = data.model_copy(update={"image_size": tuple(cfg.image_size), "tile_scale": None})
    models.check_input_size(cfg.arch, tuple(cfg.channels), data.image_size)
    meta = {
        "arch": cfg.arch, "dataset": teacher.attrs.get("dataset"), "fold": 0, "classes": teacher.classes,
        "in_channels": data.in_channels, "image_size": list(data.image_size), "channels": list(cfg.channels),
        "tile_scale": None,
    }
    train = training_set(images, teacher, train_cases, data, foreground_fraction=0.0)
    val = validation_batches(images, teacher, val_cases, data, cfg.batch_size)
    out.mkdir(parents=True)
    result = fit(new_model(meta, cfg.seed), train, val, cfg.train_config(), out, device, meta)
    # Only the best weights are worth caching: last.pt (resume state) and top/ are training's scratch.
    (out / "last.pt").unlink()
    shutil.rmtree(out / "top")
    model, meta = load_model(out / "best.pt", device)
    info = {"train_frames": len(train), "image_size": list(data.image_size), "best_val_dice": result.best_dice,
            "best_epoch": result.best_epoch, "epochs_run": result.epochs_run}
    return model, meta, info


def relabel(images: CaseStore, case_ids: list[str], model: nn.Module, meta: dict[str, Any], out: Path,
            cfg: PseudolabelConfig, device: torch.device, student: dict[str, Any]) -> CaseStore:
    """The student's labels of every steady-state frame, laid out as segpipe.pseudolabel's store."""
    infer = InferConfig(batch_size=cfg.student.batch_size)
    with atomic_dir(out, Owner("labels", images.attrs.get("dataset", "unknown"))) as tmp:
        store = CaseStore.create(tmp, dataset=images.attrs.get("dataset", "unknown"), classes=CLASSES,
                                 origin="teacher_student", pseudolabel=cfg.model_dump(), student=student)
        for case_id in case_ids:
            attrs = images.case_attrs(case_id)
            frames = images.read(case_id, "image")
            warmup = min(int(attrs.get("warmup_frames", 0)), len(frames))
            masks = np.zeros((len(frames), 1) + frames.shape[1:3], np.uint8)
            confidence = np.zeros(len(frames), np.float32)
            if warmup < len(frames):
                prob = predict_frames(model, frames[warmup:], meta, infer, device)[:, 0].astype(np.float32)
                masks[warmup:, 0] = prob > 0.5
                confidence[warmup:] = crispness(prob)
            write_labelled_video(store, case_id, attrs, masks, confidence, warmup, cfg.min_confidence)
    return CaseStore(out)


def crispness(prob: np.ndarray) -> np.ndarray:
    """(T, H, W) probabilities -> (T,) float32: the share of possibly-airway pixels (p > UNSURE)
    that are surely airway (p > SURE); 0 for a frame without any."""
    possible = (prob > UNSURE).sum(axis=(1, 2))
    sure = (prob > SURE).sum(axis=(1, 2))
    return np.where(possible > 0, sure / np.maximum(possible, 1), 0.0).astype(np.float32)


def link_store(source: CaseStore, out: Path) -> CaseStore:
    """A copy of `source` at `out` (replaced atomically) made of hard links: the final round becomes
    the labels store without rewriting a byte."""
    with atomic_dir(Path(out), Owner("labels", source.attrs.get("dataset", "unknown"))) as tmp:
        store = CaseStore.create(tmp, **source.attrs)
        for case_id in source.case_ids():
            store.link_case(source, case_id)
    return CaseStore(out)
