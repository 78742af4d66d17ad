"""The `split` stage: K folds grouped by speaker/patient/video, stratified where the dataset has
strata (params `split.stratify`), plus a held-out test set."""
from __future__ import annotations

import argparse
from pathlib import Path

from segpipe.atomic import write_json
from segpipe.errors import ConfigError
from segpipe.splits import make_split, strata_of
from segpipe.store import CaseStore
from tasks import common


def build_parser() -> argparse.ArgumentParser:
    p = common.dataset_parser(__doc__, "labels")
    p.add_argument("--out", type=Path, help="default: data/splits/<dataset>.json")
    return p


def test_cases(path: Path | None) -> list[str] | None:
    """The case ids listed in `path`, one a line (blank lines skipped), or None without a file."""
    if path is None:
        return None
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise ConfigError(f"{path}: split.test_list: cannot read ({exc.strerror})") from exc


def main(ns: argparse.Namespace) -> None:
    cfg = common.params_of(ns).split
    out = common.output_file(ns.out or common.SPLITS / f"{ns.dataset}.json")
    labels = CaseStore(ns.labels or common.labels_path(ns.dataset))
    groups = {c: labels.case_attrs(c)["group"] for c in labels.case_ids() if labels.has(c, "mask")}
    strata = strata_of(labels, sorted(groups), cfg.stratify_for(ns.dataset), cfg.area_bins)
    split = make_split(groups, cfg.k, cfg.seed, cfg.test_fraction, strata, test_cases(cfg.test_list.get(ns.dataset)))
    write_json(out, split.to_json())
    sizes = ", ".join(f"fold{i} {len(f.val)}" for i, f in enumerate(split.folds))
    print(f"split {ns.dataset}: {len(groups)} cases, {len(set(strata.values())) or 1} strata, "
          f"test {len(split.test)}, {sizes} -> {out}")


if __name__ == "__main__":
    common.run(main, build_parser())
