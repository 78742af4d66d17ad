"""The evaluation as files a reader (or DVC) reads: the metrics JSON, per-case, per-class and
per-frame rows, and the worst cases or frames to look at first.

Row tables are lists of dicts with the same keys, written as CSV with numbers rounded to 6
decimals, so that an unchanged evaluation writes unchanged bytes (DVC compares them).
"""
from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.evaluate import CaseScores, Evaluation, case_means, summary

ENSEMBLE = "ensemble"


def metrics_json(ev: Evaluation, n_cases: int) -> dict[str, Any]:
    """DVC's metrics: the ensemble's headline and per-class means, each
    member's headline on the same cases, and the demo's scores against the true masks."""
    out = {**summary(ev.ensemble, ev.classes), "n_cases": n_cases}
    out["members"] = {name: headline(summary(cases, ev.classes)) for name, cases in ev.members.items()}
    if ev.vs_truth is not None:
        out["vs_truth"] = summary(ev.vs_truth, ev.classes)
    return out


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The mean-over-classes figures of a summary, without its per-class table."""
    return {name: value for name, value in metrics.items() if isinstance(value, float)}


def per_case_rows(ev: Evaluation) -> list[dict[str, Any]]:
    """A row per member (the ensemble first), case and class: the means over the case's scored frames."""
    rows = []
    for member, cases in {ENSEMBLE: ev.ensemble, **ev.members}.items():
        for case in cases:
            means = case_means(case)
            for k, name in enumerate(ev.classes):
                rows.append({"member": member, "case": case.case_id, "class": name, "frames": len(case.frames),
                             **{metric: values[k] for metric, values in means.items()}})
    return rows


def per_class_rows(ev: Evaluation) -> list[dict[str, Any]]:
    """A row per class: the ensemble's means over every scored frame (DVC plots them as bars)."""
    per_class = summary(ev.ensemble, ev.classes)["per_class"]
    return [{"class": name, **per_class[name]} for name in ev.classes]


def per_frame_rows(ev: Evaluation, fps: dict[str, float]) -> list[dict[str, Any]]:
    """A row per scored frame and class of the ensemble; `time_s` from the video's frame rate (empty
    for an image, which is one frame)."""
    rows = []
    for case in ev.ensemble:
        rate = fps.get(case.case_id)
        for i, frame in enumerate(case.frames):
            for k, name in enumerate(ev.classes):
                rows.append({"case": case.case_id, "frame": int(frame),
                             "time_s": frame / rate if rate else "", "class": name,
                             **{metric: values[i, k] for metric, values in case.values.items()}})
    return rows


@dataclass(frozen=True)
class Worst:
    """A case (an image, or one frame of a video) worth a look: its Dice, the mean over classes."""

    case_id: str
    frame: int
    dice: float


def worst(cases: Iterable[CaseScores], n: int, by_frame: bool) -> list[Worst]:
    """The `n` lowest mean Dice: per frame (videos) or per case (images, or a video's mean), ties
    by case and frame so the choice is stable."""
    found = []
    for case in cases:
        dice = case.values["dice"].mean(axis=1)  # (F,) mean over classes
        if by_frame:
            found += [Worst(case.case_id, int(f), float(d)) for f, d in zip(case.frames, dice)]
        else:
            found.append(Worst(case.case_id, int(case.frames[int(np.argmin(dice))]), float(dice.mean())))
    return sorted(found, key=lambda w: (w.dice, w.case_id, w.frame))[:n]


def csv_text(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV, floats rounded to 6 decimals."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: round(float(v), 6) if isinstance(v, (float, np.floating)) else v for k, v in row.items()}
                     for row in rows)
    return out.getvalue()


def write_text(path: Path, text: str | bytes) -> None:
    """Write a file atomically: a temporary sibling renamed over it, so no kill leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(text, bytes):
        tmp.write_bytes(text)
    else:
        tmp.write_text(text)
    os.replace(tmp, path)
