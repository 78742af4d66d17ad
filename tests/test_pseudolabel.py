"""Airway pseudo-labels: accurate on the demo phantom, honest confidence, plausible on real MRI."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import yaml

from segpipe.config import PseudolabelConfig, UscTimitDemo
from segpipe.datasets import demo_usc
from segpipe.pseudolabel import dice, label_video, pseudolabel_store
from segpipe.store import CaseStore

ROOT = Path(__file__).resolve().parents[1]
CFG = PseudolabelConfig(smooth_frames=3, min_confidence=0.5)
VIDEOS = UscTimitDemo(n_speakers=2, videos_per_speaker=2, n_frames=24, warmup_frames=3, size=68, fps=23.18)


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="gray") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """Demo videos written as AVI and read back, as ingest sees them, with their true masks."""
    root = tmp_path_factory.mktemp("usc")
    demo_usc.write(root, VIDEOS, seed=0)
    return root


def _videos(root: Path):
    for path in sorted((root / "usc_timit").glob("*/mri/*.avi")):
        truth = np.load(root / "usc_timit_truth" / path.parent.parent.name / f"{path.stem}.npy")
        yield path, _decode(path), truth


def test_demo_pseudolabels_match_the_true_airway(phantom):
    warm = VIDEOS.warmup_frames
    for path, frames, truth in _videos(phantom):
        masks, _ = label_video(frames, warm, CFG)
        score = np.mean([dice(masks[t], truth[t]) for t in range(warm, len(frames))])
        assert score >= 0.85, f"{path.name}: Dice {score:.3f}"


def test_warmup_frames_get_empty_masks_and_zero_confidence(phantom):
    _, frames, _ = next(_videos(phantom))
    masks, confidence = label_video(frames, 5, CFG)
    assert masks.shape == frames.shape and masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}
    assert confidence.shape == (len(frames),) and confidence.dtype == np.float32
    assert not masks[:5].any() and (confidence[:5] == 0).all()
    assert masks[5:].any(axis=(1, 2)).all() and (confidence[5:] >= CFG.min_confidence).all()


def test_a_video_that_is_all_warmup_gets_no_labels(phantom):
    _, frames, _ = next(_videos(phantom))
    masks, confidence = label_video(frames, len(frames) + 3, CFG)
    assert not masks.any() and not confidence.any()


def test_a_blank_video_gets_no_labels_instead_of_failing():
    masks, confidence = label_video(np.full((6, 68, 68), 40, np.uint8), 1, CFG)
    assert not masks.any() and not confidence.any()


def test_confidence_drops_on_a_noise_frame_and_on_a_saturated_frame(phantom):
    _, frames, _ = next(_videos(phantom))
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
    _, frames, _ = next(_videos(phantom))
    frames = frames.copy()
    frames[12] = np.random.default_rng(1).integers(0, 256, frames[12].shape)
    _, confidence = label_video(frames, VIDEOS.warmup_frames, CFG)
    assert confidence[12] < CFG.min_confidence


def _ingest_like_store(path: Path, videos) -> CaseStore:
    store = CaseStore.create(path, dataset="usc_timit", classes=["airway"])
    for video_path, frames, _ in videos:
        speaker = video_path.parent.parent.name
        attrs = {"kind": "video", "group": speaker, "warmup_frames": VIDEOS.warmup_frames,
                 "source": f"{speaker}/mri/{video_path.name}"}
        store.write_case(video_path.stem, attrs)
        store.write_array(video_path.stem, "image", frames)
    return store


def test_pseudolabel_store_writes_masks_confidence_and_keep_per_case(phantom, tmp_path):
    videos = list(_videos(phantom))[:2]
    images = _ingest_like_store(tmp_path / "images.zarr", videos)
    summary = pseudolabel_store(images, tmp_path / "pseudo.zarr", CFG, truth=phantom / "usc_timit_truth")
    out = CaseStore(tmp_path / "pseudo.zarr")
    assert out.classes == ["airway"] and out.case_ids() == images.case_ids()
    n = VIDEOS.n_frames
    for case_id in out.case_ids():
        assert out.case_attrs(case_id)["group"] == images.case_attrs(case_id)["group"]
        mask, confidence, keep = (out.array(case_id, k)[:] for k in ("mask", "confidence", "keep"))
        assert mask.shape == (n, 1, 68, 68) and mask.dtype == np.uint8
        assert confidence.shape == (n,) and confidence.dtype == np.float32
        expected = (np.arange(n) >= VIDEOS.warmup_frames) & (confidence >= CFG.min_confidence)
        assert keep.dtype == np.uint8 and (keep.astype(bool) == expected).all()
    assert summary["frames"] == 2 * n and summary["rejected_warmup"] == 2 * VIDEOS.warmup_frames
    assert summary["kept"] + summary["rejected_warmup"] + summary["rejected_low_confidence"] == summary["frames"]
    assert 0 <= summary["mean_confidence"] <= 1 and summary["dice_vs_truth"] >= 0.85
    assert not list(tmp_path.glob(".*tmp"))


def test_labels_stage_pseudolabels_usc_and_reports_dice_against_the_demo_truth(phantom, tmp_path):
    from tasks import labels as stage

    images = _ingest_like_store(tmp_path / "images.zarr", list(_videos(phantom))[:1])
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["datasets"]["usc_timit"]["truth"] = str(phantom / "usc_timit_truth")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = ["--params", str(tmp_path / "params.yaml"), "--dataset", "usc_timit", "--images", str(images.path),
            "--out", str(tmp_path / "pseudo.zarr"), "--report", str(tmp_path / "report.json")]
    stage.main(stage.build_parser().parse_args(args))
    report = yaml.safe_load((tmp_path / "report.json").read_text())
    assert report["cases"] == 1 and report["dice_vs_truth"] >= 0.85


def test_real_usc_timit_clip_mask_follows_the_vocal_tract(shared_data):
    frames = _decode(shared_data / "usc-timit" / "F2" / "mri" / "F2_400.avi")
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
