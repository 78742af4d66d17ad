"""The demo generator writes the three real raw layouts, deterministically and fast."""
from __future__ import annotations

import json
import re
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from segpipe.atomic import MARKER
from segpipe.config import DemoConfig, HandXrayDemo, KvasirDemo, UscTimitDemo
from segpipe.datasets import demo_hand
from segpipe.datasets.demo import generate

ROOT = Path(__file__).resolve().parents[1]

SMALL = DemoConfig(
    seed=0,
    kvasir=KvasirDemo(n_cases=5, min_size=64, max_size=96),
    usc_timit=UscTimitDemo(n_speakers=2, videos_per_speaker=1, n_frames=12, warmup_frames=3, size=68, fps=23.18),
    hand_xray=HandXrayDemo(n_patients=2, n_test_patients=1, size=256),
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "raw"
    generate(out, SMALL)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(demo, tmp_path):
    again = tmp_path / "again"
    generate(again, SMALL)
    first, second = _files(demo), _files(again)
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []


def test_other_seed_gives_other_images(demo, tmp_path):
    other = tmp_path / "other"
    generate(other, SMALL.model_copy(update={"seed": 1}))
    a, b = (p / "kvasir" / "images" / "demo0000.jpg" for p in (demo, other))
    assert a.read_bytes() != b.read_bytes()


def test_generation_is_atomic_and_replaces_an_old_demo(tmp_path):
    out = tmp_path / "raw"
    (out / "stale").mkdir(parents=True)
    generate(out, SMALL.model_copy(update={"hand_xray": HandXrayDemo(n_patients=2, n_test_patients=0, size=256)}))
    assert not (out / "stale").exists()
    assert sorted(p.name for p in out.iterdir() if p.name != MARKER) == ["hand_xray", "kvasir", "usc_timit", "usc_timit_truth"]
    assert not list(tmp_path.glob(".*tmp"))


def test_small_demo_writes_only_the_files_and_pixels_its_config_asks_for(demo):
    """Generation work follows the config: exactly its counts of files, none bigger than its pixels."""
    k, u, h = SMALL.kvasir, SMALL.usc_timit, SMALL.hand_xray
    videos = u.n_speakers * u.videos_per_speaker
    rasters = {  # suffix: (how many, raw bytes of the largest one the config allows)
        ".jpg": (2 * k.n_cases, k.max_size**2 * 3),  # an image and a mask per case
        ".avi": (videos, u.n_frames * u.size**2 * 3),  # uncompressed BGR24
        ".npy": (videos, u.n_frames * u.size**2),  # uint8 truth
        ".png": (2 * (h.n_patients + h.n_test_patients), h.size**2),  # 8-bit grey, both hands
    }
    # The datasets' folders only: files beside them at the root belong to the atomic-output protocol.
    files = [p for folder in demo.iterdir() if folder.is_dir() for p in folder.rglob("*") if p.is_file()]
    jsons = 1 + 2 * h.n_patients  # Kvasir's boxes, and one per annotated hand
    assert Counter(p.suffix for p in files) == {**{s: n for s, (n, _) in rasters.items()}, ".json": jsons}
    # Container headers and indexes only on top: a file at a larger size or frame count fails.
    too_big = [p.name for p in files if p.suffix in rasters and p.stat().st_size > rasters[p.suffix][1] + 16 * 1024]
    assert too_big == []


def test_kvasir_layout_and_bbox_schema(demo):
    root = demo / "kvasir"
    boxes = json.loads((root / "kavsir_bboxes.json").read_text())
    ids = sorted(p.stem for p in (root / "images").glob("*.jpg"))
    assert ids == sorted(boxes) == sorted(p.stem for p in (root / "masks").glob("*.jpg"))
    assert len(ids) == SMALL.kvasir.n_cases and all(re.fullmatch(r"[a-z0-9]+", i) for i in ids)
    for case_id in ids:
        image = Image.open(root / "images" / f"{case_id}.jpg")
        mask = np.asarray(Image.open(root / "masks" / f"{case_id}.jpg"))
        entry = boxes[case_id]
        assert image.mode == "RGB" and mask.ndim == 3 and mask.shape[2] == 3
        assert (entry["width"], entry["height"]) == image.size == mask.shape[1::-1]
        assert all(SMALL.kvasir.min_size <= s <= SMALL.kvasir.max_size for s in image.size)
        polyp = mask[..., 0] > 127
        ys, xs = np.nonzero(polyp)
        assert 1 <= len(entry["bbox"]) <= 2
        for box in entry["bbox"]:
            assert box["label"] == "polyp" and set(box) == {"label", "xmin", "ymin", "xmax", "ymax"}
            assert 0 <= box["xmin"] < box["xmax"] < entry["width"] and 0 <= box["ymin"] < box["ymax"] < entry["height"]
        # JPEG blurs the mask edge by a pixel or two; the boxes still frame the thresholded mask.
        assert abs(min(b["xmin"] for b in entry["bbox"]) - xs.min()) <= 3
        assert abs(max(b["ymax"] for b in entry["bbox"]) - ys.max()) <= 3


def test_kvasir_masks_carry_jpeg_noise_like_the_real_ones(demo):
    mask = np.asarray(Image.open(demo / "kvasir" / "masks" / "demo0000.jpg"))
    assert len(np.unique(mask)) > 2  # not only 0 and 255: readers must threshold
    assert 0.01 < (mask[..., 0] > 127).mean() < 0.6


def test_usc_videos_are_uncompressed_bgr24_avi_like_the_real_release(demo):
    videos = sorted((demo / "usc_timit").glob("*/mri/*.avi"))
    assert [v.relative_to(demo / "usc_timit").as_posix() for v in videos] == ["F1/mri/F1_1.avi", "M1/mri/M1_1.avi"]
    with av.open(str(videos[0])) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "rawvideo" and stream.codec_context.pix_fmt == "bgr24"
        assert stream.average_rate == Fraction(2318, 100)
        frames = [f.to_ndarray(format="bgr24") for f in container.decode(stream)]
    assert len(frames) == SMALL.usc_timit.n_frames and frames[0].shape == (68, 68, 3)
    assert all((f[..., 0] == f[..., 1]).all() and (f[..., 1] == f[..., 2]).all() for f in frames)


def test_usc_truth_is_an_airway_reaching_the_bottom_edge_only(demo):
    truth = np.load(demo / "usc_timit_truth" / "F1" / "F1_1.npy")
    assert truth.shape == (SMALL.usc_timit.n_frames, 68, 68) and truth.dtype == np.uint8
    assert set(np.unique(truth)) == {0, 1}
    for frame in truth:
        assert frame[-1].any()  # the pharynx leaves the image at the bottom
        assert not (frame[0].any() or frame[:, 0].any() or frame[:, -1].any())  # lips closed, inside the head
        assert 0.02 < frame.mean() < 0.15


def test_usc_warmup_frames_are_brighter_as_the_reader_detects_them(demo):
    from segpipe.datasets.usc_timit import warmup_frames

    with av.open(str(demo / "usc_timit" / "F1" / "mri" / "F1_1.avi")) as container:
        video = np.stack([f.to_ndarray(format="gray") for f in container.decode(video=0)])
    means = video.reshape(len(video), -1).mean(axis=1)
    steady = np.median(means[SMALL.usc_timit.warmup_frames:])
    assert means[0] > 1.8 * steady and (video[0] == 255).mean() > 0.05  # over-bright, partly saturated
    assert warmup_frames(video) == SMALL.usc_timit.warmup_frames


def _shoelace(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def test_hand_layout_and_json_schema(demo):
    root = demo / "hand_xray"
    train = sorted((root / "train" / "DCM").glob("*/*.png"))
    assert [p.parent.name for p in train] == ["ID001", "ID001", "ID002", "ID002"]
    assert sorted(p.stem[-1] for p in train[:2]) == ["L", "R"]
    assert all(re.fullmatch(r"image\d{13}_[LR]", p.stem) for p in train)
    assert [p.parent.name for p in (root / "test" / "DCM").glob("*/*.png")] == ["ID003", "ID003"]
    assert not (root / "test" / "outputs_json").exists()
    for png in train:
        image = Image.open(png)
        assert image.mode == "L" and image.size == (256, 256)
        doc = json.loads((root / "train" / "outputs_json" / png.parent.name / f"{png.stem}.json").read_text())
        assert doc["filename"] == png.name
        assert [a["label"] for a in doc["annotations"]] == list(demo_hand.CLASSES)
        for ann in doc["annotations"]:
            assert ann["type"] == "poly_seg" and ann["attributes"] == {}
            assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}", ann["id"])
            points = np.asarray(ann["points"], float)
            assert 10 <= len(points) <= 30 and points.min() >= 0 and points.max() <= 255
            assert _shoelace(points) > 20, ann["label"]


def test_hand_classes_are_the_datasets_29_in_order(shared_data):
    from segpipe.datasets.hand_xray import CLASSES

    spec = json.loads((shared_data / "hand-xray-rsna" / "hand-bone-29-classes.cvat.json").read_text())
    assert list(demo_hand.CLASSES) == [c["name"] for c in spec] == list(CLASSES)


def _raster(points, size: int = 2048) -> np.ndarray:
    canvas = Image.new("1", (size, size), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in points], fill=1)
    return np.asarray(canvas)


def test_hand_bones_overlap_at_joints_and_the_left_hand_mirrors_the_right():
    rng = np.random.default_rng(0)
    right = demo_hand.hand_polygons(rng, np.ones(5), 2048, mirror=False).bones
    left = demo_hand.hand_polygons(rng, np.ones(5), 2048, mirror=True).bones
    # finger-4..7: index finger, tip to base; each bone overlaps its neighbour at the joint.
    for tip, base in [("finger-4", "finger-5"), ("finger-5", "finger-6"), ("finger-6", "finger-7")]:
        assert (_raster(right[tip]) & _raster(right[base])).sum() > 500
    assert (_raster(right["Triquetrum"]) & _raster(right["Pisiform"])).sum() > 1000
    # A finger bone is fat enough to survive downscaling to 256: about 100 px wide at 2048.
    assert _raster(right["finger-6"]).sum() / 300 > 80
    thumb_x = right["finger-1"][:, 0].mean(), left["finger-1"][:, 0].mean()
    assert thumb_x[0] < 1024 < thumb_x[1]


def test_demo_stage_cli_writes_the_demo_from_params(tmp_path):
    from tasks import demo as stage

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["demo"] = SMALL.model_dump()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    ns = stage.build_parser().parse_args(["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "out")])
    stage.main(ns)
    assert (tmp_path / "out" / "kvasir" / "kavsir_bboxes.json").is_file()


def test_demo_stage_cli_help_runs():
    import subprocess

    result = subprocess.run([sys.executable, "-m", "tasks.demo", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "--out" in result.stdout
