"""Quality report of a pseudo-labelled store, to judge labels that no one drew.

For the whole store and per video: frames kept and rejected (warm-up, low confidence), a
histogram of the per-frame confidence, temporal stability (Dice between adjacent frames that
are both kept: a label that flickers is not following anatomy that moves smoothly), Dice against
true masks when they are known (the demo), and one overlay montage per video: evenly spaced
frames with the airway outlined, framed by what happened to each frame.

Written to a folder: `pseudolabels.json`, `pseudolabels.md` and `<case>.png`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from segpipe.atomic import atomic_dir, write_json
from segpipe.pseudolabel import dice
from segpipe.store import CaseStore

log = logging.getLogger(__name__)

BINS = np.round(np.linspace(0, 1, 11), 2)  # confidence histogram edges: tenths
KEPT, LOW, WARMUP = (60, 200, 90), (235, 150, 30), (120, 120, 120)  # tile frame colours
OUTLINE = (255, 40, 40)


def quality(labels: CaseStore, truth: Path | None = None) -> dict[str, Any]:
    """The report's numbers for every case of a pseudo-labels store (see segpipe.pseudolabel)."""
    if truth is not None and not Path(truth).is_dir():
        log.warning("%s: no such truth folder; pseudo-labels are not scored", truth)
        truth = None
    per_video, steady, pairs, scored = {}, [np.zeros(0)], [np.zeros(0)], {"all": [], "kept": []}
    for case_id in labels.case_ids():
        video, confidence, pair_dice, truth_dice = _video_quality(labels, case_id, truth)
        per_video[case_id] = video
        steady.append(confidence)
        pairs.append(pair_dice)
        for key, values in truth_dice.items():
            scored[key] += values
    steady, pairs = np.concatenate(steady), np.concatenate(pairs)
    counts = ("frames", "kept", "rejected_warmup", "rejected_low_confidence")
    summary: dict[str, Any] = {"cases": len(per_video), **{k: sum(v[k] for v in per_video.values()) for k in counts}}
    summary["mean_confidence"] = float(steady.mean()) if steady.size else 0.0
    summary["stability_mean_dice"] = float(pairs.mean()) if pairs.size else None
    summary["stability_min_dice"] = float(pairs.min()) if pairs.size else None
    if scored["all"]:
        summary["dice_vs_truth"] = float(np.mean(scored["all"]))
        summary["dice_vs_truth_kept"] = float(np.mean(scored["kept"])) if scored["kept"] else 0.0
    histogram = np.histogram(steady, bins=BINS)[0]  # the last bin includes 1.0
    return {
        "summary": summary,
        "min_confidence": labels.attrs.get("pseudolabel", {}).get("min_confidence"),
        "confidence_histogram": {"edges": BINS.tolist(), "counts": histogram.tolist(), "of": "steady-state frames"},
        "videos": per_video,
    }


def _video_quality(labels: CaseStore, case_id: str, truth: Path | None):
    """One video's figures, its steady-state confidences, the Dice of each adjacent kept pair, and
    per-frame Dice against the truth ({"all": [...], "kept": [...]}, empty when unknown)."""
    mask = np.asarray(labels.array(case_id, "mask")[:, 0]).astype(bool)
    confidence = np.asarray(labels.array(case_id, "confidence")[:])
    keep = np.asarray(labels.array(case_id, "keep")[:]).astype(bool)
    attrs = labels.case_attrs(case_id)
    n, warmup = len(mask), min(int(attrs.get("warmup_frames", 0)), len(mask))
    pair_dice = np.array([dice(mask[t], mask[t + 1]) for t in np.nonzero(keep[:-1] & keep[1:])[0]])
    video: dict[str, Any] = {
        "group": attrs.get("group"), "frames": n, "kept": int(keep.sum()), "rejected_warmup": warmup,
        "rejected_low_confidence": int(n - warmup - keep.sum()),
        "mean_confidence": float(confidence[warmup:].mean()) if n > warmup else 0.0,
        "stability_mean_dice": float(pair_dice.mean()) if pair_dice.size else None,
        "stability_min_dice": float(pair_dice.min()) if pair_dice.size else None,
    }
    truth_dice: dict[str, list[float]] = {}
    true = _truth_of(truth, case_id, attrs) if truth is not None else None
    if true is not None:
        truth_dice["all"] = [dice(mask[t], true[t]) for t in range(warmup, n)]
        truth_dice["kept"] = [d for d, k in zip(truth_dice["all"], keep[warmup:]) if k]
        video["dice_vs_truth"] = float(np.mean(truth_dice["all"])) if truth_dice["all"] else None
    return video, confidence[warmup:], pair_dice, truth_dice


def _truth_of(truth: Path, case_id: str, attrs: dict[str, Any]) -> np.ndarray | None:
    """The true masks of a case, if `truth` holds them: `<truth>/<group>/<stem>.npy`, where the stem
    is the source file's (ingest may prefix the case id with the speaker)."""
    group = str(attrs.get("group", ""))
    stems = [Path(str(attrs["source"])).stem] if attrs.get("source") else []
    stems += [case_id, case_id.removeprefix(f"{group}_")]
    for stem in stems:
        path = Path(truth) / group / f"{stem}.npy"
        if path.is_file():
            return np.load(path)
    log.warning("%s: no true masks for case %s", truth, case_id)
    return None


def montage(frames: np.ndarray, mask: np.ndarray, confidence: np.ndarray, keep: np.ndarray, warmup: int,
            tiles: int = 12, columns: int = 6, tile_px: int = 192) -> Image.Image:
    """Evenly spaced frames, each upscaled to about `tile_px` with the airway outlined, framed green
    (kept), orange (low confidence) or grey (warm-up), and captioned with its index and confidence."""
    picks = np.unique(np.linspace(0, len(frames) - 1, min(tiles, len(frames))).round().astype(int))
    scale = max(1, round(tile_px / max(frames.shape[1:])))
    height, width = (s * scale for s in frames.shape[1:])
    pad, caption = 3, 14
    rows = -(-len(picks) // columns)
    sheet = Image.new("RGB", (columns * (width + 2 * pad), rows * (height + 2 * pad + caption)), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    for i, t in enumerate(picks):
        x, y = (i % columns) * (width + 2 * pad), (i // columns) * (height + 2 * pad + caption)
        colour = WARMUP if t < warmup else KEPT if keep[t] else LOW
        draw.rectangle([x, y, x + width + 2 * pad - 1, y + height + 2 * pad - 1], fill=colour)
        sheet.paste(Image.fromarray(outlined(frames[t], mask[t], scale)), (x + pad, y + pad))
        draw.text((x + pad, y + height + 2 * pad), f"t={t} c={confidence[t]:.2f}", fill=(230, 230, 230), font=font)
    return sheet


def outlined(frame: np.ndarray, mask: np.ndarray, scale: int) -> np.ndarray:
    """A gray frame as RGB, contrast-stretched and upscaled, with the mask's boundary drawn on it."""
    lo, hi = np.percentile(frame, (1, 99.5))
    gray = np.clip((frame.astype(np.float32) - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    gray = np.kron(gray, np.ones((scale, scale), np.uint8))
    big = np.kron(mask.astype(np.uint8), np.ones((scale, scale), np.uint8)).astype(bool)
    edge = big & ~ndimage.binary_erosion(big, border_value=0)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    rgb[edge] = OUTLINE
    return rgb


def write_report(labels: CaseStore, images: CaseStore, out: Path, truth: Path | None = None,
                 title: str = "Pseudo-label quality") -> dict[str, Any]:
    """Write `pseudolabels.json`, `pseudolabels.md` and one montage PNG per case into the folder
    `out` (replaced atomically); return the report."""
    report = quality(labels, truth)
    with atomic_dir(Path(out)) as tmp:
        for case_id in labels.case_ids():
            attrs = labels.case_attrs(case_id)
            sheet = montage(
                np.asarray(images.array(case_id, "image")[:]), np.asarray(labels.array(case_id, "mask")[:, 0]),
                np.asarray(labels.array(case_id, "confidence")[:]), np.asarray(labels.array(case_id, "keep")[:]),
                int(attrs.get("warmup_frames", 0)),
            )
            sheet.save(tmp / f"{case_id}.png", optimize=True)
        write_json(tmp / "pseudolabels.json", report)
        (tmp / "pseudolabels.md").write_text(markdown(report, title))
    return report


def markdown(report: dict[str, Any], title: str) -> str:
    s = report["summary"]
    lines = [
        f"# {title}", "",
        f"{s['cases']} videos, {s['frames']} frames: **{s['kept']} kept**, {s['rejected_warmup']} rejected as "
        f"warm-up, {s['rejected_low_confidence']} rejected for confidence below {report['min_confidence']}. "
        f"Mean confidence of steady-state frames {s['mean_confidence']:.3f}.", "",
        f"Temporal stability (Dice between adjacent kept frames): mean {_num(s['stability_mean_dice'])}, "
        f"min {_num(s['stability_min_dice'])}.",
    ]
    if "dice_vs_truth" in s:
        lines += ["", f"Dice against the true airway: {s['dice_vs_truth']:.3f} over all steady-state frames, "
                      f"{s['dice_vs_truth_kept']:.3f} over kept frames."]
    lines += ["", "## Confidence of steady-state frames", "", "```", *_text_histogram(report), "```", ""]
    lines += ["## Per video", "", "| video | frames | kept | warm-up | low confidence | mean confidence "
              "| stability mean | stability min |", "|---|---|---|---|---|---|---|---|"]
    for case_id, v in report["videos"].items():
        lines.append(f"| {case_id} | {v['frames']} | {v['kept']} | {v['rejected_warmup']} | "
                     f"{v['rejected_low_confidence']} | {v['mean_confidence']:.3f} | "
                     f"{_num(v['stability_mean_dice'])} | {_num(v['stability_min_dice'])} |")
    lines += ["", "## Montages", "", "Evenly spaced frames, airway outlined in red; frame colour: green kept, "
              "orange rejected for low confidence, grey warm-up; `c` is the frame's confidence.", ""]
    lines += [f"### {case_id}\n\n![{case_id}]({case_id}.png)\n" for case_id in report["videos"]]
    return "\n".join(lines)


def _text_histogram(report: dict[str, Any], width: int = 40) -> list[str]:
    hist = report["confidence_histogram"]
    top = max(max(hist["counts"]), 1)
    return [f"{lo:.1f}-{hi:.1f} {n:6d} {'#' * round(width * n / top)}".rstrip()
            for lo, hi, n in zip(hist["edges"][:-1], hist["edges"][1:], hist["counts"])]


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
