"""Kvasir-SEG: `images/<id>.jpg` + `masks/<id>.jpg`, optionally `kavsir_bboxes.json`.

A layout with no `masks/` folder at all holds images to predict: they are ingested unlabelled
(with a `masks/` folder, every image needs its mask). `single_case` reads one image file alone.

The masks are 3-channel JPEGs with compression noise around 0 and 255. They are converted to
grayscale (PIL's ITU-R 601-2 luma) and thresholded at > 127: the three channels carry the same
content, and a weighted mean of them averages out the per-channel chroma noise instead of
trusting one channel. Images keep their original size, and are stored as the files they are
(segpipe.encoded_image), except 16-bit PNGs, stored as their pixels scaled to 8 bits exactly.
When `kavsir_bboxes.json` is present it must describe every image: an image without an entry,
a size that differs from the image's and a box outside the image are errors. Entries without an
image are logged, not errors: a subset of the images (a published training split) is commonly
kept beside the full file. A case's entry is part of it (RawCase.meta), so editing the entry
re-ingests that case. A file that is not a JSON object is one structural problem naming it (with
`on_error: skip`, one skipped entry) and the images are read as if it were absent, without
entries: it holds no pixels or masks, so it costs no case, as a malformed entry costs only its own.
Kvasir has no patient information, so each case is its own group.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.datasets import CaseData, RawCase, Scan, open_image, require_dir, split_by_suffix, to_8bit
from segpipe.errors import IngestError
from segpipe.encoded_image import EncodedImage

log = logging.getLogger(__name__)

CLASSES = ["polyp"]
SUFFIXES = {".jpg", ".jpeg", ".png"}
BBOXES = "kavsir_bboxes.json"  # sic: the dataset's own spelling
THRESHOLD = 127


def scan(raw: Path) -> Scan:
    images, problems = split_by_suffix(require_dir(raw / "images"), SUFFIXES)
    labelled = (raw / "masks").exists()
    masks, mask_problems = split_by_suffix(require_dir(raw / "masks"), SUFFIXES) if labelled else ({}, [])
    problems += mask_problems
    orphans = sorted(masks.keys() - images.keys())
    problems += [IngestError(masks[stem], "mask without its image in images/") for stem in orphans]
    try:
        boxes = _read_boxes(raw / BBOXES)
    except IngestError as exc:  # one problem, not one per case: the cases are read without entries
        problems.append(exc)
        boxes = None
    spare = sorted(boxes.keys() - images.keys() - masks.keys()) if boxes is not None else []
    if spare:
        log.warning("%s: no image in images/ for %d of its entries (not ingested): %s", raw / BBOXES,
                    len(spare), ", ".join(spare[:5]) + (", ..." if len(spare) > 5 else ""))
    cases = []
    for stem, image in sorted(images.items()):
        if labelled and stem not in masks:
            problems.append(IngestError(image, "image without its mask in masks/"))
        elif boxes is not None and stem not in boxes:
            problems.append(IngestError(image, f"no entry in {BBOXES}"))
        else:
            meta = {} if boxes is None else {"box_entry": boxes[stem]}
            cases.append(RawCase(case_id=stem, group=stem, source=image, label=masks.get(stem), meta=meta))
    if not images and not masks:
        problems.append(IngestError(raw / "images", "no images found"))
    return Scan(cases, problems)


def list_cases(raw: Path) -> list[RawCase]:
    return scan(raw).strict()


def single_case(path: Path) -> RawCase:
    """One image file on its own, unlabelled."""
    if path.suffix.lower() not in SUFFIXES:
        raise IngestError(path, f"not a Kvasir image: expected one of {sorted(SUFFIXES)}")
    return RawCase(case_id=path.stem, group=path.stem, source=path)


def load_case(case: RawCase) -> CaseData:
    """What ingest stores: the image file as it is, checked to decode (segpipe.encoded_image), or
    for a 16-bit file its pixels scaled to 8 bits; and the mask decoded and thresholded."""
    image = EncodedImage.read(case.source, "RGB")
    return _case_data(case, image if image.eight_bit else _rgb(case.source))


def decode_case(case: RawCase) -> CaseData:
    """Every file of the case decoded to pixels, as a script reading Kvasir would (the ingest
    benchmark's baseline): the same case as load_case's, with the image decoded."""
    return _case_data(case, _rgb(case.source))


def _rgb(path: Path) -> np.ndarray:
    return to_8bit(open_image(path), "RGB", path)


def _case_data(case: RawCase, image: np.ndarray | EncodedImage) -> CaseData:
    mask = None if case.label is None else to_8bit(open_image(case.label), "L", case.label) > THRESHOLD
    if mask is not None and mask.shape != image.shape[:2]:
        raise IngestError(case.label, f"mask size {_hw(mask.shape)} != image size {_hw(image.shape)}")
    entry = case.meta.get("box_entry")
    if entry is not None:
        _check_entry(case.source, image.shape, entry)
    attrs = {"kind": "image", "bboxes": list(entry["bbox"]) if entry else []}
    return CaseData(image=image, mask=None if mask is None else mask[None].astype(np.uint8), attrs=attrs)


def _read_boxes(path: Path) -> dict[str, Any] | None:
    """The bounding-box JSON keyed by case id, or None when the layout has none."""
    if not path.exists():
        return None
    try:
        boxes = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise IngestError(path, f"unreadable JSON: {exc}") from exc
    if not isinstance(boxes, dict):
        raise IngestError(path, "expected an object keyed by case id")
    return boxes


def _check_entry(source: Path, shape: tuple[int, ...], entry: Any) -> None:
    try:
        size = (int(entry["height"]), int(entry["width"]))
        bbox = entry["bbox"]
    except (KeyError, TypeError, ValueError) as exc:
        raise IngestError(source, f"malformed {BBOXES} entry: {exc!r}") from exc
    if size != tuple(shape[:2]):
        raise IngestError(source, f"image size {_hw(shape)} != {_hw(size)} recorded in {BBOXES}")
    if not isinstance(bbox, list):
        raise IngestError(source, f"{BBOXES} entry: bbox is not a list")
    for box in bbox:
        _check_box(source, size, box)


def _check_box(source: Path, size: tuple[int, int], box: Any) -> None:
    """A box must lie inside the image, min <= max (0 <= min and max <= width or height: the real
    file has boxes reaching the image's width, as pixel edges; the demo's are pixel indices)."""
    try:
        x0, y0, x1, y1 = (float(box[key]) for key in ("xmin", "ymin", "xmax", "ymax"))
    except (KeyError, TypeError, ValueError) as exc:
        raise IngestError(source, f"malformed box in {BBOXES}: {box!r}") from exc
    if not (0 <= x0 <= x1 <= size[1] and 0 <= y0 <= y1 <= size[0]):
        raise IngestError(source, f"box {box!r} in {BBOXES} is inverted or outside the {_hw(size)} image")


def _hw(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[0]} (WxH)"
