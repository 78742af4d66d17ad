"""The ingest stage: raw layouts -> Zarr store, its error policy, and the `tasks.ingest` CLI."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segpipe.config import IngestConfig
from segpipe.errors import IngestError
from segpipe.ingest import IngestReport, ingest
from segpipe.store import CaseStore
from tasks import ingest as stage
from tests.conftest import SHARED_DATA, needs_shared_data

ROOT = Path(__file__).resolve().parents[1]
FAIL, SKIP = IngestConfig(on_error="fail"), IngestConfig(on_error="skip")
SQUARE = [[10, 10], [30, 10], [30, 30], [10, 30]]


def kvasir_pair(raw: Path, stem: str, size=(40, 32), mask_size=None) -> None:
    for sub in ("images", "masks"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(raw / "images" / f"{stem}.jpg")
    w, h = mask_size or size
    mask = np.zeros((h, w, 3), np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(raw / "masks" / f"{stem}.jpg")


def xray(raw: Path, split: str, patient: str, stem: str, annotations=None) -> None:
    png = raw / split / "DCM" / patient / f"{stem}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(png)
    if annotations is not None:
        doc = raw / split / "outputs_json" / patient / f"{stem}.json"
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(json.dumps({"annotations": [{"label": lab, "points": pts} for lab, pts in annotations]}))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def good_kvasir(raw: Path) -> list[str]:
    for stem in ("a", "b", "c"):
        kvasir_pair(raw, stem)
    return ["a", "b", "c"]


def good_hand(raw: Path) -> list[str]:
    xray(raw, "train", "ID001", "g1", [("Radius", SQUARE)])
    xray(raw, "test", "ID040", "g2")
    return ["g1", "g2"]


def bad_missing_mask(raw):
    kvasir_pair(raw, "bad")
    (raw / "masks" / "bad.jpg").unlink()


def bad_truncated_png(raw):
    xray(raw, "test", "ID002", "bad")
    truncate(raw / "test/DCM/ID002/bad.png")


def bad_truncated_jpeg(raw):
    kvasir_pair(raw, "bad")
    noise = np.random.default_rng(0).integers(0, 255, (32, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(raw / "images/bad.jpg")  # noise: a file with data past its header
    truncate(raw / "images/bad.jpg")


# kind -> (dataset, writes the bad input, the file named, the problem named)
BAD = {
    "missing mask": ("kvasir", bad_missing_mask, "images/bad.jpg", "image without its mask"),
    "size mismatch": ("kvasir", lambda r: kvasir_pair(r, "bad", mask_size=(32, 40)),
                      "masks/bad.jpg", "mask size"),
    "truncated jpeg": ("kvasir", bad_truncated_jpeg, "images/bad.jpg", "corrupt or truncated image"),
    "stray file": ("kvasir", lambda r: (r / "images" / "bad.txt").write_text("x"),
                   "images/bad.txt", "stray entry"),
    "truncated png": ("hand_xray", bad_truncated_png, "test/DCM/ID002/bad.png", "corrupt or truncated image"),
    "unknown label": ("hand_xray", lambda r: xray(r, "train", "ID002", "bad", [("Femur", SQUARE)]),
                      "train/outputs_json/ID002/bad.json", "unknown label 'Femur'"),
    "degenerate polygon": ("hand_xray", lambda r: xray(r, "train", "ID002", "bad", [("Ulna", [[1, 1], [9, 9]])]),
                           "train/outputs_json/ID002/bad.json", "degenerate polygon"),
}


def bad_layout(tmp_path: Path, kind: str) -> tuple[str, Path, list[str], str, str]:
    dataset, write_bad, bad_file, problem = BAD[kind]
    raw = tmp_path / "raw"
    good = (good_kvasir if dataset == "kvasir" else good_hand)(raw)
    write_bad(raw)
    return dataset, raw, good, bad_file, problem


@pytest.mark.parametrize("kind", BAD)
def test_fail_policy_names_the_file_and_problem_and_writes_no_store(tmp_path, kind):
    dataset, raw, _, bad_file, problem = bad_layout(tmp_path, kind)
    out = tmp_path / "out.zarr"
    with pytest.raises(IngestError) as err:
        ingest(dataset, raw, out, FAIL)
    assert str(err.value).startswith(str(raw / bad_file) + ":") and problem in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no store, no temporary left over


@pytest.mark.parametrize("kind", ["missing mask", "truncated png"])
def test_fail_policy_leaves_a_previous_store_intact(tmp_path, kind):
    dataset, raw, good, bad_file, _ = bad_layout(tmp_path, kind)
    out = tmp_path / "out.zarr"
    (raw / bad_file).rename(tmp_path / "aside")
    ingest(dataset, raw, out, FAIL)
    (tmp_path / "aside").rename(raw / bad_file)
    with pytest.raises(IngestError):
        ingest(dataset, raw, out, FAIL)
    assert CaseStore(out).case_ids() == good


@pytest.mark.parametrize("kind", BAD)
def test_skip_policy_ingests_every_good_case_and_lists_the_bad_one(tmp_path, kind):
    dataset, raw, good, bad_file, problem = bad_layout(tmp_path, kind)
    out = tmp_path / "out.zarr"
    report = ingest(dataset, raw, out, SKIP)
    assert (report.found, report.ingested) == (len(good) + 1, len(good))
    assert [s["source"] for s in report.skipped] == [bad_file] and problem in report.skipped[0]["reason"]
    store = CaseStore(out)
    assert store.case_ids() == good
    assert store.attrs["skipped"] == report.skipped and store.attrs["found"] == report.found


def test_duplicate_case_ids_are_an_error_under_either_policy(tmp_path):
    xray(tmp_path, "test", "ID001", "same")
    xray(tmp_path, "test", "ID002", "same")
    with pytest.raises(IngestError, match=r"ID002/same\.png: duplicate case id 'same'"):
        ingest("hand_xray", tmp_path, tmp_path / "out.zarr", FAIL)
    report = ingest("hand_xray", tmp_path, tmp_path / "out.zarr", SKIP)
    assert (report.found, report.ingested, len(report.skipped)) == (2, 1, 1)
    assert CaseStore(tmp_path / "out.zarr").case_attrs("same")["group"] == "ID001"


def test_a_dataset_with_no_good_case_is_an_error_even_when_skipping(tmp_path):
    bad_missing_mask(tmp_path)
    with pytest.raises(IngestError, match="no case could be ingested"):
        ingest("kvasir", tmp_path, tmp_path / "out.zarr", SKIP)
    assert not (tmp_path / "out.zarr").exists()


def test_synthetic_hand_layout_writes_29_channel_masks_for_train_and_none_for_test(tmp_path):
    good_hand(tmp_path)
    ingest("hand_xray", tmp_path, tmp_path / "out.zarr", FAIL)
    store = CaseStore(tmp_path / "out.zarr")
    assert store.classes[27:] == ["Radius", "Ulna"] and store.attrs["ingest"] == FAIL.model_dump()
    mask = store.array("g1", "mask")[:]
    assert mask.shape == (29, 64, 64) and mask[27].sum() == 21 * 21 and mask.sum() == 21 * 21
    assert not store.has("g2", "mask")
    assert store.case_attrs("g1")["label_source"] == "train/outputs_json/ID001/g1.json"
    assert {k: store.case_attrs("g2")[k] for k in ("split", "labelled", "group")} == {
        "split": "test", "labelled": False, "group": "ID040"}


def link_first(src: Path, dst: Path, n: int) -> None:
    """A raw layout holding the first n Kvasir pairs, as symlinks to the real files."""
    for sub in ("images", "masks"):
        (dst / sub).mkdir(parents=True)
        for path in sorted((src / sub).iterdir())[:n]:
            (dst / sub / path.name).symlink_to(path)
    (dst / "kavsir_bboxes.json").symlink_to(src / "kavsir_bboxes.json")


@needs_shared_data
def test_real_kvasir_cases_land_in_the_store_with_their_provenance(tmp_path):
    real = SHARED_DATA / "kvasir-seg"
    link_first(real, tmp_path / "raw", 40)
    report = ingest("kvasir", tmp_path / "raw", tmp_path / "k.zarr", FAIL)
    assert (report.found, report.ingested, report.skipped) == (40, 40, [])
    store = CaseStore(tmp_path / "k.zarr")
    assert len(store.case_ids()) == 40 and store.attrs["classes"] == ["polyp"]
    for case_id in store.case_ids()[:10]:
        attrs = store.case_attrs(case_id)
        image = np.asarray(Image.open(real / "images" / f"{case_id}.jpg").convert("RGB"))
        assert attrs["source"] == f"images/{case_id}.jpg" and attrs["group"] == case_id
        assert attrs["sha256"] == hashlib.sha256((real / attrs["source"]).read_bytes()).hexdigest()
        assert attrs["label_sha256"] == hashlib.sha256((real / attrs["label_source"]).read_bytes()).hexdigest()
        assert attrs["original_size"] == list(image.shape[:2]) and attrs["kind"] == "image"
        np.testing.assert_array_equal(store.array(case_id, "image")[:], image)
        expected = np.asarray(Image.open(real / attrs["label_source"]).convert("L")) > 127
        np.testing.assert_array_equal(store.array(case_id, "mask")[0], expected)


@needs_shared_data
def test_real_videos_of_both_usc_layouts_ingest_into_one_store(tmp_path):
    raw = tmp_path / "raw"
    (raw / "F2" / "mri").mkdir(parents=True)
    (raw / "F2" / "mri" / "F2_400.avi").symlink_to(SHARED_DATA / "usc-timit/F2/mri/F2_400.avi")
    (raw / "sub001" / "2drt").mkdir(parents=True)
    (raw / "sub001" / "2drt" / "video").symlink_to(SHARED_DATA / "usc-75-speaker/sub001/2drt/video")
    ingest("usc_timit", raw, tmp_path / "u.zarr", IngestConfig(video_chunk_frames=8))
    store = CaseStore(tmp_path / "u.zarr")
    f2, sub = store.case_ids()
    assert store.array(f2, "image").shape == (69, 68, 68) and store.array(sub, "image").shape == (3216, 84, 84)
    assert store.array(sub, "image").chunks == (8, 84, 84) and store.is_video(sub)
    assert store.case_attrs(f2)["warmup_frames"] == 0 and store.case_attrs(sub)["warmup_frames"] > 20
    assert store.case_attrs(sub)["original_size"] == [84, 84] and store.case_attrs(f2)["group"] == "F2"
    assert store.array(sub, "timestamps").shape == (3216,) and not store.has(sub, "mask")


@needs_shared_data
def test_real_rsna_xray_ingests_unlabelled_at_2044_by_1514(tmp_path):
    (tmp_path / "raw" / "test" / "DCM" / "ID900").mkdir(parents=True)
    (tmp_path / "raw" / "test" / "DCM" / "ID900" / "1377.png").symlink_to(SHARED_DATA / "hand-xray-rsna" / "1377.png")
    ingest("hand_xray", tmp_path / "raw", tmp_path / "h.zarr", FAIL)
    store = CaseStore(tmp_path / "h.zarr")
    image = store.array("1377", "image")
    assert image.shape == (2044, 1514) and image.chunks == (512, 512) and not store.has("1377", "mask")
    attrs = store.case_attrs("1377")
    assert attrs["labelled"] is False and attrs["original_size"] == [2044, 1514] and attrs["group"] == "ID900"


def test_stage_writes_the_store_and_the_report_json(tmp_path, capsys):
    good_kvasir(tmp_path / "raw")
    args = ["--dataset", "kvasir", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "k.zarr"),
            "--report", str(tmp_path / "r" / "ingest.json"), "--params", str(ROOT / "params.yaml")]
    stage.main(stage.build_parser().parse_args(args))
    report = json.loads((tmp_path / "r" / "ingest.json").read_text())
    assert report == IngestReport("kvasir", found=3, ingested=3).to_json()
    assert CaseStore(tmp_path / "k.zarr").case_ids() == ["a", "b", "c"]
    assert "3 of 3 ingested" in capsys.readouterr().out


def test_stage_cli_has_help_and_exits_1_with_one_clear_line_on_bad_input(tmp_path):
    run = [sys.executable, "-m", "tasks.ingest"]
    assert "--dataset" in subprocess.run([*run, "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    bad_missing_mask(tmp_path / "raw")
    proc = subprocess.run([*run, "--dataset", "kvasir", "--raw", str(tmp_path / "raw"), "--out",
                           str(tmp_path / "k.zarr"), "--report", str(tmp_path / "r.json")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1
    assert f"error: {tmp_path / 'raw/images/bad.jpg'}: image without its mask" in proc.stderr
    assert not (tmp_path / "k.zarr").exists() and not (tmp_path / "r.json").exists()
