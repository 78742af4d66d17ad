"""Readers of the raw dataset layouts: one module per layout, chosen by name through `READERS`.

A reader module offers:
    CLASSES                      the class names, in mask-channel order
    scan(raw) -> Scan            the cases found, plus structural problems (kept, not raised)
    list_cases(raw)              the cases, sorted by id; raises the first structural problem
    single_case(path) -> RawCase one image or video file on its own, unlabelled (what predict reads)
    load_case(case) -> CaseData  reads one case as ingest stores it; raises IngestError naming the bad file
    decode_case(case) -> CaseData  the same case with every file decoded to pixels (what a script
                                   reading the dataset does: the ingest benchmark's baseline)

Structural problems (an image without its mask, a stray file) are collected by `scan` rather
than raised, so that ingest with `on_error: skip` can list them and still ingest the rest.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

from segpipe.encoded_image import DECODE_ERRORS, EncodedImage, decode_error
from segpipe.errors import ConfigError, IngestError


@dataclass(frozen=True)
class RawCase:
    """One case as found on disk, before decoding."""

    case_id: str
    group: str  # what must not be split across folds: patient, speaker, or the case itself
    source: Path  # the image or video
    label: Path | None = None  # its mask or annotation file, when labelled
    meta: dict[str, Any] = field(default_factory=dict, compare=False)  # reader-specific, JSON-ready
    # Other files the case is decoded from, by name (a video's reconstruction: {"recon": path}).
    extras: dict[str, Path] = field(default_factory=dict, compare=False)

    def files(self) -> list[Path]:
        """Every file the case is read from: source, label, then extras by name (the order of its hashes)."""
        labels = [] if self.label is None else [self.label]
        return [self.source, *labels, *(self.extras[name] for name in sorted(self.extras))]


@dataclass
class CaseData:
    """One decoded case: what ingest writes to the store."""

    image: np.ndarray | EncodedImage  # an image kept as its file (Kvasir: segpipe.encoded_image)
    mask: np.ndarray | None
    attrs: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Scan:
    cases: list[RawCase]
    problems: list[IngestError]

    def strict(self) -> list[RawCase]:
        if self.problems:
            raise self.problems[0]
        return self.cases


def reader(name: str) -> ModuleType:
    if name not in READERS:
        raise ConfigError(f"dataset {name!r}: no reader; known: {sorted(READERS)}")
    return READERS[name]


# --- helpers shared by the readers -------------------------------------------------------------


def require_dir(path: Path) -> Path:
    if not path.is_dir():
        raise IngestError(path, "missing directory (wrong raw path or layout?)")
    return path


def visible(folder: Path) -> list[Path]:
    """Entries of a folder, sorted, minus dotfiles (.DS_Store and the like carry no data). A folder
    that cannot be listed (no read permission) is an IngestError naming it: what it holds is unknown,
    so it cannot be skipped as one bad case."""
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise IngestError(folder, f"cannot list: {exc.strerror or exc}") from exc


def split_by_suffix(folder: Path, suffixes: set[str]) -> tuple[dict[str, Path], list[IngestError]]:
    """Files of `folder` with an accepted suffix keyed by stem; anything else is a problem."""
    found: dict[str, Path] = {}
    problems: list[IngestError] = []
    for path in visible(folder):
        if path.is_file() and path.suffix.lower() in suffixes:
            if path.stem in found:
                problems.append(IngestError(path, f"duplicate of {found[path.stem].name} (same stem)"))
            else:
                found[path.stem] = path
        else:
            problems.append(IngestError(path, f"stray entry: expected only {sorted(suffixes)} files here"))
    return found, problems


def open_image(path: Path) -> Image.Image:
    """Open and fully decode an image, so a corrupt or truncated file fails here, by name."""
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise IngestError(path, f"unreadable: {exc.strerror or exc}") from exc
    try:
        img = Image.open(io.BytesIO(content))
        img.load()
    except DECODE_ERRORS as exc:
        raise IngestError(path, decode_error(content, exc)) from exc
    return img


def to_8bit(img: Image.Image, mode: str, path: Path) -> np.ndarray:
    """The pixels of `img` (read from `path`) in the 8-bit `mode` ("L" or "RGB"). A 16-bit image
    (PIL's "I;16*", or "I" holding 16-bit values) is scaled exactly, v * 255 / 65535 rounded, where
    PIL's convert would clip every value above 255 to white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img).astype(np.int64)
        if wide.min() < 0 or wide.max() > 65535:
            raise IngestError(path, f"pixel values {wide.min()}..{wide.max()} do not fit 16 bits")
        img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    return np.asarray(img if img.mode == mode else img.convert(mode))


def sha256(path: Path) -> str:
    with open(path, "rb") as f:  # file_digest reads into one reused buffer
        return hashlib.file_digest(f, "sha256").hexdigest()


from segpipe.datasets import hand_xray, kvasir, usc_timit  # noqa: E402  (they import the helpers above)

READERS: dict[str, ModuleType] = {"kvasir": kvasir, "usc_timit": usc_timit, "hand_xray": hand_xray}
