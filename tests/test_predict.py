"""`tasks.predict` on new data: the pipeline's own answer, bit for bit, and the files a person opens."""
from __future__ import annotations

import csv
import json
import logging
import shutil
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from segpipe.config import PredictConfig
from segpipe.errors import IngestError
from segpipe.predict import input_scan
from segpipe.prediction_files import CaseTally, label_map, overlay, palette
from segpipe.progress import Progress
from segpipe.store import CaseStore
from tests.pipeline_repo import sh

DATASETS = ("kvasir", "usc_timit", "hand_xray")


def run_predict(repo: Path, *args: str, check: bool = True):
    return sh(repo, sys.executable, "-m", "tasks.predict", *args, check=check)


def ensemble_store(repo: Path, dataset: str) -> CaseStore:
    return CaseStore(repo / "data" / "predictions" / dataset / "ensemble.zarr")


# --- pieces -------------------------------------------------------------------------------------


def test_overlapping_classes_are_labelled_by_the_most_probable_and_unmasked_pixels_by_zero():
    prob = np.array([[[0.9, 0.6, 0.2]], [[0.7, 0.8, 0.1]]], dtype=np.float32)[None]  # (1, K=2, 1, 3)
    mask = prob >= np.array([0.5, 0.75], dtype=np.float32)[None, :, None, None]
    assert label_map(prob, mask).tolist() == [[[1, 2, 0]]]


def test_an_overlay_tints_only_labelled_pixels_in_their_class_colour():
    grey = np.full((2, 2), 100, dtype=np.uint8)
    labels = np.array([[0, 1], [2, 0]], dtype=np.uint8)
    colours = palette(2)
    out = overlay(grey, labels, colours)
    assert out.shape == (2, 2, 3) and out[0, 0].tolist() == [100, 100, 100]
    assert colours[1].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [round(0.55 * 100 + 0.45 * 255), 55, 55]
    assert out[1, 0].tolist() != out[0, 1].tolist()


def test_each_class_row_has_its_area_mean_probability_and_low_confidence_flag():
    tally = CaseTally.empty(3)
    prob = np.zeros((2, 3, 2, 2), dtype=np.float32)  # two frames
    prob[:, 0, 0, :] = 0.9  # a confident region: 2 px a frame
    prob[0, 1, 0, 0] = 0.6  # an unsure region: 1 px in one frame
    prob[:, 2, 1, 1] = 0.3  # no region, but above half the threshold: a near miss
    mask = prob >= 0.5
    tally.add(prob, mask)
    rows = tally.rows("c", ["a", "b", "z"], [0.5, 0.5, 0.5], frames=2, cfg=PredictConfig(min_confidence=0.75))
    assert [(r["class"], r["area_px"], r["mean_probability"], r["low_confidence"]) for r in rows] == [
        ("a", 2.0, 0.9, False), ("b", 0.5, 0.6, True), ("z", 0.0, "", True)]
    assert rows[2]["max_probability"] == 0.3


def test_progress_off_a_terminal_logs_a_line_every_twentieth_with_rate_and_eta_and_one_at_the_end(caplog):
    with caplog.at_level(logging.INFO, logger="segpipe.progress"):
        with Progress("infer x", 200, terminal=False) as progress:
            for _ in range(200):
                progress.update()
        with Progress("infer y", 12, terminal=False) as progress:
            progress.update(12)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 21
    assert lines[0].startswith("infer x: 10/200 cases (") and "ETA" in lines[0]
    assert lines[19].startswith("infer x: 200/200 cases") and "ETA" not in lines[19]
    assert lines[20].startswith("infer y: 12/12 cases")


def test_an_input_is_one_file_a_folder_of_files_alone_or_the_datasets_raw_layout(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("b.jpg", "a.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(flat / name)
    (flat / "notes.txt").write_text("not an image")
    scan, root = input_scan("kvasir", flat)
    assert root == flat and [(c.case_id, c.label) for c in scan.cases] == [("a", None), ("b", None)]
    assert [str(problem) for problem in scan.problems] == [f"{flat / 'notes.txt'}: not a Kvasir image: "
                                                           "expected one of ['.jpeg', '.jpg', '.png']"]
    scan, root = input_scan("kvasir", flat / "a.png")
    assert root == flat and [c.case_id for c in scan.cases] == ["a"]
    (tmp_path / "layout" / "images").mkdir(parents=True)
    (flat / "b.jpg").rename(tmp_path / "layout" / "images" / "b.jpg")
    scan, root = input_scan("kvasir", tmp_path / "layout")  # images/ without masks/: unlabelled
    assert root == tmp_path / "layout" and [(c.case_id, c.label) for c in scan.cases] == [("b", None)]

    scan, _ = input_scan("hand_xray", flat / "a.png")  # one X-ray: an unlabelled test image
    assert [(c.case_id, c.label, c.meta) for c in scan.cases] == [("a", None, {"split": "test"})]
    (flat / "clip.avi").write_bytes(b"")
    scan, _ = input_scan("usc_timit", flat / "clip.avi")
    assert [(c.case_id, c.group, c.label) for c in scan.cases] == [("clip", "clip", None)]
    with pytest.raises(IngestError, match=r"notes\.txt: not a video"):
        input_scan("usc_timit", flat / "notes.txt")


# --- the trained demo ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def predicted(trained_repo, tmp_path_factory):
    """Each dataset's ingest store (train, validation and test cases alike) predicted by tasks.predict."""
    out = tmp_path_factory.mktemp("predicted")
    for dataset in DATASETS:
        run_predict(trained_repo, "--dataset", dataset, "--input", f"data/interim/{dataset}.zarr",
                    "--out", str(out / dataset))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dataset", DATASETS)
def test_predict_gives_the_ensemble_stages_probabilities_and_masks_bit_for_bit(trained_repo, predicted, dataset):
    ensemble, ours = ensemble_store(trained_repo, dataset), CaseStore(predicted / dataset / "predictions.zarr")
    images = CaseStore(trained_repo / "data" / "interim" / f"{dataset}.zarr")
    assert ours.case_ids() == images.case_ids()
    assert set(ensemble.case_ids()) < set(ours.case_ids())  # the test cases, among all
    for case_id in ensemble.case_ids():
        for name in ("prob", "mask"):
            expected, got = ensemble.read(case_id, name), ours.read(case_id, name)
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got, expected, err_msg=f"{dataset}/{case_id}/{name}")


@pytest.mark.slow
def test_kvasir_files_are_a_png_mask_and_overlay_per_image_at_its_size_and_a_csv_row_each(trained_repo, predicted):
    out, images = predicted / "kvasir", CaseStore(trained_repo / "data" / "interim" / "kvasir.zarr")
    store = CaseStore(out / "predictions.zarr")
    assert sorted(p.stem for p in (out / "masks").glob("*.png")) == images.case_ids()
    for case_id in images.case_ids():
        size = tuple(images.case_attrs(case_id)["original_size"])
        mask = np.asarray(Image.open(out / "masks" / f"{case_id}.png"))
        np.testing.assert_array_equal(mask, store.read(case_id, "mask")[0] * 255)
        overlay_png = Image.open(out / "overlays" / f"{case_id}.png")
        assert overlay_png.mode == "RGB" and overlay_png.size[::-1] == size == mask.shape
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows] == images.case_ids()
    for row in rows:
        area = int((store.read(row["case_id"], "mask") > 0).sum())
        assert float(row["area_px"]) == area and row["class"] == "polyp"
    summary = json.loads((out / "predict.json").read_text())
    assert summary["cases"] == images.case_ids() and summary["skipped"] == []


@pytest.mark.slow
def test_hand_labels_png_holds_the_class_of_each_masked_pixel(predicted):
    out = predicted / "hand_xray"
    store = CaseStore(out / "predictions.zarr")
    for case_id in store.case_ids():
        labels = np.asarray(Image.open(out / "labels" / f"{case_id}.png"))
        mask = store.read(case_id, "mask").astype(bool)
        assert labels.shape == mask.shape[1:] and labels.max() <= len(store.classes)
        np.testing.assert_array_equal(labels > 0, mask.any(axis=0))
        ys, xs = np.nonzero(labels)
        assert mask[labels[ys, xs] - 1, ys, xs].all()  # the label is one of the pixel's classes


@pytest.mark.slow
def test_video_masks_keep_their_frame_timestamps_and_the_overlay_mp4_has_every_frame(trained_repo, predicted):
    out, images = predicted / "usc_timit", CaseStore(trained_repo / "data" / "interim" / "usc_timit.zarr")
    store = CaseStore(out / "predictions.zarr")
    for case_id in store.case_ids():
        frames = store.array(case_id, "mask").shape[0]
        np.testing.assert_array_equal(store.read(case_id, "timestamps"), images.read(case_id, "timestamps"))
        with av.open(str(out / "overlays" / f"{case_id}.mp4")) as video:
            decoded = [frame.to_ndarray(format="rgb24") for frame in video.decode(video=0)]
        assert len(decoded) == frames
        assert decoded[0].shape[:2] == tuple(side + side % 2 for side in store.array(case_id, "mask").shape[-2:])


@pytest.mark.slow
def test_a_folder_of_images_alone_is_predicted_and_a_bad_file_fails_in_one_line_or_is_skipped(trained_repo, tmp_path):
    ensemble = ensemble_store(trained_repo, "kvasir")
    images = CaseStore(trained_repo / "data" / "interim" / "kvasir.zarr")
    new = tmp_path / "new" / "images"
    new.mkdir(parents=True)
    for case_id in ensemble.case_ids():
        source = images.case_attrs(case_id)["source"]
        shutil.copy(trained_repo / "data" / "raw" / "demo" / "kvasir" / source, new / Path(source).name)
    (new / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")

    failed = run_predict(trained_repo, "--dataset", "kvasir", "--input", str(new), "--out",
                         str(tmp_path / "out"), check=False)
    assert failed.returncode == 1 and not (tmp_path / "out").exists()
    error = failed.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "broken.jpg" in error

    run_predict(trained_repo, "--dataset", "kvasir", "--input", str(new), "--out", str(tmp_path / "out"),
                "--on-error", "skip")
    ours = CaseStore(tmp_path / "out" / "predictions.zarr")
    assert ours.case_ids() == ensemble.case_ids()
    for case_id in ensemble.case_ids():
        np.testing.assert_array_equal(ours.read(case_id, "mask"), ensemble.read(case_id, "mask"))
    summary = json.loads((tmp_path / "out" / "predict.json").read_text())
    assert [entry["source"] for entry in summary["skipped"]] == ["broken.jpg"]


@pytest.mark.slow
def test_one_image_file_is_predicted_and_a_folder_of_the_users_is_never_replaced(trained_repo, tmp_path):
    ensemble = ensemble_store(trained_repo, "kvasir")
    images = CaseStore(trained_repo / "data" / "interim" / "kvasir.zarr")
    case_id = ensemble.case_ids()[0]
    image = trained_repo / "data" / "raw" / "demo" / "kvasir" / images.case_attrs(case_id)["source"]
    run_predict(trained_repo, "--dataset", "kvasir", "--input", str(image), "--out", str(tmp_path / "one"))
    mask = np.asarray(Image.open(tmp_path / "one" / "masks" / f"{case_id}.png"))
    np.testing.assert_array_equal(mask, ensemble.read(case_id, "mask")[0] * 255)
    # A rerun replaces predict's own earlier output; a user's folder is refused before any work.
    run_predict(trained_repo, "--dataset", "kvasir", "--input", str(image), "--out", str(tmp_path / "one"))
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    refused = run_predict(trained_repo, "--dataset", "kvasir", "--input", str(image), "--out", str(user),
                          check=False)
    assert refused.returncode == 1 and "refusing to replace it" in refused.stderr
    assert (user / "notes.txt").read_text() == "keep me" and sorted(p.name for p in user.iterdir()) == ["notes.txt"]
