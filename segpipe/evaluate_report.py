"""The evaluation report of one dataset, in the order a reader acts on it: the summary table
(ensemble against each member), the worst cases (or frames) to look at, the classes ranked by
Dice, their Dice distributions, which class takes the pixels a class misses, Dice over time for
videos, and the thresholds with their validation curves. Built once as blocks (segpipe.report),
written as report.html, report.md and the figures the Markdown links.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.atomic import Owner, atomic_dir
from segpipe.config import EvaluateConfig
from segpipe.evaluate import Evaluation, case_means
from segpipe.evaluate_tables import ENSEMBLE, headline, worst, write_text
from segpipe.overlays import frame_maps, overlay_png
from segpipe.report import Block, Figure, Heading, Table, Text, figures, to_html, to_markdown
from segpipe.report_plots import confusion_plot, dice_box, dice_over_time, threshold_curves
from segpipe.store import CaseStore

METRIC_COLUMNS = {"dice": "Dice", "iou": "IoU", "precision": "precision", "recall": "recall",
                  "hd95": "HD95 (px)", "nsd": "NSD"}
TOP_CONFUSIONS = 10
FIGURES = "figures"  # the folder of the figures report.md links, beside it


@dataclass(frozen=True)
class Stores:
    """What the overlays are drawn from: the images, the labels and the ensemble's masks."""

    images: CaseStore
    labels: CaseStore
    ensemble: CaseStore


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}es" if noun.endswith("s") else f"{n} {noun}s"


def metric_row(name: str, metrics: dict[str, Any]) -> list[Any]:
    return [name, *(metrics.get(m) for m in METRIC_COLUMNS)]


def summary_section(dataset: str, ev: Evaluation, metrics: dict[str, Any]) -> list[Block]:
    frames = sum(len(c.frames) for c in ev.ensemble)
    rows = [metric_row(ENSEMBLE, headline(metrics))]
    rows += [metric_row(name, m) for name, m in metrics["members"].items()]
    if "vs_truth" in metrics:
        rows.append(metric_row("ensemble vs the true masks (demo)", headline(metrics["vs_truth"])))
    return [
        Text(f"{dataset}: the ensemble and each of its members on the same "
             f"{plural(metrics['n_cases'], 'held-out test case')} ({plural(frames, 'labelled frame')}), "
             f"{plural(len(ev.classes), 'class')}, at each case's original resolution. Each figure is the mean "
             f"over frames per class, then over classes. NSD counts boundary pixels within {ev.tolerance:g} px "
             "of the other boundary."),
        Table(["", *METRIC_COLUMNS.values()], rows),
    ]


def worst_section(ev: Evaluation, stores: Stores, cfg: EvaluateConfig, video: bool) -> list[Block]:
    picked = worst(ev.ensemble, cfg.worst_cases, by_frame=video)
    if not picked:
        return []
    what = "frames" if video else "cases"
    blocks: list[Block] = [Heading(f"The {len(picked)} worst {what}"),
                           Text("Lowest mean Dice over classes, worst first: look at these first.")]
    for i, w in enumerate(picked):
        maps = frame_maps(stores.images, stores.labels, stores.ensemble, w.case_id, w.frame, cfg.overlay_px)
        label = f"{w.case_id}, frame {w.frame}" if video else w.case_id
        title = f"{label}: Dice {w.dice:.3f}"
        blocks.append(Figure(f"worst{i + 1}.png", overlay_png(maps, len(ev.classes)), title))
    return blocks


def class_section(ev: Evaluation, metrics: dict[str, Any]) -> list[Block]:
    per_class = metrics["per_class"]
    order = sorted(ev.classes, key=lambda c: (per_class[c]["dice"], c))
    dice = {c: np.array([case_means(case)["dice"][k] for case in ev.ensemble]) for k, c in enumerate(ev.classes)}
    return [
        Heading("Per class, lowest Dice first"),
        Table(["class", *METRIC_COLUMNS.values()], [metric_row(c, per_class[c]) for c in order]),
        Figure("dice_per_class.png", dice_box({c: dice[c] for c in order}), "Dice per test case, per class"),
    ]


def confusion_section(ev: Evaluation) -> list[Block]:
    """Multi-label data only: where a class is missed, what was predicted there instead."""
    if len(ev.classes) < 2:
        return []
    missed = sum(c.missed_as for c in ev.ensemble)
    totals = missed.sum(axis=1)
    names = [*ev.classes, "(no class)"]
    pairs = sorted(((int(missed[a, b]), a, b) for a in range(len(ev.classes)) for b in range(len(names))
                    if missed[a, b] > 0), reverse=True)[:TOP_CONFUSIONS]
    rows = [[ev.classes[a], names[b], n, n / totals[a]] for n, a, b in pairs]
    return [
        Heading("Class confusion"),
        Text("Where a class is true and not predicted (rows), which class was predicted there instead "
             "(columns; classes may overlap, so a pixel can count for several), summed over the test cases."),
        Figure("class_confusion.png", confusion_plot(missed, ev.classes),
               "Missed pixels of each class, by the class predicted there"),
        Table(["true class", "predicted instead", "pixels", "share of its missed pixels"], rows),
    ]


def time_section(ev: Evaluation, fps: dict[str, float]) -> list[Block]:
    seconds = all(fps.get(c.case_id) for c in ev.ensemble)  # else frame numbers, for every video alike
    series = {c.case_id: (c.frames / fps[c.case_id] if seconds else c.frames, c.values["dice"].mean(axis=1))
              for c in ev.ensemble}
    return [Heading("Dice per frame over time"),
            Figure("dice_over_time.png", dice_over_time(series, "time (s)" if seconds else "frame"),
                   "Dice per labelled frame (mean over classes) of each test video")]


def threshold_section(ev: Evaluation) -> list[Block]:
    rows = [[c, t["threshold"], t.get("source"), t.get("val_dice"), t.get("val_dice_at_fixed")]
            for c, t in ev.thresholds.items()]
    blocks: list[Block] = [Heading("Thresholds"), Table(["class", "threshold", "source", "validation Dice",
                                                          "validation Dice at the fixed threshold"], rows)]
    curves = {c: (t["val_dice_curve"]["thresholds"], t["val_dice_curve"]["val_dice"], t["threshold"])
              for c, t in ev.thresholds.items() if t.get("val_dice_curve")}
    if curves:
        blocks.append(Figure("threshold_curves.png", threshold_curves(curves),
                             "Mean validation Dice (out of fold) against the threshold; dots: the thresholds chosen"))
    else:
        blocks.append(Text("No validation Dice curve was recorded: no threshold was tuned."))
    return blocks


CONVENTIONS = (
    "Conventions. A class absent from both the prediction and the truth of a frame scores Dice, IoU, "
    "precision, recall and NSD 1 and HD95 0; absent from one of them, it scores 0 and HD95 the frame's "
    "diagonal. HD95 and NSD come from MONAI (compute_hausdorff_distance, percentile 95; compute_surface_dice), "
    "in pixels of the original resolution. Each member's probabilities are cut at the ensemble's thresholds."
)


def report_blocks(dataset: str, ev: Evaluation, metrics: dict[str, Any], stores: Stores, cfg: EvaluateConfig,
                  fps: dict[str, float]) -> list[Block]:
    """The whole report; `fps` holds the frame rate of each video case (none for images)."""
    video = bool(fps)
    return [
        *summary_section(dataset, ev, metrics),
        *worst_section(ev, stores, cfg, video),
        *class_section(ev, metrics),
        *confusion_section(ev),
        *(time_section(ev, fps) if video else []),
        *threshold_section(ev),
        Text(CONVENTIONS),
    ]


def write_report(folder: Path, dataset: str, blocks: list[Block]) -> None:
    """report.html (self-contained), report.md and the figures it links (figures/) in `folder`."""
    title = f"segpipe evaluation: {dataset}"
    with atomic_dir(folder / FIGURES, Owner("evaluate", dataset)) as tmp:
        for name, data in figures(blocks).items():
            (tmp / name).write_bytes(data)
    write_text(folder / "report.md", to_markdown(title, blocks, FIGURES))
    write_text(folder / "report.html", to_html(title, blocks))
