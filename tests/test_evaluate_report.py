"""The report of a small two-class dataset written to disk: it opens with the summary table, shows
the worst cases as overlays, the class confusion and the recorded threshold curves, and the
Markdown links exactly the figures written beside it."""
import io
import re

import numpy as np
import pytest
from PIL import Image

from segpipe.config import EvaluateConfig
from segpipe.evaluate import evaluate_ensemble
from segpipe.evaluate_report import Stores, report_blocks, write_report
from segpipe.evaluate_tables import metrics_json
from segpipe.overlays import frame_maps, pooled
from segpipe.store import CaseStore

CLASSES = ["bone", "joint"]
CURVE = {"thresholds": [0.25, 0.5, 0.75], "val_dice": [0.4, 0.6, 0.5]}


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    images = CaseStore.create(tmp_path / "images.zarr", dataset="d", classes=CLASSES)
    labels = CaseStore.create(tmp_path / "labels.zarr", dataset="d", classes=CLASSES)
    thresholds = {"bone": {"threshold": 0.5, "source": "tuned", "val_dice": 0.6, "val_dice_curve": CURVE},
                  "joint": {"threshold": 0.5, "source": "tuning off"}}
    ensemble = CaseStore.create(tmp_path / "ens.zarr", dataset="d", classes=CLASSES, thresholds=thresholds)
    member = CaseStore.create(tmp_path / "m.zarr", dataset="d", classes=CLASSES, model={"arch": "unet", "fold": 0})
    for i in range(3):
        truth = np.zeros((2, 40, 30), np.uint8)
        truth[0, 5:30, 5:15], truth[1, 28:35, 5:15] = 1, 1
        pred = truth.copy()
        pred[0, 5:30 - 5 * i] = 0 if i else pred[0, 5:30]  # case 2 misses most of the bone
        pred[1, 5:30 - 5 * i, 5:15] |= np.uint8(i > 0)  # ... and calls it joint there
        attrs = {"kind": "image", "role": "test"}
        for store, name, data in ((images, "image", (rng.random((40, 30)) * 255).astype(np.uint8)),
                                  (labels, "mask", truth), (ensemble, "mask", pred),
                                  (member, "prob", pred.astype(np.float16))):
            store.write_case(f"c{i}", attrs)
            store.write_array(f"c{i}", name, data)
    return images, labels, ensemble, member


def test_the_report_opens_with_the_summary_and_shows_worst_cases_confusion_and_curves(dataset, tmp_path):
    images, labels, ensemble, member = dataset
    ev = evaluate_ensemble(ensemble, labels, [member], ["c0", "c1", "c2"], tolerance=1.0)
    metrics = metrics_json(ev, 3)
    blocks = report_blocks("d", ev, metrics, Stores(images, labels, ensemble), EvaluateConfig(worst_cases=2), fps={})
    write_report(tmp_path / "out", "d", blocks)

    page = (tmp_path / "out" / "report.html").read_text()
    first_table = page[page.index("<table>"): page.index("</table>")]
    assert page.index("<table>") < page.index("<img")  # the summary table comes first
    assert re.findall(r"<tr><td>([^<]+)</td>", first_table) == ["ensemble", "unet-fold0"]
    assert "The 2 worst cases" in page and "Class confusion" in page
    md = (tmp_path / "out" / "report.md").read_text()
    linked = re.findall(r"\]\(figures/([^)]+)\)", md)
    assert sorted(linked) == sorted(p.name for p in (tmp_path / "out" / "figures").glob("*.png"))
    expected = {"worst1.png", "worst2.png", "class_confusion.png", "threshold_curves.png", "dice_per_class.png"}
    assert set(linked) == expected
    worst1 = Image.open(io.BytesIO((tmp_path / "out" / "figures" / "worst1.png").read_bytes()))
    assert worst1.width > 2.5 * worst1.height  # four panels side by side
    assert "![c2: Dice" in md  # the case that missed most of its bone is the worst
    # The confusion table names what took the bone's missed pixels: the joint.
    assert "| bone | joint |" in md


def test_overlay_maps_keep_a_one_pixel_miss_visible_when_reduced(dataset):
    images, labels, ensemble, _ = dataset
    maps = frame_maps(images, labels, ensemble, "c2", 0, size=10)  # 40 rows -> step 4
    assert maps.image.shape == maps.missed.shape == (10, 8)
    assert maps.missed.any() and maps.truth.max() == 2


def test_pooling_keeps_any_pixel_of_a_block():
    mask = np.zeros((5, 5), bool)
    mask[4, 4] = True
    assert pooled(mask, 2).tolist() == [[False] * 3, [False] * 3, [False, False, True]]
