"""One table of every dataset's headline test metrics (what `make demo` prints at the end).

    python -m tasks.summary [--reports reports]

`dvc metrics show` lists every metric of every stage (29 bones, tuned thresholds, ...); this shows
the ensemble's mean Dice, IoU, precision and recall per dataset, and Dice against the demo's
true airway where the evaluate stage measured it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tasks import common

COLUMNS = ("dice", "iou", "precision", "recall")


def rows(reports: Path) -> list[str]:
    lines = [f"{'dataset':<12}{'cases':>7}" + "".join(f"{c:>11}" for c in COLUMNS) + f"{'dice vs truth':>15}"]
    for path in sorted(reports.glob("*/metrics.json")):
        m = json.loads(path.read_text())
        truth = m.get("vs_truth", {}).get("dice")
        lines.append(
            f"{path.parent.name:<12}{m.get('n_cases', ''):>7}" + "".join(f"{m[c]:>11.3f}" for c in COLUMNS)
            + (f"{truth:>15.3f}" if truth is not None else f"{'-':>15}")
        )
    return lines


def main(ns: argparse.Namespace) -> None:
    print("\n".join(rows(ns.reports)))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reports", type=Path, default=common.REPORTS)
    common.run(main, p)
