"""The evaluation report's charts, drawn with matplotlib's object API (a Figure per chart, no pyplot
state, no display needed) and returned as PNG bytes.

PNGs are written without matplotlib's "Software" stamp, so the same figures give the same bytes
whichever matplotlib drew them.
"""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure


def png(fig: Figure) -> bytes:
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return out.getvalue()


def dice_box(dice_by_class: Mapping[str, np.ndarray]) -> bytes:
    """A box per class of its Dice over the test cases, every case drawn as a point over it."""
    names = list(dice_by_class)
    fig = Figure(figsize=(8, 1.2 + 0.28 * len(names)))
    ax = fig.subplots()
    data = [np.asarray(dice_by_class[n], dtype=float) for n in names]
    ax.boxplot(data, orientation="horizontal", tick_labels=names, widths=0.6, showfliers=False)
    jitter = np.random.default_rng(0)  # fixed: the same data draw the same picture
    for i, values in enumerate(data, start=1):
        ax.plot(values, i + jitter.uniform(-0.15, 0.15, len(values)), "o", ms=3, alpha=0.6, color="tab:blue")
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("Dice per test case")
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    return png(fig)


def confusion_plot(missed_as: np.ndarray, classes: Sequence[str]) -> bytes:
    """Where each true class (row) was missed, the share of those pixels predicted as each other
    class (columns, last: no class at all)."""
    totals = missed_as.sum(axis=1, keepdims=True)
    shares = np.divide(missed_as, totals, out=np.zeros(missed_as.shape), where=totals > 0)
    size = 2.5 + 0.3 * len(classes)
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="magma_r", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(classes) + 1), [*classes, "(none)"], rotation=90, fontsize=8)
    ax.set_yticks(range(len(classes)), [f"{c} ({t:,} px)" for c, t in zip(classes, totals[:, 0])], fontsize=8)
    ax.set_xlabel("predicted there instead")
    ax.set_ylabel("true class, pixels missed")
    fig.colorbar(image, ax=ax, label="share of the missed pixels")
    return png(fig)


def dice_over_time(series: Mapping[str, tuple[np.ndarray, np.ndarray]], xlabel: str) -> bytes:
    """Dice per frame (mean over classes) of each video, against time."""
    fig = Figure(figsize=(9, 3.5))
    ax = fig.subplots()
    for name, (x, dice) in series.items():
        ax.plot(x, dice, marker=".", lw=1, label=name)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Dice")
    ax.grid(alpha=0.3)
    if len(series) <= 12:
        ax.legend(fontsize=8, loc="lower right")
    return png(fig)


def threshold_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float], float]]) -> bytes:
    """Validation Dice against the threshold per class, the chosen threshold marked."""
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    for name, (thresholds, dice, chosen) in curves.items():
        (line,) = ax.plot(thresholds, dice, lw=1, label=name)
        ax.plot([chosen], [np.interp(chosen, thresholds, dice)], "o", color=line.get_color())
    ax.set_xlabel("threshold")
    ax.set_ylabel("mean validation Dice (out of fold)")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    if len(curves) <= 12:
        ax.legend(fontsize=8)
    return png(fig)
