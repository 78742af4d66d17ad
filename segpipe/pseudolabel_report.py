"""Quality report of a pseudo-labelled store, to judge labels that no one drew.

For the whole store and per video: frames kept and rejected (warm-up, low confidence), a
histogram of the per-frame confidence, temporal stability (Dice between adjacent frames that
are both kept: a label that flickers is not following anatomy that moves smoothly), Dice against
true masks when they are known (the demo), and one overlay montage per video: evenly spaced
frames with the airway outlined, framed by what happened to each frame.

With teacher-student rounds (segpipe.teacher) the report describes the final round, plus a
`rounds` list: per round its counts and Dice against the truth, and from round 1 its student's:
what it trained on, its raw Dice (all steady-state frames, and the speakers it never saw), and
the Dice its teacher's kept labels keep after a round trip through the model's scale, the best a
student working at that scale could do. The markdown states from these numbers whether each
student beats the labels it learnt from.

Written to a folder: `pseudolabels.json`, `pseudolabels.md` and `<case>.png`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from segpipe.atomic import Owner, atomic_dir, write_json
from segpipe.preprocess import masks_to_target, resize
from segpipe.pseudolabel import dice
from segpipe.store import CaseStore, labelled_frames

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


ROUND_KEYS = ("kept", "rejected_warmup", "rejected_low_confidence", "mean_confidence", "dice_vs_truth",
              "dice_vs_truth_kept")


def rounds_quality(rounds: list[CaseStore], truth: Path | None = None) -> list[dict[str, Any]]:
    """Per round (stores in order, round 0 first): its counts and Dice against the truth; from round
    1, its student's training figures and Dice. A student's masks are its round's labels, unfiltered
    (segpipe.teacher), so its raw Dice over all steady-state frames is the round's `dice_vs_truth`."""
    out = []
    for r, store in enumerate(rounds):
        report = quality(store, truth)
        summary = report["summary"]
        entry: dict[str, Any] = {"round": r, **{k: summary[k] for k in ROUND_KEYS if k in summary}}
        if "student" in store.attrs:
            entry["student"] = _student_quality(store.attrs["student"], report, rounds[r - 1], truth)
        out.append(entry)
    return out


def _student_quality(student: dict[str, Any], report: dict[str, Any], teacher: CaseStore,
                     truth: Path | None) -> dict[str, Any]:
    """A student's training figures (store attrs); with the truth, also its raw Dice over all
    steady-state frames, over its held-out speakers', and the bound its resolution sets."""
    if "dice_vs_truth" not in report["summary"]:
        return student
    return {**student, "dice_vs_truth": report["summary"]["dice_vs_truth"],
            "dice_vs_truth_heldout": _frame_mean(report["videos"], student["val_cases"]),
            "teacher_dice_vs_truth_at_model_scale": dice_at_scale(teacher, truth, student["image_size"])}


def _frame_mean(videos: dict[str, dict[str, Any]], case_ids: list[str]) -> float | None:
    """Mean per-frame Dice against the truth over the steady-state frames of some videos."""
    scored = [(v["dice_vs_truth"], v["frames"] - v["rejected_warmup"]) for c, v in videos.items()
              if c in case_ids and v.get("dice_vs_truth") is not None]
    frames = sum(n for _, n in scored)
    return float(sum(d * n for d, n in scored) / frames) if frames else None


def dice_at_scale(labels: CaseStore, truth: Path, size: list[int]) -> float | None:
    """Mean Dice against the truth of the kept labels once resized to the model's `size` and back,
    as a student sees them in training and returns them in inference: what it could reach at best."""
    scores = []
    for case_id in labels.case_ids():
        true = _truth_of(truth, case_id, labels.case_attrs(case_id))
        kept = labelled_frames(labels, case_id)
        if true is None or kept.size == 0:
            continue
        small = masks_to_target(np.asarray(labels.array(case_id, "mask")[:])[kept], tuple(size))
        back = (resize(small, true.shape[1:]) > 0.5).numpy()[:, 0]
        scores += [dice(m, true[t]) for m, t in zip(back, kept)]
    return float(np.mean(scores)) if scores else None


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
                 title: str = "Pseudo-label quality", rounds: list[CaseStore] | None = None) -> dict[str, Any]:
    """Write `pseudolabels.json`, `pseudolabels.md` and one montage PNG per case into the folder
    `out` (replaced atomically); return the report. `rounds`: every round's store, `labels` being
    the last one's copy."""
    report = quality(labels, truth)
    if rounds:
        report["rounds"] = rounds_quality(rounds, truth)
    with atomic_dir(Path(out), Owner("labels", labels.attrs.get("dataset", "unknown"))) as tmp:
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
    if len(report.get("rounds", [])) > 1:
        lines += ["", *_rounds_markdown(report["rounds"])]
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


def _rounds_markdown(rounds: list[dict[str, Any]]) -> list[str]:
    """The rounds table, then one sentence per student saying, from the numbers, whether it beats
    the labels it learnt from."""
    lines = [f"## Teacher-student rounds ({len(rounds) - 1} after the classical labels)", "",
             "Round 0 is the classical labeller; each later round's labels are a student's raw predictions "
             "(segpipe/teacher.py). Dice against the true airway over all steady-state frames and over kept ones; "
             "the student's Dice on the speakers held out from its training.", "",
             "| round | kept | low confidence | mean confidence | Dice all | Dice kept | student Dice, held-out |",
             "|---|---|---|---|---|---|---|"]
    for r in rounds:
        heldout = r.get("student", {}).get("dice_vs_truth_heldout")
        lines.append(f"| {r['round']} | {r['kept']} | {r['rejected_low_confidence']} | {r['mean_confidence']:.3f} | "
                     f"{_num(r.get('dice_vs_truth'))} | {_num(r.get('dice_vs_truth_kept'))} | {_num(heldout)} |")
    lines.append("")
    for teacher, r in zip(rounds, rounds[1:]):
        lines += [_verdict(teacher, r), ""]
    return lines


def _verdict(teacher: dict[str, Any], r: dict[str, Any]) -> str:
    student = r["student"]
    head = (f"Round {r['round']}: the student trained on {student['train_frames']} kept frames of round "
            f"{teacher['round']} (best validation Dice {student['best_val_dice']:.3f} against those labels, epoch "
            f"{student['best_epoch']} of {student['epochs_run']})")
    if "dice_vs_truth" not in student or teacher.get("dice_vs_truth_kept") is None:
        return head + "; no true masks, so whether it beats its labels is unknown."
    gap = student["dice_vs_truth"] - teacher["dice_vs_truth_kept"]
    text = (f"{head}. Its raw predictions score {student['dice_vs_truth']:.3f} against the truth over all "
            f"steady-state frames ({_num(student['dice_vs_truth_heldout'])} on the held-out speakers), against "
            f"{teacher['dice_vs_truth_kept']:.3f} for the labels it learnt from: "
            + (f"it beats them by {gap:.3f}." if gap > 0 else f"it does not beat them ({-gap:.3f} below)."))
    ceiling = student.get("teacher_dice_vs_truth_at_model_scale")
    if gap <= 0 and ceiling is not None and ceiling < teacher["dice_vs_truth_kept"]:
        size = "x".join(str(s) for s in student["image_size"])
        text += (f" The model works at {size}: those labels, resized there and back, score {ceiling:.3f}, so "
                 f"the resolution alone costs {teacher['dice_vs_truth_kept'] - ceiling:.3f} of Dice, and the student "
                 + ("reaches that bound." if student["dice_vs_truth"] >= ceiling
                    else f"stays {ceiling - student['dice_vs_truth']:.3f} below it."))
    return text


def _text_histogram(report: dict[str, Any], width: int = 40) -> list[str]:
    hist = report["confidence_histogram"]
    top = max(max(hist["counts"]), 1)
    return [f"{lo:.1f}-{hi:.1f} {n:6d} {'#' * round(width * n / top)}".rstrip()
            for lo, hi, n in zip(hist["edges"][:-1], hist["edges"][1:], hist["counts"])]


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
