"""Hand-bone X-rays: `<split>/DCM/<patient>/<stem>.png` + `<split>/outputs_json/<patient>/<stem>.json`.

`<split>` is `train` and/or `test`. `train` is labelled: it must have its `outputs_json/` folder,
and every image needs its JSON (and every JSON its image). `test` is labelled too when it has an
`outputs_json/` folder, else (as usual) ingested unlabelled. Anything else in a split (a
misnamed `outputs_JSON/`, a stray file) or any other folder or image in the root (a `val/`
split, a misnamed `Test/`) is a problem, not skipped; the root's other files (the release's
spreadsheet of patient data, a README) are not the layout's and are left alone. The patient
folder is the group. Images may be any size.

Pixel convention of the masks: the polygon's vertices are in pixel coordinates with pixel centres
at integers (x = column, y = row), and a pixel is set exactly when its centre lies inside the
polygon (even-odd rule) or on its boundary. Vertices keep their fractions; "on" is exact for
integer and binary fractions (0.5, 0.25, ...), while with others such as 0.1 a centre within
~1e-15 px of an edge may fall either way, as with any floating-point test. (PIL's
`ImageDraw.polygon` was used first: it truncates vertices to integers and also sets the pixels of
its outline whose centres lie outside, 0.85% of a demo hand's bone pixels.) Tests pin the rule
against hand-computed pixel sets and an independent per-pixel test. Each class is one channel and
polygons of different classes may overlap.

A polygon needs at least 3 points, not all on one line (such a polygon would set the centres
along its line but has no inside), and must fill at least one pixel under that rule (a sliver
between two rows of centres fills none): anything else is an error naming the annotation. A
self-crossing polygon (a bowtie, whose signed area may be zero) is filled like any other.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.datasets import CaseData, RawCase, Scan, open_image, require_dir, split_by_suffix, visible
from segpipe.errors import IngestError

CARPALS = ["Trapezium", "Trapezoid", "Capitate", "Hamate", "Scaphoid", "Lunate", "Triquetrum", "Pisiform"]
CLASSES = [f"finger-{i}" for i in range(1, 20)] + CARPALS + ["Radius", "Ulna"]
CHANNEL = {name: i for i, name in enumerate(CLASSES)}
SPLITS = ("train", "test")
IMAGES, LABELS = "DCM", "outputs_json"
# A vertex may sit on the far edge of the last pixel; further out means the annotation does not
# belong to an image of this size.
EDGE_SLACK = 1.0
# A polygon whose points all lie this close to one line (in pixels) is at most a pixel wide: a line
# drawn as an outline, whose boundary alone would set the centres along it.
COLLINEAR_TOLERANCE = 0.5
# Files that are images wherever they lie, so must lie where the layout reads them.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm"}


def scan(raw: Path) -> Scan:
    splits, problems = _layout(require_dir(raw), SPLITS, other_files=True)
    cases: list[RawCase] = []
    for split, root in splits.items():
        found, trouble = _scan_split(root, split)
        cases += found
        problems += trouble
    if not cases and not problems:
        problems.append(IngestError(raw, f"no images found under {{{','.join(SPLITS)}}}/{IMAGES}/<patient>/"))
    return Scan(sorted(cases, key=lambda c: c.case_id), problems)


def list_cases(raw: Path) -> list[RawCase]:
    return scan(raw).strict()


def single_case(path: Path) -> RawCase:
    """One X-ray file on its own, unlabelled (as a `test` image)."""
    if path.suffix.lower() != ".png":
        raise IngestError(path, "not an X-ray image of this layout: expected a .png")
    return RawCase(path.stem, path.stem, path, meta={"split": "test"})


def load_case(case: RawCase) -> CaseData:
    image, mode = _gray(case.source)
    mask = None if case.label is None else rasterise(_annotations(case.label), image.shape, case.label)
    # png_mode says what the file held: "RGB" or "P" means the stored grey is its luma (see _gray)
    attrs = {"kind": "image", "split": case.meta["split"], "labelled": case.label is not None, "png_mode": mode}
    return CaseData(image=image, mask=mask, attrs=attrs)


decode_case = load_case  # load_case decodes every file already


def rasterise(annotations: list[dict[str, Any]], shape: tuple[int, ...], where: Path) -> np.ndarray:
    """(C, H, W) uint8 multi-label mask: each polygon filled into its class channel."""
    height, width = shape[:2]
    mask = np.zeros((len(CLASSES), height, width), dtype=np.uint8)
    for i, ann in enumerate(annotations):
        label = ann.get("label")
        if label not in CHANNEL:
            raise IngestError(where, f"annotation {i}: unknown label {label!r}")
        what = f"annotation {i} ({label})"
        rows, cols, inside = fill_polygon(_polygon(ann.get("points"), what, (height, width), where), height, width)
        if not inside.any():
            raise IngestError(where, f"{what}: degenerate polygon: fills no pixel (no pixel centre inside or on it)")
        mask[CHANNEL[label], rows, cols] |= inside
    return mask


def fill_polygon(xy: np.ndarray, height: int, width: int) -> tuple[slice, slice, np.ndarray]:
    """The pixels of the polygon `xy` ((N, 2) x, y vertices) under the module's convention: a bool
    array over the polygon's bounding box clipped to the image, and the rows and columns it covers."""
    top, bottom = max(math.ceil(xy[:, 1].min()), 0), min(math.floor(xy[:, 1].max()), height - 1)
    left, right = max(math.ceil(xy[:, 0].min()), 0), min(math.floor(xy[:, 0].max()), width - 1)
    if bottom < top or right < left:  # no pixel centre within reach
        return slice(0, 0), slice(0, 0), np.zeros((0, 0), dtype=bool)
    (px, py), (qx, qy) = xy.T, np.roll(xy, -1, axis=0).T  # edge i runs from vertex i to vertex i + 1
    low, high = np.minimum(py, qy), np.maximum(py, qy)
    y = np.arange(top, bottom + 1, dtype=np.float64)[:, None]  # rows of centres against edges
    with np.errstate(divide="ignore", invalid="ignore"):  # horizontal edges, masked out below
        x = px + (y - py) * (qx - px) / (qy - py)  # in this order, integer vertices cross exactly
    sloped = low < high
    # Inside: between pairs of sorted crossings, each edge counted on [low, high) so that a vertex
    # is crossed once. Centres on the boundary are added apart: that count misses bottom vertices
    # and horizontal edges.
    reached = sloped & (low <= y)
    crossings = np.sort(np.where(reached & (y < high), x, np.inf), axis=1)
    pairs = crossings.shape[1] // 2 * 2
    starts, ends = crossings[:, 0:pairs:2], crossings[:, 1:pairs:2]
    inner = np.isfinite(ends)
    on = reached & (y <= high) & (x == np.floor(x))
    flat = ~sloped & (py == np.floor(py)) & (top <= py) & (py <= bottom)
    runs = (np.concatenate([np.nonzero(inner)[0], np.nonzero(on)[0], (py[flat] - top).astype(np.intp)]),
            np.concatenate([starts[inner], x[on], np.minimum(px, qx)[flat]]),
            np.concatenate([ends[inner], x[on], np.maximum(px, qx)[flat]]))
    return slice(top, bottom + 1), slice(left, right + 1), _paint(*runs, bottom - top + 1, left, right)


def _paint(rows: np.ndarray, start: np.ndarray, end: np.ndarray, n_rows: int, left: int, right: int) -> np.ndarray:
    """(n_rows, right - left + 1) bool, set at the centres x of each run: start <= x <= end in its row."""
    first = np.clip(np.ceil(start), left, right + 1).astype(np.intp) - left
    stop = np.maximum(np.clip(np.floor(end), left - 1, right).astype(np.intp) + 1 - left, first)
    counts = np.zeros((n_rows, right - left + 2), dtype=np.int32)  # runs overlap: count them
    np.add.at(counts, (rows, first), 1)
    np.add.at(counts, (rows, stop), -1)
    return np.cumsum(counts[:, :-1], axis=1) > 0


def _scan_split(root: Path, split: str) -> tuple[list[RawCase], list[IngestError]]:
    folders, problems = _layout(root, (IMAGES, LABELS))
    labelled = LABELS in folders or split == "train"
    if labelled and LABELS not in folders:
        problems.append(IngestError(root / LABELS, f"missing folder: the {split} annotation JSONs belong here"))
    if IMAGES not in folders:
        problems.append(IngestError(root / IMAGES, f"missing folder: the {split} images belong here"))
    cases: list[RawCase] = []
    for patient in visible(folders[IMAGES]) if IMAGES in folders else []:
        found, trouble = _scan_patient(patient, root / LABELS, labelled, split)
        cases += found
        problems += trouble
    if LABELS in folders:
        problems += _orphan_patients(folders[LABELS], root / IMAGES)
    return cases, problems


def _layout(folder: Path, expected: tuple[str, ...],
            other_files: bool = False) -> tuple[dict[str, Path], list[IngestError]]:
    """The expected sub-folders of `folder` by name, and a problem for each other entry, but for
    files that are not images where `other_files` allows them. Names are compared as listed, since
    on a case-insensitive disk `folder / "test"` would also open `Test/`."""
    found: dict[str, Path] = {}
    problems: list[IngestError] = []
    for entry in visible(folder):
        if entry.is_dir() and entry.name in expected:
            found[entry.name] = entry
        elif other_files and entry.is_file() and entry.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        else:
            kind = "unknown folder" if entry.is_dir() else "stray file"
            names = ", ".join(f"{name}/" for name in expected)
            problems.append(IngestError(entry, f"{kind}: expected only the folders {names} here"))
    return found, problems


def _scan_patient(patient: Path, labels: Path, labelled: bool, split: str) -> tuple[list[RawCase], list[IngestError]]:
    if not patient.is_dir():
        return [], [IngestError(patient, f"stray entry: expected only patient folders in {IMAGES}/")]
    images, problems = split_by_suffix(patient, {".png"})
    jsons, stray_json = _label_files(labels / patient.name, labelled)
    problems += stray_json
    for stem in sorted(jsons.keys() - images.keys()):
        problems.append(IngestError(jsons[stem], f"annotation without its image in {IMAGES}/"))
    cases: list[RawCase] = []
    for stem, image in sorted(images.items()):
        if labelled and stem not in jsons:
            problems.append(IngestError(image, f"image without its annotation JSON in {LABELS}/"))
        else:
            cases.append(RawCase(stem, patient.name, image, label=jsons.get(stem), meta={"split": split}))
    return cases, problems


def _label_files(folder: Path, labelled: bool) -> tuple[dict[str, Path], list[IngestError]]:
    if not labelled or not folder.is_dir():
        return {}, []
    return split_by_suffix(folder, {".json"})


def _orphan_patients(labels: Path, images: Path) -> list[IngestError]:
    return [
        IngestError(p, f"annotation folder without its patient in {IMAGES}/")
        for p in visible(labels)
        if not (images / p.name).is_dir()
    ]


def _gray(path: Path) -> tuple[np.ndarray, str]:
    """(H, W) uint8, or uint16 for 16-bit PNGs, and the PNG's PIL mode; colour or palette PNGs are
    reduced to luma."""
    img = open_image(path)
    if img.mode.startswith("I;16"):
        return np.asarray(img).astype(np.uint16), img.mode
    if img.mode == "I":  # 16-bit PNGs can open as 32-bit ints
        data = np.asarray(img)
        if data.min() < 0 or data.max() > 65535:
            raise IngestError(path, f"pixel values {data.min()}..{data.max()} do not fit 16 bits")
        return data.astype(np.uint16), img.mode
    return np.asarray(img if img.mode == "L" else img.convert("L")), img.mode


def _annotations(path: Path) -> list[dict[str, Any]]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise IngestError(path, f"corrupt or truncated JSON: {exc}") from exc
    annotations = doc.get("annotations") if isinstance(doc, dict) else None
    if not isinstance(annotations, list) or not all(isinstance(a, dict) for a in annotations):
        raise IngestError(path, "no 'annotations' list of objects")
    if not annotations:  # a labelled image with no bone drawn would train as all background
        raise IngestError(path, "no annotations: the 'annotations' list is empty")
    return annotations


def _polygon(points: Any, what: str, size: tuple[int, int], where: Path) -> np.ndarray:
    if isinstance(points, list) and not points:
        raise IngestError(where, f"{what}: empty polygon (no points)")
    try:
        xy = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        xy = None
    if xy is None or xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
        raise IngestError(where, f"{what}: points are not a list of [x, y] numbers")
    if len(xy) < 3:
        raise IngestError(where, f"{what}: degenerate polygon: {len(xy)} point(s), need at least 3")
    if _collinear(xy):
        raise IngestError(where, f"{what}: degenerate polygon: all {len(xy)} points lie on one line "
                                 f"(within {COLLINEAR_TOLERANCE} px)")
    height, width = size
    limit = np.array([width, height]) - 1 + EDGE_SLACK
    if (xy.min(axis=0) < -EDGE_SLACK).any() or (xy.max(axis=0) > limit).any():
        raise IngestError(where, f"{what}: polygon outside the {width}x{height} image (image/mask size mismatch)")
    return xy


def _collinear(xy: np.ndarray) -> bool:
    """Whether every vertex is within COLLINEAR_TOLERANCE px of the line through the first vertex
    and the one farthest from it (or all vertices coincide)."""
    offsets = xy - xy[0]
    lengths = np.hypot(offsets[:, 0], offsets[:, 1])
    far = np.argmax(lengths)
    if lengths[far] == 0:
        return True
    (dx, dy), length = offsets[far], lengths[far]
    distances = np.abs(dx * offsets[:, 1] - dy * offsets[:, 0]) / length
    return bool(distances.max() < COLLINEAR_TOLERANCE)
