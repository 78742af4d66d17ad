"""The plan: every setting of training and inference derived from the dataset's fingerprint
(segpipe/fingerprint.py), the device and params' `plan:` rules, as nnU-Net plans from its own.

Each planned value is recorded with its source and the reason:
    rule         derived from the fingerprint by the rule the reason states
    measurement  derived from a step time measured on this device (segpipe/step_time.py)
    override     set in params.yaml, which always wins
    fixed        the only choice segpipe implements

The plan file holds no time stamps or paths that change between runs: planning the same data with
the same params on the same kind of machine writes the same bytes, so the stages that depend on it
(train, infer, ensemble) do not rerun.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from segpipe.config import DatasetAugment, DatasetConfig, EnsembleConfig, InferConfig, Params, PlanConfig, TrainConfig
from segpipe.errors import ConfigError
from segpipe.step_time import step_seconds

# Augmentation presets, one per kind of image the fingerprint tells apart.
PRESETS: dict[str, DatasetAugment] = {
    # Colour endoscopy and similar photographs: no up or down, colour varies with the light.
    "colour": DatasetAugment(hflip=0.5, vflip=0.5, affine=0.5, color_jitter=0.8),
    # A video of one anatomy seen from one side (rtMRI): it always faces one way; small moves only.
    "video": DatasetAugment(affine=0.3, scale=(0.95, 1.05), rotate=5, translate=0.03),
    # Grey still images (X-rays): left and right are mirror images; exposure varies.
    "grey": DatasetAugment(hflip=0.5, affine=0.3, clahe=0.3),
}
TUNE_MIN_FRAMES, FINE_GRID_FRAMES = 10, 50  # labelled frames behind tuned thresholds
MIN_PATIENCE = 6  # epochs without a better validation Dice before training stops
SCALE_STEPS = 32  # tile scales are multiples of 1/32: coarse, so a slightly different dataset keeps its plan
SIZE_MULTIPLE = 16  # input sides are multiples of this (and of the network's downsampling)
BOTTLENECK_PX = 12  # levels are added while the deepest feature map keeps at least this many pixels


def entry(value: Any, source: str, why: str) -> dict[str, Any]:
    return {"value": value, "source": source, "why": why}


def override(value: Any, where: str) -> dict[str, Any]:
    return entry(value, "override", f"set in params.yaml ({where})")


def ceil_to(x: float, multiple: int) -> int:
    return max(multiple, multiple * math.ceil(x / multiple))


def smallest_object_px(fp: dict[str, Any]) -> float:
    """The 5th percentile of the thinnest extent of any class's objects (pixels, full resolution)."""
    thin = [c["object_thinnest_px"]["p5"] for c in fp["classes"].values() if c["object_thinnest_px"]]
    if not thin:
        raise ConfigError("plan: no labelled object in the fingerprinted cases; nothing to plan a model for")
    return min(thin)


def plan_geometry(
    fp: dict[str, Any], data: DatasetConfig, rules: PlanConfig, dataset: str
) -> dict[str, dict[str, Any]]:
    """tile_scale and image_size: whole images, resized to the size the smallest objects need
    within [min_input_px, max_input_px], unless their median side is over max_whole_px; then tiles of
    max_input_px at the scale those objects need (rounded up to 1/32)."""
    height, width = fp["images"]["height_px"]["p50"], fp["images"]["width_px"]["p50"]
    thinnest = smallest_object_px(fp)
    scale = min(1.0, rules.min_object_px / thinnest)  # the least scale that keeps the smallest objects
    why_scale = f"smallest objects (p5 thinnest extent {thinnest:g} px) keep >= {rules.min_object_px} px"
    out = {}
    whole = max(height, width) <= rules.max_whole_px
    if data.explicit("tile_scale"):
        out["tile_scale"] = override(data.tile_scale, f"datasets.{dataset}.tile_scale")
    elif whole:
        out["tile_scale"] = entry(None, "rule", f"median image {height:g}x{width:g} within max_whole_px "
                                  f"{rules.max_whole_px}: whole images, resized")
    else:
        tile_scale = math.ceil(scale * SCALE_STEPS) / SCALE_STEPS
        out["tile_scale"] = entry(tile_scale, "rule", f"median image {height:g}x{width:g} is larger than "
                                  f"max_whole_px {rules.max_whole_px}: tiles; scale {tile_scale:g} ({scale:.3f} "
                                  f"rounded up to 1/{SCALE_STEPS}): {why_scale}")
    if data.explicit("image_size"):
        out["image_size"] = override(list(data.image_size), f"datasets.{dataset}.image_size")
    elif out["tile_scale"]["value"] is None:
        size = [min(rules.max_input_px, max(rules.min_input_px, ceil_to(side * scale, SIZE_MULTIPLE)))
                for side in (height, width)]
        out["image_size"] = entry(size, "rule", f"median image {height:g}x{width:g} at scale {scale:.3f} "
                                  f"({why_scale}), in multiples of {SIZE_MULTIPLE}, within "
                                  f"[{rules.min_input_px}, {rules.max_input_px}]")
    else:
        side = rules.max_input_px
        out["image_size"] = entry([side, side], "rule", f"tiles of max_input_px {side} (sliding window)")
    return out


def network_levels(size: list[int]) -> int:
    """Stride-2 levels until the deepest feature map would fall under BOTTLENECK_PX (2 to 6), as
    many as halve both sides exactly."""
    levels = max(2, min(6, 1 + int(math.log2(min(size) / BOTTLENECK_PX))))
    while levels > 2 and any(side % 2 ** (levels - 1) for side in size):
        levels -= 1
    return levels


def activation_mb(size: list[int], channels: list[int], res_units: int, classes: int) -> float:
    """A rough estimate of one sample's training activations: every level's feature maps, stored
    for the backward pass about 6 times a convolution (conv, norm, activation, and their gradients),
    two convolutions a residual unit, encoder and decoder."""
    floats = sum(c * size[0] * size[1] / 4 ** level for level, c in enumerate(channels))
    convs = 2 * max(res_units, 1) * 2
    return (6 * convs * floats + 4 * classes * size[0] * size[1]) * 4 / 2**20


def train_value(cfg: TrainConfig, dataset: str, name: str) -> tuple[Any, str] | None:
    """An explicit training value of params.yaml and where it is set, or None to plan it."""
    per_dataset = cfg.per_dataset.get(dataset)
    if per_dataset is not None and getattr(per_dataset, name) is not None:
        return getattr(per_dataset, name), f"train.per_dataset.{dataset}.{name}"
    return (getattr(cfg, name), f"train.{name}") if cfg.explicit(name) else None


def planned_or_override(cfg: TrainConfig, dataset: str, name: str, planned: dict[str, Any]) -> dict[str, Any]:
    given = train_value(cfg, dataset, name)
    if given is None:
        return planned
    value, where = given
    return override(list(value) if isinstance(value, tuple) else value, where)


def plan_network(fp: dict[str, Any], size: list[int], cfg: TrainConfig, dataset: str,
                 rules: PlanConfig) -> dict[str, dict[str, Any]]:
    levels = network_levels(size)
    widths = [min(rules.max_width, rules.base_width * 2**level) for level in range(levels)]
    out = {
        "channels": planned_or_override(cfg, dataset, "channels", entry(
            widths, "rule", f"{levels} levels: the deepest feature map of a {size[0]}x{size[1]} input keeps "
            f">= {BOTTLENECK_PX} px; widths from base_width {rules.base_width}, doubled, capped at {rules.max_width}")),
        "res_units": planned_or_override(cfg, dataset, "res_units", entry(
            rules.res_units, "rule", "plan.res_units (docs/experiments.md: what won per CPU-minute)")),
    }
    classes = len(fp["classes"])
    per_sample = activation_mb(size, out["channels"]["value"], out["res_units"]["value"], classes)
    batch = max(2, min(rules.max_batch, int(rules.memory_mb // max(per_sample, 1e-6))))
    out["batch_size"] = planned_or_override(cfg, dataset, "batch_size", entry(
        batch, "rule", f"~{per_sample:.0f} MB of activations a sample: as many as fit memory_mb {rules.memory_mb}, "
        f"within [2, max_batch {rules.max_batch}]"))
    return out


def training_samples(fp: dict[str, Any], plan: dict[str, dict[str, Any]], folds: int) -> int:
    """Samples one fold trains on: its labelled frames (all but the validation share), each as many
    tiles as cover its median size at the tile scale when tiled."""
    frames = fp["labelled_frames"] * (folds - 1) / folds
    scale = plan["tile_scale"]["value"]
    if scale is not None:
        height, width = (fp["images"][f"{side}_px"]["p50"] * scale for side in ("height", "width"))
        size = plan["image_size"]["value"]
        frames *= max(1.0, height / size[0]) * max(1.0, width / size[1])
    return max(1, round(frames))


def plan_epochs(fp: dict[str, Any], plan: dict[str, dict[str, Any]], params: Params, dataset: str,
                device: torch.device, archs: tuple[str, ...]) -> dict[str, Any]:
    """Epochs from the time budget and the measured step time, capped where small data would be
    seen more than max_passes times."""
    cfg, rules = params.train, params.plan
    given = train_value(cfg, dataset, "epochs")
    if given is not None:
        return override(*given)
    steps_per_epoch = cfg.for_dataset(dataset).steps_per_epoch
    batch = plan["batch_size"]["value"]
    members = len(archs) * len(cfg.folds)
    times = []
    for arch in archs:
        step = {"arch": arch, "in_channels": params.dataset(dataset).in_channels, "classes": len(fp["classes"]),
                "channels": plan["channels"]["value"], "res_units": plan["res_units"]["value"],
                "image_size": plan["image_size"]["value"], "batch_size": batch}
        times.append(step_seconds(step, device))
    seconds, where = max(times), "measured on this device, cached per device"
    budget = rules.budget_for(dataset)
    # 10% of the budget is left for validation after each epoch and for loading the data.
    by_budget = 0.9 * budget * 60 / (members * seconds)
    samples = training_samples(fp, plan, len(cfg.folds))
    max_passes = rules.passes_for(dataset)
    by_data = max_passes * samples / batch
    steps = min(by_budget, by_data)
    epochs = max(1, math.floor(steps / steps_per_epoch))
    bound = (f"budget {budget:g} min over {members} models at {seconds:g} s a step ({where}): {by_budget:.0f} steps"
             if by_budget <= by_data else
             f"max_passes {max_passes:g} over {samples} training samples: {by_data:.0f} steps "
             f"(the budget of {budget:g} min would allow {by_budget:.0f} at {seconds:g} s a step, {where})")
    return entry(epochs, "measurement" if by_budget <= by_data else "rule",
                 f"{bound}, in epochs of {steps_per_epoch} steps")


def preset_name(fp: dict[str, Any]) -> str:
    if fp["video"] is not None:
        return "video"
    return "colour" if 3 in fp["images"]["channels"] else "grey"


def plan_augment(fp: dict[str, Any], params: Params, dataset: str) -> dict[str, Any]:
    given = params.augment.for_dataset(dataset)
    if given is not None:
        return override(given.model_dump(mode="json"), f"augment.{dataset}")
    name = preset_name(fp)
    preset = PRESETS[name]
    why = f"preset {name!r}: " + {"video": "frames of a video", "colour": "colour images",
                                   "grey": "grey still images"}[name]
    dark = fp["images"]["dark_lower_left_fraction"]
    if dark >= 0.05:  # an endoscope's inset: teach the model that a black box there is not tissue
        preset = preset.model_copy(update={"black_corner": 0.3})
        why += f"; black_corner 0.3: {dark:.0%} of images have a dark lower-left box"
    return entry(preset.model_dump(mode="json"), "rule", why)


def plan_tta(augment: dict[str, Any], infer: InferConfig) -> dict[str, dict[str, Any]]:
    """Test-time mirroring along the axes the model was trained to be mirrored on (as nnU-Net)."""
    out = {}
    for name in ("hflip", "vflip"):
        out[name] = (override(getattr(infer, name), f"infer.{name}") if infer.explicit(name) else
                     entry(augment["value"][name] > 0, "rule", f"augment {name} {augment['value'][name]:g}: "
                           "predict the mirrored view too when training mirrored"))
    return out


def plan_thresholds(fp: dict[str, Any], cfg: EnsembleConfig) -> dict[str, dict[str, Any]]:
    """Threshold tuning on the out-of-fold predictions: a finer grid where more frames back it."""
    frames = fp["labelled_frames"]
    tune = (override(cfg.tune, "ensemble.tune") if cfg.explicit("tune") else
            entry(frames >= TUNE_MIN_FRAMES, "rule", f"{frames} labelled frames: tuned when >= {TUNE_MIN_FRAMES}, "
                  "fewer would fit the threshold to noise"))
    step = 0.05 if frames >= FINE_GRID_FRAMES else 0.1
    grid = (override(cfg.grid_step, "ensemble.grid_step") if cfg.explicit("grid_step") else
            entry(step, "rule", f"{frames} labelled frames: a step of 0.05 from {FINE_GRID_FRAMES} frames, else 0.1"))
    return {"tune": tune, "grid_step": grid}


def make_plan(fp: dict[str, Any], params: Params, dataset: str, device: torch.device) -> dict[str, Any]:
    """The plan of `dataset` (see the module doc) from its fingerprint."""
    data, cfg, rules = params.dataset(dataset), params.train, params.plan
    plan = plan_geometry(fp, data, rules, dataset)
    plan.update(plan_network(fp, plan["image_size"]["value"], cfg, dataset, rules))
    plan["epochs"] = plan_epochs(fp, plan, params, dataset, device, cfg.archs)
    epochs = plan["epochs"]["value"]
    plan["patience"] = planned_or_override(cfg, dataset, "patience", entry(
        max(MIN_PATIENCE, math.ceil(epochs / 4)), "rule", f"a quarter of {epochs} epochs, at least {MIN_PATIENCE}: "
        "validation Dice on real data is noisy, and a budget stopped early is a budget lost (docs/experiments.md)"))
    tiled = plan["tile_scale"]["value"] is not None
    plan["foreground_fraction"] = planned_or_override(cfg, dataset, "foreground_fraction", entry(
        0.33 if tiled else 0.0, "rule", "tiles: a third of the crops centred on a labelled pixel (nnU-Net)"
        if tiled else "whole images: every sample holds the whole labelled frame"))
    plan["loss"] = planned_or_override(cfg, dataset, "loss", entry(
        "bce_dice", "rule", "Dice + BCE on per-class sigmoids: classes may overlap (multi-label), and "
        "Dice copes with small foreground fractions (docs/experiments.md)"))
    plan["augment"] = plan_augment(fp, params, dataset)
    plan.update(plan_tta(plan["augment"], params.infer))
    plan.update(plan_thresholds(fp, params.ensemble))
    plan["normalisation"] = entry("zscore_per_image", "fixed", "each frame to zero mean and unit std "
                                  "(segpipe/preprocess.py): exposure and MRI warm-up brightness do not matter")
    return {"dataset": dataset, "device": device.type, "fingerprint": fp, "plan": plan}
