"""The ingest stage: raw layouts -> Zarr store, its error policy, incremental reruns, Dask, and
the `tasks.ingest` CLI."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from dask.utils import key_split
from distributed import LocalCluster
from distributed.diagnostics.plugin import SchedulerPlugin
from PIL import Image

from segpipe.config import DaskConfig, HandXrayDemo, IngestConfig
from segpipe.datasets import RawCase, demo_hand, reader
from segpipe.errors import IngestError
import segpipe.ingest
from segpipe.ingest import IngestReport, ingest, map_bounded, task_batches
from segpipe.parallel import dask_client
from segpipe.store import CaseStore
from tasks import ingest as stage
from tests.conftest import SHARED_DATA, needs_shared_data
from tests.usc_files import vocal_tract, write_mp4, write_recon
from tests.hanging_worker import HANG_AT
from tests.pipeline_repo import dvc, make_repo, ran_stages
from tests.polygons import centres_in_or_on

ROOT = Path(__file__).resolve().parents[1]
FAIL, SKIP = IngestConfig(on_error="fail"), IngestConfig(on_error="skip")
SQUARE = [[10, 10], [30, 10], [30, 30], [10, 30]]


@pytest.fixture(scope="module")
def client():
    """One LocalCluster of worker processes for the module (as the stage starts by default), so
    cases really travel to other processes and back."""
    with dask_client(DaskConfig(n_workers=2, threads_per_worker=1)) as c:
        yield c


def kvasir_pair(raw: Path, stem: str, size=(40, 32), mask_size=None, value=90) -> None:
    for sub in ("images", "masks"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(raw / "images" / f"{stem}.jpg")
    w, h = mask_size or size
    mask = np.zeros((h, w, 3), np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(raw / "masks" / f"{stem}.jpg")


def write_boxes(raw: Path, height: dict[str, int]) -> None:
    """A bounding-box JSON for Kvasir pairs of 40 x 32 px (kvasir_pair's), each with the height given."""
    box = {"label": "polyp", "xmin": 4, "ymin": 4, "xmax": 12, "ymax": 12}
    entries = {stem: {"height": h, "width": 40, "bbox": [box]} for stem, h in height.items()}
    (raw / "kavsir_bboxes.json").write_text(json.dumps(entries))


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


def good_usc(raw: Path) -> list[str]:
    for clip in ("s1", "s2"):
        write_mp4(raw / "sub001" / "2drt" / "video" / f"{clip}.mp4", vocal_tract(6))
    return ["sub001_s1", "sub001_s2"]


def bad_missing_mask(raw):
    kvasir_pair(raw, "bad")
    (raw / "masks" / "bad.jpg").unlink()


def bad_truncated_png(raw):
    xray(raw, "test", "ID002", "bad")
    truncate(raw / "test/DCM/ID002/bad.png")


def bad_garbled_mp4(raw):
    video = raw / "sub001" / "2drt" / "video" / "bad.mp4"
    write_mp4(video, vocal_tract(6))
    video.write_bytes(b"\0" * 64 + video.read_bytes()[64:])  # its header zeroed


def bad_truncated_jpeg(raw):
    kvasir_pair(raw, "bad")
    noise = np.random.default_rng(0).integers(0, 255, (32, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(raw / "images/bad.jpg")  # noise: a file with data past its header
    truncate(raw / "images/bad.jpg")


def bad_bbox_size(raw):
    kvasir_pair(raw, "bad")
    write_boxes(raw, {"a": 32, "b": 32, "c": 32, "bad": 33})


# kind -> (dataset, writes the bad input, the file named, the problem named)
BAD = {
    "missing mask": ("kvasir", bad_missing_mask, "images/bad.jpg", "image without its mask"),
    "size mismatch": ("kvasir", lambda r: kvasir_pair(r, "bad", mask_size=(32, 40)),
                      "masks/bad.jpg", "mask size"),
    "truncated jpeg": ("kvasir", bad_truncated_jpeg, "images/bad.jpg", "corrupt or truncated image"),
    "stray file": ("kvasir", lambda r: (r / "images" / "bad.txt").write_text("x"),
                   "images/bad.txt", "stray entry"),
    "size unlike the bbox json": ("kvasir", bad_bbox_size, "images/bad.jpg",
                                  "!= 40x33 (WxH) recorded in kavsir_bboxes.json"),
    "corrupt video": ("usc_timit", bad_garbled_mp4, "sub001/2drt/video/bad.mp4", "corrupt or undecodable video"),
    "truncated png": ("hand_xray", bad_truncated_png, "test/DCM/ID002/bad.png", "corrupt or truncated image"),
    "unknown label": ("hand_xray", lambda r: xray(r, "train", "ID002", "bad", [("Femur", SQUARE)]),
                      "train/outputs_json/ID002/bad.json", "unknown label 'Femur'"),
    "degenerate polygon": ("hand_xray", lambda r: xray(r, "train", "ID002", "bad", [("Ulna", [[1, 1], [9, 9]])]),
                           "train/outputs_json/ID002/bad.json", "degenerate polygon"),
}


def bad_layout(tmp_path: Path, kind: str) -> tuple[str, Path, list[str], str, str]:
    dataset, write_bad, bad_file, problem = BAD[kind]
    raw = tmp_path / "raw"
    good = {"kvasir": good_kvasir, "usc_timit": good_usc, "hand_xray": good_hand}[dataset](raw)
    write_bad(raw)
    return dataset, raw, good, bad_file, problem


@pytest.mark.parametrize("kind", BAD)
def test_fail_policy_names_the_file_and_problem_and_writes_no_store(tmp_path, kind, client):
    dataset, raw, _, bad_file, problem = bad_layout(tmp_path, kind)
    out = tmp_path / "out.zarr"
    with pytest.raises(IngestError) as err:
        ingest(dataset, raw, out, FAIL, client)
    assert str(err.value).startswith(str(raw / bad_file) + ":") and problem in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no store, no temporary left over


@pytest.mark.parametrize("kind", ["missing mask", "truncated png"])
def test_fail_policy_leaves_a_previous_store_intact(tmp_path, kind, client):
    dataset, raw, good, bad_file, _ = bad_layout(tmp_path, kind)
    out = tmp_path / "out.zarr"
    (raw / bad_file).rename(tmp_path / "aside")
    ingest(dataset, raw, out, FAIL, client)
    before = files_of(out)
    (tmp_path / "aside").rename(raw / bad_file)
    with pytest.raises(IngestError):
        ingest(dataset, raw, out, FAIL, client)
    assert CaseStore(out).case_ids() == good and files_of(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr", "raw"]  # no temporary left over


@pytest.mark.parametrize("kind", BAD)
def test_skip_policy_ingests_every_good_case_and_lists_the_bad_one(tmp_path, kind, client):
    dataset, raw, good, bad_file, problem = bad_layout(tmp_path, kind)
    out = tmp_path / "out.zarr"
    report = ingest(dataset, raw, out, SKIP, client)
    assert (report.found, report.ingested) == (len(good) + 1, len(good))
    assert [s["source"] for s in report.skipped] == [bad_file] and problem in report.skipped[0]["reason"]
    store = CaseStore(out)
    assert store.case_ids() == good
    assert store.attrs["skipped"] == report.skipped and store.attrs["found"] == report.found


def test_duplicate_case_ids_are_an_error_under_either_policy(tmp_path, client):
    xray(tmp_path, "test", "ID001", "same")
    xray(tmp_path, "test", "ID002", "same")
    with pytest.raises(IngestError, match=r"ID002/same\.png: duplicate case id 'same'"):
        ingest("hand_xray", tmp_path, tmp_path / "out.zarr", FAIL, client)
    report = ingest("hand_xray", tmp_path, tmp_path / "out.zarr", SKIP, client)
    assert (report.found, report.ingested, len(report.skipped)) == (2, 1, 1)
    assert CaseStore(tmp_path / "out.zarr").case_attrs("same")["group"] == "ID001"


def test_a_dataset_with_no_good_case_is_an_error_even_when_skipping(tmp_path, client):
    bad_missing_mask(tmp_path)
    with pytest.raises(IngestError, match="no case could be ingested"):
        ingest("kvasir", tmp_path, tmp_path / "out.zarr", SKIP, client)
    assert not (tmp_path / "out.zarr").exists()


def test_synthetic_hand_layout_writes_29_channel_masks_for_train_and_none_for_test(tmp_path, client):
    good_hand(tmp_path)
    ingest("hand_xray", tmp_path, tmp_path / "out.zarr", FAIL, client)
    store = CaseStore(tmp_path / "out.zarr")
    assert store.classes[27:] == ["Radius", "Ulna"] and store.attrs["ingest"] == FAIL.model_dump()
    mask = store.array("g1", "mask")[:]
    assert mask.shape == (29, 64, 64) and mask[27].sum() == 21 * 21 and mask.sum() == 21 * 21
    assert not store.has("g2", "mask")
    assert store.case_attrs("g1")["label_source"] == "train/outputs_json/ID001/g1.json"
    assert {k: store.case_attrs("g2")[k] for k in ("split", "labelled", "group")} == {
        "split": "test", "labelled": False, "group": "ID040"}


def test_demo_hand_masks_in_the_store_equal_an_independent_rasterisation_of_their_polygons(tmp_path, client):
    demo_hand.write(tmp_path, HandXrayDemo(n_patients=2, n_test_patients=0, size=2048), seed=0)
    ingest("hand_xray", tmp_path / "hand_xray", tmp_path / "h.zarr", FAIL, client)
    store = CaseStore(tmp_path / "h.zarr")
    assert len(store.case_ids()) == 4
    for case_id in store.case_ids():
        doc = json.loads((tmp_path / "hand_xray" / store.case_attrs(case_id)["label_source"]).read_text())
        expected = np.zeros((len(store.classes), 2048, 2048), bool)
        for annotation in doc["annotations"]:
            expected[store.classes.index(annotation["label"])] |= centres_in_or_on(annotation["points"], 2048, 2048)
        assert expected.any(axis=(1, 2)).all()  # every one of the 29 bones is drawn
        assert store.array(case_id, "mask").chunks == (1, 512, 512)  # one class per tile
        mask = store.read(case_id, "mask")
        assert mask.dtype == np.uint8 and mask.max() == 1
        np.testing.assert_array_equal(mask.astype(bool), expected, err_msg=case_id)


@needs_shared_data
def test_all_300_real_kvasir_pairs_land_in_the_store_with_their_pixels_masks_and_provenance(tmp_path, client):
    real = SHARED_DATA / "kvasir-seg"
    report = ingest("kvasir", real, tmp_path / "k.zarr", FAIL, client)
    assert (report.found, report.ingested, report.skipped) == (300, 300, [])
    store = CaseStore(tmp_path / "k.zarr")
    assert len(store.case_ids()) == 300 and store.attrs["classes"] == ["polyp"]
    for case_id in store.case_ids():
        attrs = store.case_attrs(case_id)
        image = np.asarray(Image.open(real / "images" / f"{case_id}.jpg").convert("RGB"))
        assert attrs["source"] == f"images/{case_id}.jpg" and attrs["group"] == case_id
        assert attrs["sha256"] == hashlib.sha256((real / attrs["source"]).read_bytes()).hexdigest()
        assert attrs["label_sha256"] == hashlib.sha256((real / attrs["label_source"]).read_bytes()).hexdigest()
        assert attrs["original_size"] == list(image.shape[:2]) and attrs["kind"] == "image"
        np.testing.assert_array_equal(store.image(case_id), image)
        assert store.array(case_id, "image")[:].tobytes() == (real / attrs["source"]).read_bytes()  # the file as found
        expected = np.asarray(Image.open(real / attrs["label_source"]).convert("L")) > 127
        np.testing.assert_array_equal(store.array(case_id, "mask")[0], expected)


@needs_shared_data
def test_real_videos_of_both_usc_layouts_ingest_into_one_store(tmp_path, client):
    raw = tmp_path / "raw"
    (raw / "F2" / "mri").mkdir(parents=True)
    (raw / "F2" / "mri" / "F2_400.avi").symlink_to(SHARED_DATA / "usc-timit/F2/mri/F2_400.avi")
    (raw / "sub001" / "2drt").mkdir(parents=True)
    (raw / "sub001" / "2drt" / "video").symlink_to(SHARED_DATA / "usc-75-speaker/sub001/2drt/video")
    ingest("usc_timit", raw, tmp_path / "u.zarr", IngestConfig(video_chunk_frames=8), client)
    store = CaseStore(tmp_path / "u.zarr")
    f2, sub = store.case_ids()
    assert store.array(f2, "image").shape == (69, 68, 68) and store.array(sub, "image").shape == (3216, 84, 84)
    assert store.array(sub, "image").chunks == (8, 84, 84) and store.is_video(sub)
    assert store.case_attrs(f2)["warmup_frames"] == 0 and store.case_attrs(sub)["warmup_frames"] > 20
    assert store.case_attrs(sub)["original_size"] == [84, 84] and store.case_attrs(f2)["group"] == "F2"
    assert store.array(sub, "timestamps").shape == (3216,) and not store.has(sub, "mask")


@needs_shared_data
def test_real_rsna_xray_ingests_unlabelled_at_2044_by_1514(tmp_path, client):
    (tmp_path / "raw" / "test" / "DCM" / "ID900").mkdir(parents=True)
    (tmp_path / "raw" / "test" / "DCM" / "ID900" / "1377.png").symlink_to(SHARED_DATA / "hand-xray-rsna" / "1377.png")
    ingest("hand_xray", tmp_path / "raw", tmp_path / "h.zarr", FAIL, client)
    store = CaseStore(tmp_path / "h.zarr")
    image = store.array("1377", "image")
    # Tiles of at most 512 px, split evenly: 4 x 511 rows, 3 x 505 columns (not 512 + 508, 512 + 490)
    assert image.shape == (2044, 1514) and image.chunks == (511, 505) and not store.has("1377", "mask")
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
    assert capsys.readouterr().out == (
        f"ingest kvasir: 3 found: 3 ingested (0 changed), 0 unchanged, 0 skipped, 0 removed -> {tmp_path / 'k.zarr'}\n")


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


# --- incremental and idempotent reruns --------------------------------------------------------


def files_of(store: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder of a store with its inode and mtime: equal only if none was rewritten."""
    return {p.relative_to(store).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in [store, *store.rglob("*")]}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def kvasir_store(tmp_path, client):
    """A raw layout of three Kvasir pairs and its ingested store."""
    raw, out = tmp_path / "raw", tmp_path / "k.zarr"
    good_kvasir(raw)
    ingest("kvasir", raw, out, FAIL, client)
    return raw, out


def test_rerun_over_unchanged_raw_rewrites_nothing(kvasir_store, client):
    raw, out = kvasir_store
    before = files_of(out)
    report = ingest("kvasir", raw, out, FAIL, client)
    assert (report.found, report.ingested, report.unchanged) == (3, 0, 3)
    assert (report.changed, report.removed, report.skipped, report.rebuilt) == ([], [], [], None)
    assert files_of(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["k.zarr", "raw"]


def test_a_new_file_is_the_only_one_ingested_and_the_others_keep_their_files(kvasir_store, client):
    raw, out = kvasir_store
    before = files_of(out)
    kvasir_pair(raw, "d")
    report = ingest("kvasir", raw, out, FAIL, client)
    assert (report.found, report.ingested, report.unchanged, report.changed) == (4, 1, 3, [])
    store = CaseStore(out)
    assert store.case_ids() == ["a", "b", "c", "d"] and store.attrs["found"] == 4
    assert store.case_attrs("d")["sha256"] == sha(raw / "images/d.jpg")
    after = files_of(out)
    unchanged_files = [key for key in before if key.startswith(("a/", "b/", "c/")) and (out / key).is_file()]
    assert unchanged_files and all(after[key] == before[key] for key in unchanged_files)  # hard links


def test_a_changed_file_is_reingested_with_its_new_sha(kvasir_store, client):
    raw, out = kvasir_store
    old_sha = CaseStore(out).case_attrs("b")["sha256"]
    (raw / "images/b.jpg").unlink()  # a new file, as a user (or DVC) replaces one
    kvasir_pair(raw, "b", value=200)
    report = ingest("kvasir", raw, out, FAIL, client)
    assert (report.ingested, report.unchanged, report.changed) == (1, 2, ["b"])
    store = CaseStore(out)
    assert store.case_attrs("b")["sha256"] == sha(raw / "images/b.jpg") != old_sha
    assert abs(int(store.image("b").mean()) - 200) <= 2
    assert abs(int(store.image("a").mean()) - 90) <= 2


def test_a_removed_file_removes_its_case(kvasir_store, client):
    raw, out = kvasir_store
    (raw / "images/c.jpg").unlink()
    (raw / "masks/c.jpg").unlink()
    report = ingest("kvasir", raw, out, FAIL, client)
    assert (report.found, report.ingested, report.unchanged, report.removed) == (2, 0, 2, ["c"])
    assert CaseStore(out).case_ids() == ["a", "b"] and not (out / "c").exists()


def test_a_videos_reconstruction_is_stored_tracked_and_followed_when_it_changes_or_goes(tmp_path, client):
    raw, out = tmp_path / "raw", tmp_path / "u.zarr"
    frames = vocal_tract(6)
    write_mp4(raw / "sub001" / "2drt" / "video" / "s1_video.mp4", frames)
    write_mp4(raw / "sub001" / "2drt" / "video" / "s2_video.mp4", frames)
    recon = raw / "sub001" / "2drt" / "recon" / "s1_recon.h5"
    write_recon(recon, frames.transpose(0, 2, 1) / np.float32(3))
    assert ingest("usc_timit", raw, out, FAIL, client).ingested == 2
    store = CaseStore(out)
    attrs = store.case_attrs("sub001_s1_video")
    assert attrs["extra_sources"] == {"recon": "sub001/2drt/recon/s1_recon.h5"}
    assert attrs["extra_sha256"] == {"recon": sha(recon)} and attrs["sha256"] == sha(raw / attrs["source"])
    assert (attrs["recon_frames"], attrs["recon_transposed"]) == (6, True)
    np.testing.assert_array_equal(store.array("sub001_s1_video", "recon")[:], frames / np.float32(3))
    assert store.array("sub001_s1_video", "recon").chunks == (6, 32, 32)  # frames chunked as the video's
    assert not store.has("sub001_s2_video", "recon") and "extra_sources" not in store.case_attrs("sub001_s2_video")

    assert ingest("usc_timit", raw, out, FAIL, client).unchanged == 2
    write_recon(recon, frames.transpose(0, 2, 1) / np.float32(5))
    report = ingest("usc_timit", raw, out, FAIL, client)
    assert (report.changed, report.unchanged) == (["sub001_s1_video"], 1)
    np.testing.assert_array_equal(CaseStore(out).array("sub001_s1_video", "recon")[:], frames / np.float32(5))
    recon.unlink()
    report = ingest("usc_timit", raw, out, FAIL, client)
    assert (report.changed, report.unchanged) == (["sub001_s1_video"], 1)
    assert not CaseStore(out).has("sub001_s1_video", "recon")
    assert "extra_sha256" not in CaseStore(out).case_attrs("sub001_s1_video")


def test_an_edited_bbox_entry_reingests_its_case_alone_and_a_fixed_one_retries_a_skipped_case(kvasir_store, client):
    raw, out = kvasir_store
    write_boxes(raw, {"a": 32, "b": 32, "c": 32})
    assert ingest("kvasir", raw, out, FAIL, client).changed == ["a", "b", "c"]  # entries are new to every case
    write_boxes(raw, {"a": 32, "b": 99, "c": 32})
    report = ingest("kvasir", raw, out, SKIP, client)
    assert (report.unchanged, [s["source"] for s in report.skipped]) == (2, ["images/b.jpg"])
    assert "!= 40x99 (WxH) recorded in kavsir_bboxes.json" in report.skipped[0]["reason"]
    before = files_of(out)
    again = ingest("kvasir", raw, out, SKIP, client)
    assert again.skipped == report.skipped and files_of(out) == before  # still bad, not decoded again
    write_boxes(raw, {"a": 32, "b": 32, "c": 32})
    report = ingest("kvasir", raw, out, SKIP, client)
    assert (report.ingested, report.unchanged, report.skipped) == (1, 2, [])
    assert CaseStore(out).case_attrs("b")["bboxes"] == [{"label": "polyp", "xmin": 4, "ymin": 4, "xmax": 12, "ymax": 12}]


def test_changed_chunk_params_reingest_every_case(kvasir_store, client):
    raw, out = kvasir_store
    report = ingest("kvasir", raw, out, IngestConfig(chunk=16), client)
    assert (report.ingested, report.unchanged) == (3, 0) and "chunk" in report.rebuilt
    # 32 x 40 px in tiles of at most 16, evenly (the image is its JPEG file, one chunk)
    assert CaseStore(out).array("a", "mask").chunks == (1, 16, 14)


def test_a_skipped_case_is_decoded_again_only_once_its_file_changes(tmp_path, client):
    dataset, raw, good, bad_file, problem = bad_layout(tmp_path, "truncated jpeg")
    out = tmp_path / "out.zarr"
    first = ingest(dataset, raw, out, SKIP, client)
    assert first.skipped[0]["case_id"] == "bad" and first.skipped[0]["sha256"][0] == sha(raw / bad_file)
    before = files_of(out)
    again = ingest(dataset, raw, out, SKIP, client)
    assert again.skipped == first.skipped and (again.ingested, again.unchanged) == (0, 3)
    assert files_of(out) == before
    with pytest.raises(IngestError, match="corrupt or truncated image"):  # still bad under `fail`
        ingest(dataset, raw, out, FAIL, client)
    (raw / bad_file).unlink()
    kvasir_pair(raw, "bad")
    fixed = ingest(dataset, raw, out, SKIP, client)
    assert (fixed.ingested, fixed.unchanged, fixed.skipped, fixed.changed) == (1, 3, [], [])
    assert CaseStore(out).case_ids() == sorted(good + ["bad"]) and CaseStore(out).attrs["skipped"] == []


@pytest.mark.slow
def test_a_killed_ingest_leaves_the_previous_store_readable_and_complete(kvasir_store, tmp_path, client):
    raw, out = kvasir_store
    before, image_a = files_of(out), CaseStore(out).image("a")
    for i in range(HANG_AT + 2):
        kvasir_pair(raw, f"n{i}")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["dask"] = {"scheduler": None, "n_workers": 1, "threads_per_worker": 1}
    params["ingest"]["max_in_flight"] = 1  # one task at a time: the worker hangs after HANG_AT - 1 cases
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    hanging = {"DASK_DISTRIBUTED__WORKER__PRELOAD": json.dumps([str(ROOT / "tests" / "hanging_worker.py")])}
    with (tmp_path / "stderr").open("w") as stderr:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "tasks.ingest", "--dataset", "kvasir", "--raw", str(raw), "--out", str(out),
             "--report", str(tmp_path / "r.json"), "--params", str(tmp_path / "params.yaml")],
            cwd=ROOT, env=os.environ | hanging, start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr)
    written = f"{tmp_path}/.k.zarr.*.tmp/n*/image/zarr.json"
    try:
        deadline = time.monotonic() + 120
        while len(glob.glob(written)) < HANG_AT - 1 and proc.poll() is None:
            assert time.monotonic() < deadline, "ingest never wrote the cases before the hanging one"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the stage and its Dask workers, as a killed job would be
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"ingest ended by itself: {(tmp_path / 'stderr').read_text()[-2000:]}"
    # killed midway: the cases before the hanging one are in the temporary store, and only there
    assert sorted(Path(p).parts[-3] for p in glob.glob(written)) == [f"n{i}" for i in range(HANG_AT - 1)]
    assert files_of(out) == before
    store = CaseStore(out)
    assert store.case_ids() == ["a", "b", "c"] and store.attrs["found"] == 3
    np.testing.assert_array_equal(store.image("a"), image_a)
    # the next run ingests the new cases and deletes the killed run's temporary store
    assert ingest("kvasir", raw, out, FAIL, client).ingested == HANG_AT + 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["k.zarr", "params.yaml", "raw", "stderr"]


@pytest.mark.parametrize("dataset", ["kvasir", "usc_timit", "hand_xray"])
def test_the_ingest_stage_depends_on_every_source_that_decides_the_stored_cases(dataset):
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["ingest"]["do"]["deps"]
    deps = {dep.replace("${key}", dataset) for dep in deps}
    sources = {path.relative_to(ROOT).as_posix() for path in segpipe.ingest.code_sources(reader(dataset))}
    assert sources and sources <= deps


@pytest.mark.slow
def test_dvc_repro_updates_the_persisted_store_in_place_of_rebuilding_it(tmp_path):
    """Under DVC the store is a persisted output whose files may be hard links into the cache."""
    repo = make_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["datasets"]["kvasir"]["raw"] = "raw_kvasir"  # a plain folder, outside any stage
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    good_kvasir(repo / "raw_kvasir")
    dvc(repo, "repro", "ingest@kvasir")
    kvasir_pair(repo / "raw_kvasir", "d")
    assert ran_stages(dvc(repo, "repro", "ingest@kvasir").stdout) == {"ingest@kvasir"}
    report = json.loads((repo / "reports/kvasir/ingest.json").read_text())
    assert (report["found"], report["ingested"], report["unchanged"]) == (4, 1, 3)
    assert CaseStore(repo / "data/interim/kvasir.zarr").case_ids() == ["a", "b", "c", "d"]
    assert "up to date" in dvc(repo, "status", "ingest@kvasir").stdout  # a further repro does nothing


# --- Dask: any scheduler, bounded work in flight ----------------------------------------------


class UnfinishedTasks(SchedulerPlugin):
    """The peak number of tasks the scheduler held unfinished (waiting, queued or running): each
    may hold a decoded case; a finished one holds only its small outcome until released."""

    UNFINISHED = ("waiting", "queued", "processing", "no-worker")

    def __init__(self):
        self.unfinished: set = set()
        self.peak = 0
        self.kinds: set = set()  # what ran: task names without their unique suffix
        self.seen: set = set()  # every task's key

    def transition(self, key, start, finish, *args, **kwargs):
        self.kinds.add(key_split(key))
        self.seen.add(key)
        if finish in self.UNFINISHED:
            self.unfinished.add(key)
        else:
            self.unfinished.discard(key)
        self.peak = max(self.peak, len(self.unfinished))


def test_ingest_through_a_scheduler_address_keeps_at_most_max_in_flight_tasks(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    for i in range(8):
        kvasir_pair(raw, f"c{i}")
    monkeypatch.setattr(segpipe.ingest, "TASK_BYTES", 1)  # a case per task: 8 tasks for 2 places (in-process workers)
    tasks = UnfinishedTasks()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        cluster.scheduler.add_plugin(tasks)
        with dask_client(DaskConfig(scheduler=cluster.scheduler_address)) as client:
            report = ingest("kvasir", raw, tmp_path / "k.zarr", IngestConfig(max_in_flight=2), client)
    assert (report.found, report.ingested) == (8, 8)
    assert len(CaseStore(tmp_path / "k.zarr").case_ids()) == 8
    assert 1 <= tasks.peak <= 2 and len(tasks.seen) == 8


def test_stage_runs_on_the_scheduler_named_in_params(tmp_path, capsys):
    good_kvasir(tmp_path / "raw")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    tasks = UnfinishedTasks()
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        cluster.scheduler.add_plugin(tasks)
        params["dask"]["scheduler"] = cluster.scheduler_address
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        args = ["--dataset", "kvasir", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "k.zarr"),
                "--report", str(tmp_path / "r.json"), "--params", str(tmp_path / "params.yaml")]
        stage.main(stage.build_parser().parse_args(args))
        stage.main(stage.build_parser().parse_args(args))
    assert {"ingest_cases", "hash_cases"} <= tasks.kinds  # the first run decoded, the second hashed
    assert json.loads((tmp_path / "r.json").read_text())["unchanged"] == 3
    assert "0 ingested (0 changed), 3 unchanged" in capsys.readouterr().out.splitlines()[-1]


def slow_square(x: int, delay: float) -> int:
    time.sleep(delay)
    return x * x


def test_map_bounded_keeps_at_most_limit_items_unfinished_and_returns_every_result(client):
    tasks = UnfinishedTasks()
    client.cluster.scheduler.add_plugin(tasks, name="unfinished")
    try:
        results = list(map_bounded(client, slow_square, range(12), 3, delay=0.05))
    finally:
        client.cluster.scheduler.remove_plugin("unfinished")
    assert sorted(results) == [i * i for i in range(12)]
    assert tasks.peak == 3 and tasks.kinds == {"slow_square"}


def ids_of(batches: list[list[RawCase]]) -> list[list[str]]:
    return [[case.case_id for case in batch] for batch in batches]


def test_task_batches_fill_tasks_up_to_task_bytes_in_order_and_give_every_place_in_flight_work(tmp_path, monkeypatch):
    monkeypatch.setattr(segpipe.ingest, "TASK_BYTES", 100)
    cases = []
    for i, (image, label) in enumerate([(40, 0), (40, 0), (40, 0), (50, 100), (10, 0), (10, 0), (None, 0)]):
        source, mask = tmp_path / f"c{i}.jpg", tmp_path / f"c{i}-mask.jpg"
        if image is not None:  # c6's image is missing: it counts 0 bytes (hashing it then says why)
            source.write_bytes(b"x" * image)
        if label:
            mask.write_bytes(b"x" * label)
        cases.append(RawCase(f"c{i}", "g", source, label=mask if label else None))

    # a task closes once its files reach 100 bytes: c0-c2 (120), c3 alone (its image and mask, 150)
    assert ids_of(task_batches(cases, limit=1)) == [["c0", "c1", "c2"], ["c3"], ["c4", "c5", "c6"]]
    # and takes at most 7 // 3 = 2 cases, so that 3 tasks in flight are not 1 task and 2 idle places
    assert ids_of(task_batches(cases, limit=3)) == [["c0", "c1"], ["c2", "c3"], ["c4", "c5"], ["c6"]]
    assert ids_of(task_batches(cases, limit=8)) == [[case.case_id] for case in cases]


def test_a_bad_case_in_a_task_of_several_is_skipped_alone_or_fails_the_stage(tmp_path, client):
    dataset, raw, good, bad_file, problem = bad_layout(tmp_path, "truncated jpeg")
    assert ids_of(task_batches(reader(dataset).list_cases(raw), 1)) == [["a", "b", "bad", "c"]]  # one task
    report = ingest(dataset, raw, tmp_path / "out.zarr", IngestConfig(on_error="skip", max_in_flight=1), client)
    assert (report.ingested, [s["source"] for s in report.skipped]) == (3, [bad_file])
    assert CaseStore(tmp_path / "out.zarr").case_ids() == good
    with pytest.raises(IngestError, match=problem):
        ingest(dataset, raw, tmp_path / "new.zarr", IngestConfig(on_error="fail", max_in_flight=1), client)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr", "raw"]  # no store, no temporary left over
