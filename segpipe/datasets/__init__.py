"""Readers of the raw dataset layouts: one module per layout, chosen by name through `READERS`.

A reader module offers:
    CLASSES                      the class names, in mask-channel order
    scan(raw) -> Scan            the cases found, plus structural problems (kept, not raised)
    list_cases(raw)              the cases, sorted by id; raises the first structural problem
    load_case(case) -> CaseData  reads one case as ingest stores it; raises IngestError naming the bad file
    decode_case(case) -> CaseData  the same case with every file decoded to pixels (what a script
                                   reading the dataset does: the ingest benchmark's baseline)

Structural problems (an image without its mask, a stray file) are collected by `scan` rather
than raised, so that ingest with `on_error: skip` can list them and still ingest the rest.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

from segpipe.errors import ConfigError, IngestError
from segpipe.image_file import DECODE_ERRORS, ImageFile
from segpipe.sparse_mask import SparseMask


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

    image: np.ndarray | ImageFile  # an image kept as its file (Kvasir: segpipe.image_file)
    mask: np.ndarray | SparseMask | None
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
    """Entries of a folder, sorted, minus dotfiles (.DS_Store and the like carry no data)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


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
        img = Image.open(path)
        img.load()
    except DECODE_ERRORS as exc:
        raise IngestError(path, f"corrupt or truncated image: {exc}") from exc
    return img


def sha256(path: Path) -> str:
    with open(path, "rb") as f:  # file_digest reads into one reused buffer
        return hashlib.file_digest(f, "sha256").hexdigest()


from segpipe.datasets import hand_xray, kvasir, usc_timit  # noqa: E402  (they import the helpers above)

READERS: dict[str, ModuleType] = {"kvasir": kvasir, "usc_timit": usc_timit, "hand_xray": hand_xray}
