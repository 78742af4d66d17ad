"""Airway pseudo-labels: accurate on the demo phantom, honest confidence, plausible on real MRI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from segpipe.config import PseudolabelConfig
from segpipe.pseudolabel import dice, label_video, pseudolabel_store
from segpipe.pseudolabel_report import KEPT, LOW, OUTLINE, WARMUP, montage, quality
from segpipe.store import CaseStore
from tests.usc_phantom import VIDEOS, decode, ingest_like_store, videos

ROOT = Path(__file__).resolve().parents[1]
CFG = PseudolabelConfig(smooth_frames=3, min_confidence=0.5)
def test_demo_pseudolabels_match_the_true_airway(phantom):
    warm = VIDEOS.warmup_frames
    for path, frames, truth in videos(phantom):
        masks, _ = label_video(frames, warm, CFG)
        score = np.mean([dice(masks[t], truth[t]) for t in range(warm, len(frames))])
        assert score >= 0.85, f"{path.name}: Dice {score:.3f}"


def test_warmup_frames_get_empty_masks_and_zero_confidence(phantom):
    _, frames, _ = next(videos(phantom))
    masks, confidence = label_video(frames, 5, CFG)
    assert masks.shape == frames.shape and masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}
    assert confidence.shape == (len(frames),) and confidence.dtype == np.float32
    assert not masks[:5].any() and (confidence[:5] == 0).all()
    assert masks[5:].any(axis=(1, 2)).all() and (confidence[5:] >= CFG.min_confidence).all()


def test_a_video_that_is_all_warmup_gets_no_labels(phantom):
    _, frames, _ = next(videos(phantom))
    masks, confidence = label_video(frames, len(frames) + 3, CFG)
    assert not masks.any() and not confidence.any()


def test_a_blank_video_gets_no_labels_instead_of_failing():
    masks, confidence = label_video(np.full((6, 68, 68), 40, np.uint8), 1, CFG)
    assert not masks.any() and not confidence.any()


def test_confidence_drops_on_a_noise_frame_and_on_a_saturated_frame(phantom):
    _, frames, _ = next(videos(phantom))
    frames = frames.copy()
    rng = np.random.default_rng(0)
    frames[10] = np.clip(np.hypot(rng.normal(0, 12, frames[10].shape), rng.normal(0, 12, frames[10].shape)), 0, 255)
    frames[16] = np.clip(frames[16].astype(int) * 3, 0, 255)  # a gain glitch: most of the head saturates
    _, confidence = label_video(frames, VIDEOS.warmup_frames, CFG)
    normal = np.median(confidence[VIDEOS.warmup_frames:])
    assert normal >= 0.8
    for broken in (10, 16):
        assert confidence[broken] < CFG.min_confidence < normal, (broken, confidence[broken])


def test_confidence_drops_on_a_uniform_noise_frame(phantom):
    _, frames, _ = next(videos(phantom))
    frames = frames.copy()
    frames[12] = np.random.default_rng(1).integers(0, 256, frames[12].shape)
    _, confidence = label_video(frames, VIDEOS.warmup_frames, CFG)
    assert confidence[12] < CFG.min_confidence


def test_pseudolabel_store_writes_masks_confidence_and_keep_per_case(phantom, tmp_path):
    images = ingest_like_store(tmp_path / "images.zarr", list(videos(phantom))[:2])
    out = pseudolabel_store(images, tmp_path / "pseudo.zarr", CFG)
    assert out.classes == ["airway"] and out.case_ids() == images.case_ids()
    assert out.attrs["pseudolabel"] == CFG.model_dump()
    n = VIDEOS.n_frames
    for case_id in out.case_ids():
        assert out.case_attrs(case_id)["group"] == images.case_attrs(case_id)["group"]
        mask, confidence, keep = (out.array(case_id, k)[:] for k in ("mask", "confidence", "keep"))
        assert mask.shape == (n, 1, 68, 68) and mask.dtype == np.uint8
        assert confidence.shape == (n,) and confidence.dtype == np.float32
        expected = (np.arange(n) >= VIDEOS.warmup_frames) & (confidence >= CFG.min_confidence)
        assert keep.dtype == np.uint8 and (keep.astype(bool) == expected).all()
    assert not list(tmp_path.glob(".*tmp"))


def test_labels_stage_writes_the_quality_report_with_dice_against_the_demo_truth(phantom, tmp_path):
    from tasks import labels as stage

    images = ingest_like_store(tmp_path / "images.zarr", list(videos(phantom))[:2])
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["datasets"]["usc_timit"]["truth"] = str(phantom / "usc_timit_truth")
    params["pseudolabel"]["rounds"] = 0  # the classical labels' report; rounds: tests/test_teacher.py
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = ["--params", str(tmp_path / "params.yaml"), "--dataset", "usc_timit", "--images", str(images.path),
            "--out", str(tmp_path / "pseudo.zarr"), "--report", str(tmp_path / "labels.json"),
            "--quality", str(tmp_path / "quality")]
    stage.main(stage.build_parser().parse_args(args))

    headline = json.loads((tmp_path / "labels.json").read_text())
    report = json.loads((tmp_path / "quality" / "pseudolabels.json").read_text())
    summary = report["summary"]
    assert headline == {"origin": "pseudolabel", **summary}
    n, warm = 2 * VIDEOS.n_frames, 2 * VIDEOS.warmup_frames
    assert summary["cases"] == 2 and summary["frames"] == n and summary["rejected_warmup"] == warm
    assert summary["kept"] + summary["rejected_warmup"] + summary["rejected_low_confidence"] == n
    assert sum(report["confidence_histogram"]["counts"]) == n - warm
    assert report["min_confidence"] == params["pseudolabel"]["min_confidence"]
    assert summary["dice_vs_truth"] >= 0.85 and summary["dice_vs_truth_kept"] >= 0.85
    # The phantom's airway moves smoothly: adjacent kept frames overlap well.
    assert 0.8 <= summary["stability_min_dice"] <= summary["stability_mean_dice"] <= 1
    assert set(report["videos"]) == set(images.case_ids())
    markdown = (tmp_path / "quality" / "pseudolabels.md").read_text()
    for case_id in images.case_ids():
        assert f"]({case_id}.png)" in markdown
        with Image.open(tmp_path / "quality" / f"{case_id}.png") as png:
            assert png.mode == "RGB" and png.width > 68 * 6


def _labels_store(path: Path, masks: np.ndarray, confidence: np.ndarray, keep: np.ndarray, warmup: int):
    store = CaseStore.create(path, dataset="usc_timit", classes=["airway"], pseudolabel=CFG.model_dump())
    store.write_case("v1", {"kind": "video", "group": "s1", "warmup_frames": warmup})
    store.write_array("v1", "mask", masks[:, None].astype(np.uint8))
    store.write_array("v1", "confidence", confidence.astype(np.float32))
    store.write_array("v1", "keep", keep.astype(np.uint8))
    return store


def test_quality_counts_reasons_histogram_and_stability_of_known_labels(tmp_path):
    # Six 10x10 frames: a warm-up frame, then squares that grow by one column, one rejected frame.
    masks = np.zeros((6, 10, 10), bool)
    for t in range(1, 6):
        masks[t, 2:6, 2:4 + t] = True
    confidence = np.array([0.0, 0.95, 0.92, 0.3, 0.85, 0.55])
    keep = np.array([0, 1, 1, 0, 1, 1])
    report = quality(_labels_store(tmp_path / "labels.zarr", masks, confidence, keep, warmup=1))

    s = report["summary"]
    assert (s["frames"], s["kept"], s["rejected_warmup"], s["rejected_low_confidence"]) == (6, 4, 1, 1)
    assert report["confidence_histogram"]["counts"] == [0, 0, 0, 1, 0, 1, 0, 0, 1, 2]
    assert s["mean_confidence"] == pytest.approx(np.mean(confidence[1:]))
    # Adjacent kept pairs: (1, 2) with 4x3 and 4x4 squares, and (4, 5) with 4x6 and 4x7.
    pairs = [2 * 12 / (12 + 16), 2 * 24 / (24 + 28)]
    assert s["stability_mean_dice"] == pytest.approx(np.mean(pairs))
    assert s["stability_min_dice"] == pytest.approx(min(pairs))
    assert report["videos"]["v1"]["stability_min_dice"] == pytest.approx(min(pairs))
    assert "dice_vs_truth" not in s


def test_montage_outlines_the_mask_and_frames_each_tile_by_its_fate():
    frames = np.tile(np.linspace(0, 200, 16, dtype=np.uint8), (3, 16, 1))
    masks = np.zeros((3, 16, 16), np.uint8)
    masks[:, 4:12, 4:12] = 1
    sheet = np.asarray(montage(frames, masks, np.array([0.0, 0.9, 0.2]), np.array([0, 1, 0]), warmup=1,
                               tiles=3, columns=3, tile_px=64))
    tile = 64 + 2 * 3  # 16 px at scale 4, with a 3 px frame
    assert sheet.shape[1] == 3 * tile
    assert [tuple(sheet[0, i * tile]) for i in range(3)] == [WARMUP, KEPT, LOW]
    inside = sheet[3:3 + 64, 3:3 + 64]
    red = np.all(inside == OUTLINE, axis=-1)
    assert red[16, 16:48].all() and red[16:48, 16].all()  # the square's top and left edges
    assert not red[20:44, 20:44].any() and not red[:12].any()  # not inside it, not outside


def test_real_usc_timit_clip_mask_follows_the_vocal_tract(shared_data):
    frames = decode(shared_data / "usc-timit" / "F2" / "mri" / "F2_400.avi")
    masks, confidence = label_video(frames, 0, CFG)
    height, width = frames.shape[1:]
    labelled = masks.any(axis=(1, 2))
    assert labelled.mean() >= 0.9 and (confidence >= CFG.min_confidence).mean() >= 0.7
    for frame, mask in zip(frames[labelled], masks[labelled].astype(bool)):
        ys, xs = np.nonzero(mask)
        # Face on the left: the tract runs from the mouth (upper half) down the pharynx to the
        # bottom edge, in the middle columns, and it is air: darker than the frame around it.
        assert ys.min() < height / 2 and ys.max() >= height - 4
        assert width * 0.2 < xs.mean() < width * 0.8
        assert frame[mask].mean() < frame[~mask].mean()
