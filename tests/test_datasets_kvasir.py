"""The Kvasir-SEG reader: the real 300 sample pairs, and a small synthetic layout for the failures."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segpipe.config import DaskConfig, IngestConfig
from segpipe.datasets import kvasir, reader
from segpipe.errors import ConfigError, IngestError
from segpipe.ingest import ingest
from segpipe.parallel import dask_client
from segpipe.predict import input_scan
from segpipe.store import CaseStore
from tests.conftest import SHARED_DATA, needs_shared_data

REAL = SHARED_DATA / "kvasir-seg"


def write_pair(raw: Path, stem: str, size: tuple[int, int] = (48, 40), mask_size: tuple[int, int] | None = None):
    """A JPEG image and a JPEG mask (a bright rectangle) of `size` (W, H)."""
    (raw / "images").mkdir(parents=True, exist_ok=True)
    (raw / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(stem))
    image = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(image).save(raw / "images" / f"{stem}.jpg")
    w, h = mask_size or size
    mask = np.zeros((h, w, 3), np.uint8)
    mask[h // 4 : h // 2, w // 4 : w // 2] = 255
    Image.fromarray(mask).save(raw / "masks" / f"{stem}.jpg", quality=90)


@needs_shared_data
def test_every_real_mask_is_its_jpeg_converted_to_luma_and_thresholded_above_127():
    cases = kvasir.list_cases(REAL)
    boxes = json.loads((REAL / "kavsir_bboxes.json").read_text())
    assert len(cases) == 300
    for case in cases:
        data = kvasir.load_case(case)
        expected = np.asarray(Image.open(case.label).convert("L")) > 127
        assert data.mask.shape == (1, *expected.shape) and data.mask.dtype == np.uint8
        np.testing.assert_array_equal(data.mask[0], expected, err_msg=case.case_id)
        assert data.image.shape == (boxes[case.case_id]["height"], boxes[case.case_id]["width"], 3)
        assert data.attrs["bboxes"] == boxes[case.case_id]["bbox"]


@needs_shared_data
def test_ingest_keeps_the_image_file_which_decodes_to_the_pixels_a_loader_reads():
    for case in kvasir.list_cases(REAL)[:40]:
        kept, decoded = kvasir.load_case(case), kvasir.decode_case(case)
        assert kept.image.content == case.source.read_bytes()
        np.testing.assert_array_equal(kept.image.pixels(), decoded.image)
        np.testing.assert_array_equal(decoded.image, np.asarray(Image.open(case.source).convert("RGB")))
        np.testing.assert_array_equal(kept.mask, decoded.mask)
        assert kept.attrs == decoded.attrs


@needs_shared_data
def test_real_images_keep_their_original_varied_sizes():
    sizes = {kvasir.load_case(c).image.shape for c in kvasir.list_cases(REAL)[:40]}
    assert len(sizes) > 10


def test_case_id_and_group_are_the_file_stem(tmp_path):
    for stem in ("b", "a"):
        write_pair(tmp_path, stem)
    cases = kvasir.list_cases(tmp_path)
    assert [(c.case_id, c.group) for c in cases] == [("a", "a"), ("b", "b")]
    data = kvasir.load_case(cases[0])
    assert data.image.shape == (40, 48, 3) and data.image.pixels().dtype == np.uint8
    assert data.mask[0, 10:20, 12:24].all() and data.mask.sum() == 10 * 12
    assert data.attrs["bboxes"] == []


def test_image_without_its_mask_is_a_structural_error_naming_the_image(tmp_path):
    write_pair(tmp_path, "a")
    (tmp_path / "masks" / "a.jpg").unlink()
    with pytest.raises(IngestError, match=r"images/a\.jpg: image without its mask"):
        kvasir.list_cases(tmp_path)


def test_a_layout_without_a_masks_folder_is_read_as_unlabelled_images_to_predict(tmp_path):
    for stem in ("a", "b"):
        write_pair(tmp_path, stem)
    for mask in (tmp_path / "masks").iterdir():
        mask.unlink()
    (tmp_path / "masks").rmdir()
    cases = kvasir.list_cases(tmp_path)
    assert [(c.case_id, c.label) for c in cases] == [("a", None), ("b", None)]
    data = kvasir.load_case(cases[0])
    assert data.mask is None and data.image.shape == (40, 48, 3)
    with dask_client(DaskConfig(n_workers=1)) as client:
        report = ingest("kvasir", tmp_path, tmp_path / "store.zarr", IngestConfig(), client)
    store = CaseStore(tmp_path / "store.zarr")
    assert report.ingested == 2 and store.case_ids() == ["a", "b"]
    assert not store.has("a", "mask") and store.case_attrs("a")["labelled"] is False


def test_one_image_file_is_ingested_on_its_own_and_another_suffix_is_refused(tmp_path):
    write_pair(tmp_path / "raw", "a")
    image = tmp_path / "raw" / "images" / "a.jpg"
    scan, root = input_scan("kvasir", image)
    with dask_client(DaskConfig(n_workers=1)) as client:
        ingest("kvasir", root, tmp_path / "one.zarr", IngestConfig(), client, scan)
    store = CaseStore(tmp_path / "one.zarr")
    assert store.case_ids() == ["a"] and store.case_attrs("a")["source"] == "a.jpg"
    np.testing.assert_array_equal(np.asarray(store.image("a")), np.asarray(Image.open(image).convert("RGB")))
    with pytest.raises(IngestError, match=r"notes\.txt: not a Kvasir image"):
        kvasir.single_case(tmp_path / "notes.txt")


def test_mask_without_its_image_is_a_structural_error_naming_the_mask(tmp_path):
    write_pair(tmp_path, "a")
    (tmp_path / "images" / "a.jpg").unlink()
    with pytest.raises(IngestError, match=r"masks/a\.jpg: mask without its image"):
        kvasir.list_cases(tmp_path)


def test_stray_non_image_file_is_a_structural_error_but_dotfiles_are_ignored(tmp_path):
    write_pair(tmp_path, "a")
    (tmp_path / "images" / ".DS_Store").write_bytes(b"\0")
    assert len(kvasir.list_cases(tmp_path)) == 1
    (tmp_path / "images" / "notes.txt").write_text("hi")
    with pytest.raises(IngestError, match=r"notes\.txt: stray entry"):
        kvasir.list_cases(tmp_path)


def test_mask_of_another_size_than_its_image_is_rejected_naming_the_mask(tmp_path):
    write_pair(tmp_path, "a", size=(48, 40), mask_size=(40, 48))
    with pytest.raises(IngestError, match=r"masks/a\.jpg: mask size 40x48 \(WxH\) != image size 48x40"):
        kvasir.load_case(kvasir.list_cases(tmp_path)[0])


def test_truncated_jpeg_is_rejected_naming_the_file(tmp_path):
    write_pair(tmp_path, "a")
    path = tmp_path / "images" / "a.jpg"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(IngestError, match=r"images/a\.jpg: corrupt or truncated image"):
        kvasir.load_case(kvasir.list_cases(tmp_path)[0])


def test_image_size_is_checked_against_the_bbox_json(tmp_path):
    write_pair(tmp_path, "a")
    entry = {"height": 40, "width": 48, "bbox": [{"label": "polyp", "xmin": 1, "ymin": 2, "xmax": 3, "ymax": 4}]}
    (tmp_path / kvasir.BBOXES).write_text(json.dumps({"a": entry}))
    assert kvasir.load_case(kvasir.list_cases(tmp_path)[0]).attrs["bboxes"] == entry["bbox"]
    (tmp_path / kvasir.BBOXES).write_text(json.dumps({"a": {**entry, "height": 41}}))
    with pytest.raises(IngestError, match=r"images/a\.jpg: image size 48x40 \(WxH\) != 48x41"):
        kvasir.load_case(kvasir.list_cases(tmp_path)[0])


def test_with_a_bbox_json_every_image_needs_an_entry_and_spare_entries_are_logged(tmp_path, caplog):
    for stem in ("a", "b", "c"):
        write_pair(tmp_path, stem)
    entry = {"height": 40, "width": 48, "bbox": []}
    (tmp_path / kvasir.BBOXES).write_text(json.dumps({"a": entry, "c": entry, "ghost": entry}))
    scan = kvasir.scan(tmp_path)
    assert [case.case_id for case in scan.cases] == ["a", "c"]
    assert [str(p) for p in scan.problems] == [f"{tmp_path / 'images/b.jpg'}: no entry in kavsir_bboxes.json"]
    assert f"{tmp_path / kvasir.BBOXES}: no image in images/ for 1 of its entries (not ingested): ghost" in caplog.text


MALFORMED_BBOXES = {"unreadable JSON": ("{not json", "unreadable JSON"),
                    "not an object": ("[1, 2]", "expected an object keyed by case id")}


@pytest.mark.parametrize("kind", MALFORMED_BBOXES)
def test_a_malformed_bbox_json_is_one_problem_naming_it_and_the_cases_are_read_without_entries(tmp_path, kind):
    text, problem = MALFORMED_BBOXES[kind]
    for stem in ("a", "b"):
        write_pair(tmp_path, stem)
    (tmp_path / kvasir.BBOXES).write_text(text)
    scan = kvasir.scan(tmp_path)
    assert [str(p).split(": ")[:2] for p in scan.problems] == [[str(tmp_path / kvasir.BBOXES), problem]]
    assert [(case.case_id, case.meta) for case in scan.cases] == [("a", {}), ("b", {})]
    assert kvasir.load_case(scan.cases[0]).attrs["bboxes"] == []
    with pytest.raises(IngestError, match=problem):  # what the `fail` policy raises
        kvasir.list_cases(tmp_path)


def test_with_on_error_skip_a_malformed_bbox_json_is_one_skipped_entry_and_every_case_is_ingested(tmp_path):
    for stem in ("a", "b"):
        write_pair(tmp_path / "raw", stem)
    (tmp_path / "raw" / kvasir.BBOXES).write_text("{not json")
    with dask_client(DaskConfig(n_workers=1)) as client:
        report = ingest("kvasir", tmp_path / "raw", tmp_path / "k.zarr", IngestConfig(on_error="skip"), client)
    assert (report.found, report.ingested, [s["source"] for s in report.skipped]) == (3, 2, [kvasir.BBOXES])
    store = CaseStore(tmp_path / "k.zarr")
    assert [store.case_attrs(c)["bboxes"] for c in store.case_ids()] == [[], []]


@pytest.mark.parametrize("box", [{"xmin": 1, "ymin": 2, "xmax": 49, "ymax": 4},  # past the right edge
                                 {"xmin": -1, "ymin": 2, "xmax": 3, "ymax": 4},
                                 {"xmin": 3, "ymin": 4, "xmax": 3, "ymax": 2}])  # inverted
def test_a_box_outside_its_image_or_inverted_is_rejected_naming_the_image(tmp_path, box):
    write_pair(tmp_path, "a")
    inside = {"label": "polyp", "xmin": 0, "ymin": 0, "xmax": 48, "ymax": 40}  # the whole image, pixel edges
    entry = {"height": 40, "width": 48, "bbox": [inside, {"label": "polyp", **box}]}
    (tmp_path / kvasir.BBOXES).write_text(json.dumps({"a": entry}))
    with pytest.raises(IngestError, match=r"images/a\.jpg: box .* is inverted or outside the 48x40 \(WxH\) image"):
        kvasir.load_case(kvasir.list_cases(tmp_path)[0])


def test_unknown_reader_name_is_a_config_error():
    assert reader("kvasir") is kvasir
    with pytest.raises(ConfigError, match="'nope'"):
        reader("nope")


def test_a_16_bit_png_is_scaled_exactly_to_8_bits_never_clipped(tmp_path):
    write_pair(tmp_path, "a")
    wide = np.linspace(0, 65535, 48 * 40).round().astype(np.uint16).reshape(40, 48)
    (tmp_path / "images" / "a.jpg").unlink()
    Image.fromarray(wide).save(tmp_path / "images" / "a.png")  # PIL writes a 16-bit greyscale PNG
    assert Image.open(tmp_path / "images" / "a.png").mode.startswith("I")
    data = kvasir.load_case(kvasir.list_cases(tmp_path)[0])
    expected = (wide.astype(np.int64) * 255 + 32767) // 65535  # v * 255 / 65535, rounded
    assert isinstance(data.image, np.ndarray) and data.image.shape == (40, 48, 3)
    for channel in range(3):
        np.testing.assert_array_equal(data.image[..., channel], expected)
    assert (data.image == 255).mean() < 0.01  # PIL's convert would have made 99% of it white


@pytest.mark.parametrize(("content", "reason"), [(b"", "empty file"), (b"GIF89a not really" * 9, "not an image")])
def test_an_empty_or_garbage_image_is_named_in_words_that_do_not_change_between_runs(tmp_path, content, reason):
    write_pair(tmp_path, "a")
    (tmp_path / "images" / "a.jpg").write_bytes(content)
    with pytest.raises(IngestError) as caught:
        kvasir.load_case(kvasir.list_cases(tmp_path)[0])
    message = str(caught.value)
    assert message.startswith(str(tmp_path / "images" / "a.jpg")) and reason in message
    assert "0x" not in message and "BytesIO" not in message
