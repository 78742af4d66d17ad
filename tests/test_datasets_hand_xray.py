"""The hand-bone X-ray reader: polygon rasterisation pinned to hand-computed pixel sets, the
train/test layout, and the real RSNA X-ray in that layout."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segpipe.datasets import hand_xray
from segpipe.errors import IngestError
from tests.conftest import SHARED_DATA, needs_shared_data
from tests.polygons import centres_in_or_on

RSNA = SHARED_DATA / "hand-xray-rsna"

RECTANGLE = [[2, 3], [6, 3], [6, 8], [2, 8]]
TRIANGLE = [[0, 0], [6, 0], [0, 3]]
# Edges cross at (2, 2): two triangles of opposite orientation, so its signed area is zero.
BOWTIE = [[0, 0], [4, 4], [4, 0], [0, 4]]


def write_xray(raw: Path, split: str, patient: str, stem: str, annotations=None, size=(64, 64), mode="L"):
    """A PNG of `size` (W, H) in `<split>/DCM/<patient>/`; its JSON when annotations are given."""
    png = raw / split / "DCM" / patient / f"{stem}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    value = 1000 if mode == "I;16" else 100
    Image.fromarray(np.full(size[::-1], value, np.uint16 if mode == "I;16" else np.uint8)).save(png)
    if annotations is not None:
        doc = raw / split / "outputs_json" / patient / f"{stem}.json"
        doc.parent.mkdir(parents=True, exist_ok=True)
        anns = [{"id": str(i), "type": "poly_seg", "attributes": {}, "label": label, "points": points}
                for i, (label, points) in enumerate(annotations)]
        doc.write_text(json.dumps({"annotations": anns, "filename": png.name, "metadata": {}}))
    return png


def only_case(raw: Path):
    (case,) = hand_xray.list_cases(raw)
    return hand_xray.load_case(case)


def test_classes_are_the_29_bones_in_the_label_spec_order():
    assert len(hand_xray.CLASSES) == 29
    assert hand_xray.CLASSES[:2] == ["finger-1", "finger-2"] and hand_xray.CLASSES[-2:] == ["Radius", "Ulna"]
    if RSNA.is_dir():
        spec = json.loads((RSNA / "hand-bone-29-classes.cvat.json").read_text())
        assert hand_xray.CLASSES == [c["name"] for c in spec]


def test_rectangle_with_vertices_on_pixel_centres_fills_its_boundary_inclusive():
    mask = np.asarray(hand_xray.rasterise([{"label": "finger-1", "points": RECTANGLE}], (10, 10), Path("x.json")))
    expected = np.zeros((10, 10), np.uint8)
    expected[3:9, 2:7] = 1  # rows 3..8, columns 2..6: centres inside or on the edges
    np.testing.assert_array_equal(mask[0], expected)
    assert mask.shape == (29, 10, 10) and mask[1:].sum() == 0


def test_triangle_sets_exactly_the_pixels_whose_centre_is_inside_or_on_it():
    mask = np.asarray(hand_xray.rasterise([{"label": "Ulna", "points": TRIANGLE}], (10, 10), Path("x.json")))
    # Inside or on the triangle (0,0), (6,0), (0,3) means x >= 0, y >= 0 and x + 2y <= 6.
    yy, xx = np.mgrid[:10, :10]
    expected = (xx + 2 * yy <= 6).astype(np.uint8)
    assert expected.sum() == 7 + 5 + 3 + 1
    np.testing.assert_array_equal(mask[28], expected)


def test_a_centre_outside_the_polygon_by_less_than_half_a_pixel_is_not_set():
    # Inside or on the triangle (0,0), (4,0), (0,3) means x >= 0, y >= 0 and 3x + 4y <= 12. PIL's
    # fill also set (3, 1), whose centre is 1/4 pixel outside the slanted edge.
    lunate = [{"label": "Lunate", "points": [[0, 0], [4, 0], [0, 3]]}]
    mask = np.asarray(hand_xray.rasterise(lunate, (6, 6), Path("x.json")))
    yy, xx = np.mgrid[:6, :6]
    expected = (3 * xx + 4 * yy <= 12).astype(np.uint8)
    assert expected.sum() == 5 + 3 + 2 + 1 and not expected[1, 3]
    np.testing.assert_array_equal(mask[hand_xray.CHANNEL["Lunate"]], expected)


def test_fractional_vertices_are_kept_not_truncated():
    # Corners at half pixels hold the centres of rows 1..2, columns 1..4; truncated to (0,0)-(4,2)
    # (as PIL did) they would also hold row 0 and column 0.
    square = [[0.5, 0.5], [4.5, 0.5], [4.5, 2.5], [0.5, 2.5]]
    mask = np.asarray(hand_xray.rasterise([{"label": "Radius", "points": square}], (6, 12), Path("x.json")))
    expected = np.zeros((6, 12), np.uint8)
    expected[1:3, 1:5] = 1
    np.testing.assert_array_equal(mask[hand_xray.CHANNEL["Radius"]], expected)


def test_self_crossing_polygon_with_zero_signed_area_fills_both_of_its_lobes(tmp_path):
    write_xray(tmp_path, "train", "ID001", "a", [("Ulna", BOWTIE)])
    mask = np.asarray(only_case(tmp_path).mask)
    # Inside or on the left lobe: x <= y and x <= 4 - y; the right lobe: x >= y and x >= 4 - y.
    yy, xx = np.mgrid[:64, :64]
    expected = ((xx <= np.minimum(yy, 4 - yy)) | ((xx >= np.maximum(yy, 4 - yy)) & (xx <= 4))).astype(np.uint8)
    assert expected.sum() == 2 + 4 + 5 + 4 + 2
    np.testing.assert_array_equal(mask[hand_xray.CHANNEL["Ulna"]], expected)


def test_random_polygons_fill_exactly_the_centres_an_independent_per_pixel_test_finds():
    # Concave, self-intersecting (even-odd), repeated vertices, up to a pixel outside the image,
    # vertices on a 1/q grid so that both computations are exact in floating point.
    rng = np.random.default_rng(0)
    height, width = 20, 24
    for _ in range(1000):
        q = int(rng.choice([1, 2, 4, 8]))
        xy = np.stack([rng.integers(-q, (width + 1) * q, 7), rng.integers(-q, (height + 1) * q, 7)], axis=1) / q
        xy = xy[: rng.integers(3, 8)]
        rows, cols, inside = hand_xray.fill_polygon(xy, height, width)
        got = np.zeros((height, width), bool)
        got[rows, cols] = inside
        np.testing.assert_array_equal(got, centres_in_or_on(xy, height, width), err_msg=str(xy.tolist()))


def test_overlapping_bones_keep_both_channels_and_polygons_of_one_class_add_up(tmp_path):
    second_radius = [[20, 20], [30, 20], [30, 30], [20, 30]]
    ulna = [[4, 5], [9, 5], [9, 9], [4, 9]]  # rows 5..9, columns 4..9: overlaps the rectangle
    annotations = [("Radius", RECTANGLE), ("Ulna", ulna), ("Radius", second_radius)]
    write_xray(tmp_path, "train", "ID001", "img1_R", annotations)
    mask = np.asarray(only_case(tmp_path).mask)
    radius, ulna = mask[hand_xray.CHANNEL["Radius"]], mask[hand_xray.CHANNEL["Ulna"]]
    assert radius.sum() == 6 * 5 + 11 * 11 and (radius[20:31, 20:31] == 1).all()
    assert ulna.sum() == 5 * 6
    overlap = np.zeros_like(radius)
    overlap[5:9, 4:7] = 1
    np.testing.assert_array_equal(radius & ulna, overlap)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert mask.sum() == radius.sum() + ulna.sum()


def test_train_images_are_labelled_and_test_images_are_not(tmp_path):
    write_xray(tmp_path, "train", "ID001", "a_L", [("finger-1", RECTANGLE)])
    write_xray(tmp_path, "test", "ID040", "b_R", size=(48, 80))
    cases = hand_xray.list_cases(tmp_path)
    assert [(c.case_id, c.group) for c in cases] == [("a_L", "ID001"), ("b_R", "ID040")]
    train, test = (hand_xray.load_case(c) for c in cases)
    assert train.attrs == {"kind": "image", "split": "train", "labelled": True, "png_mode": "L"}
    assert test.attrs == {"kind": "image", "split": "test", "labelled": False, "png_mode": "L"}
    assert test.mask is None and test.image.shape == (80, 48) and test.image.dtype == np.uint8


def test_16_bit_png_stays_16_bit(tmp_path):
    write_xray(tmp_path, "test", "ID001", "a", mode="I;16")
    image = only_case(tmp_path).image
    assert image.dtype == np.uint16 and (image == 1000).all()


def test_colour_png_is_stored_as_its_luma_and_says_so(tmp_path):
    png = tmp_path / "test" / "DCM" / "ID001" / "a.png"
    png.parent.mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), [200, 100, 50], np.uint8)).save(png)
    data = only_case(tmp_path)
    assert data.attrs["png_mode"] == "RGB" and (data.image == 124).all()  # PIL's luma: (200*299 + 100*587 + 50*114) / 1000


@needs_shared_data
def test_real_rsna_xray_in_a_dcm_layout_ingests_unlabelled_at_its_own_size(tmp_path):
    (tmp_path / "test" / "DCM" / "ID900").mkdir(parents=True)
    (tmp_path / "test" / "DCM" / "ID900" / "1377.png").symlink_to(RSNA / "1377.png")
    data = only_case(tmp_path)
    assert data.image.shape == (2044, 1514) and data.image.dtype == np.uint8 and data.mask is None


def test_unknown_label_is_rejected_naming_the_json_and_the_label(tmp_path):
    write_xray(tmp_path, "train", "ID001", "a", [("finger-1", RECTANGLE), ("Femur", TRIANGLE)])
    with pytest.raises(IngestError, match=r"ID001/a\.json: annotation 1: unknown label 'Femur'"):
        only_case(tmp_path)


@pytest.mark.parametrize(
    "points, problem",
    [
        ([], r"empty polygon \(no points\)"),
        ([[1, 1], [5, 5]], "degenerate polygon: 2 point"),
        ([[1, 1], [3, 3], [5, 5]], "degenerate polygon: all 3 points lie on one line"),
        ([[1, 1], [5, 5], [3, 3], [2, 2]], "degenerate polygon: all 4 points lie on one line"),
        ([[1, 1], [1, 1], [1, 1], [1, 1]], "degenerate polygon: all 4 points lie on one line"),
        ([[1, 1], [5, 5], [3, 3.6]], r"degenerate polygon: all 3 points lie on one line \(within 0.5 px\)"),
        ([[1, 1], ["a", 2], [3, 3]], "points are not a list of"),
    ],
    ids=["empty", "two points", "collinear", "collinear folded back", "one point repeated", "within half a pixel",
         "not numbers"],
)
def test_degenerate_or_malformed_polygon_is_rejected_naming_the_json(tmp_path, points, problem):
    write_xray(tmp_path, "train", "ID001", "a", [("Lunate", points)])
    with pytest.raises(IngestError, match=rf"ID001/a\.json: annotation 0 \(Lunate\): {problem}"):
        only_case(tmp_path)


def test_polygon_with_area_but_no_pixel_centre_inside_is_rejected_naming_the_annotation(tmp_path):
    sliver = [[1.2, 1.05], [10.2, 1.05], [10.2, 1.95], [1.2, 1.95]]  # 0.9 px tall, between rows 1 and 2 of centres
    write_xray(tmp_path, "train", "ID001", "a", [("Ulna", RECTANGLE), ("Radius", sliver)])
    with pytest.raises(IngestError, match=r"ID001/a\.json: annotation 1 \(Radius\): degenerate polygon: fills no pixel"):
        only_case(tmp_path)


def test_labelled_image_with_no_annotations_is_rejected_naming_the_json(tmp_path):
    write_xray(tmp_path, "train", "ID001", "a", [])
    with pytest.raises(IngestError, match=r"outputs_json/ID001/a\.json: no annotations"):
        only_case(tmp_path)


def test_polygon_outside_the_image_is_an_image_annotation_size_mismatch(tmp_path):
    write_xray(tmp_path, "train", "ID001", "a", [("Lunate", [[10, 10], [70, 10], [10, 40]])], size=(64, 64))
    with pytest.raises(IngestError, match=r"a\.json: .*outside the 64x64 image \(image/mask size mismatch\)"):
        only_case(tmp_path)


def test_train_image_without_its_json_is_a_structural_error(tmp_path):
    write_xray(tmp_path, "train", "ID001", "a", [("Lunate", RECTANGLE)])
    write_xray(tmp_path, "train", "ID001", "b")
    with pytest.raises(IngestError, match=r"DCM/ID001/b\.png: image without its annotation JSON"):
        hand_xray.list_cases(tmp_path)


def good_layout(raw: Path) -> None:
    write_xray(raw, "train", "ID001", "a", [("Radius", RECTANGLE)])
    write_xray(raw, "test", "ID040", "b")


def scanned(raw: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """The case ids a scan finds and its problems as (path relative to `raw`, reason)."""
    scan = hand_xray.scan(raw)
    return [c.case_id for c in scan.cases], [(p.path.relative_to(raw).as_posix(), p.reason) for p in scan.problems]


SPLIT_FOLDERS = "expected only the folders train/, test/ here"
SPLIT_CONTENTS = "expected only the folders DCM/, outputs_json/ here"


@pytest.mark.parametrize(
    "write_stray, problem",
    [
        (lambda r: write_xray(r, "val", "ID002", "c"), ("val", f"unknown folder: {SPLIT_FOLDERS}")),
        (lambda r: write_xray(r, "Test", "ID041", "d"), ("Test", f"unknown folder: {SPLIT_FOLDERS}")),
        (lambda r: (r / "loose.png").write_bytes(b"x"), ("loose.png", f"stray file: {SPLIT_FOLDERS}")),
        (lambda r: (r / "train" / "notes.txt").write_text("x"), ("train/notes.txt", f"stray file: {SPLIT_CONTENTS}")),
        (lambda r: (r / "test" / "masks").mkdir(), ("test/masks", f"unknown folder: {SPLIT_CONTENTS}")),
    ],
    ids=["val split", "wrong-case split", "image in the root", "file in a split", "folder in a split"],
)
def test_an_entry_outside_the_layout_is_a_problem_naming_it_and_the_good_cases_are_still_found(
        tmp_path, write_stray, problem):
    good_layout(tmp_path)
    write_stray(tmp_path)
    assert scanned(tmp_path) == (["a", "b"], [problem])


def test_the_roots_own_files_are_left_alone(tmp_path):
    good_layout(tmp_path)
    for name in ("meta_data.xlsx", "README.md"):
        (tmp_path / name).write_text("x")
    assert scanned(tmp_path) == (["a", "b"], [])


@pytest.mark.parametrize("labels", [None, "outputs_JSON"], ids=["missing", "misnamed"])
def test_train_split_without_its_outputs_json_folder_is_a_problem_naming_that_folder(tmp_path, labels):
    good_layout(tmp_path)
    if labels is None:
        shutil.rmtree(tmp_path / "train" / "outputs_json")
    else:
        (tmp_path / "train" / "outputs_json").rename(tmp_path / "train" / labels)
    unknown = [] if labels is None else [(f"train/{labels}", f"unknown folder: {SPLIT_CONTENTS}")]
    assert scanned(tmp_path) == (["b"], unknown + [
        ("train/outputs_json", "missing folder: the train annotation JSONs belong here"),
        ("train/DCM/ID001/a.png", "image without its annotation JSON in outputs_json/"),
    ])


def test_split_without_its_dcm_folder_is_a_problem_naming_that_folder(tmp_path):
    good_layout(tmp_path)
    shutil.rmtree(tmp_path / "train" / "DCM")
    assert scanned(tmp_path) == (["b"], [
        ("train/DCM", "missing folder: the train images belong here"),
        ("train/outputs_json/ID001", "annotation folder without its patient in DCM/"),
    ])


def test_stray_file_in_a_patient_folder_is_a_structural_error(tmp_path):
    write_xray(tmp_path, "test", "ID001", "a")
    (tmp_path / "test" / "DCM" / "ID001" / "a.dcm").write_bytes(b"DICM")
    with pytest.raises(IngestError, match=r"ID001/a\.dcm: stray entry"):
        hand_xray.list_cases(tmp_path)


def test_truncated_png_is_rejected_naming_the_file(tmp_path):
    rng = np.random.default_rng(0)
    png = write_xray(tmp_path, "test", "ID001", "a")
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(png)
    png.write_bytes(png.read_bytes()[:2000])
    with pytest.raises(IngestError, match=r"ID001/a\.png: corrupt or truncated image"):
        only_case(tmp_path)
