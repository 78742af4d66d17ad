"""An image kept as the file it came in (a Kvasir JPEG): stored as the file's bytes in a plain uint8
Zarr array whose attrs say so (ATTR), decoded with PIL by whoever reads it.

Why: a Kvasir image is a ~40 kB JPEG of ~1 MB of pixels. Storing the pixels made a store of 247 MB
for the 300 real pairs, and ingest spent more time compressing them again than decoding them; the
file as it is makes 11.5 MB, and ingest only proves it decodes (at 1/8 scale, see EncodedImage.read).
Any Zarr reader opens the array: `bytes(array[:])` is the original file, the attrs name its mode
and the shape it decodes to. segpipe's readers decode it (CaseStore.image).

The pixels are what the reading process's PIL decodes; Pillow is pinned in pyproject.toml (its
wheels bring their own libjpeg-turbo), so every stage and machine decodes the same.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageMode, UnidentifiedImageError

from segpipe.errors import IngestError

ATTR = "encoded_image"  # array attrs: {"format": "JPEG", "mode": "RGB", "shape": [H, W, 3]}
# What PIL raises for a file it cannot open or decode (a truncated JPEG: OSError "image file is truncated").
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def decode_error(content: bytes, exc: Exception) -> str:
    """Why PIL could not decode `content`, in words that do not change between runs (PIL's own
    message for an unidentified file names a BytesIO object by its memory address)."""
    if not content:
        return "empty file"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image PIL can read"
    return f"corrupt or truncated image: {exc}"


@dataclass(frozen=True)
class EncodedImage:
    """An image file's bytes, proven to decode, and the array they decode to in `mode`."""

    content: bytes
    shape: tuple[int, ...]  # (H, W) for a one-band mode, else (H, W, bands)
    mode: str  # PIL's mode of the decoded array (the file's pixels converted to it)
    format: str  # PIL's name of the file format, e.g. "JPEG"
    file_mode: str  # PIL's mode of the file's own pixels

    @property
    def eight_bit(self) -> bool:
        """Whether the file holds 8 bits a band, so that decoding it to `mode` loses nothing (a
        16-bit PNG would be clipped: see segpipe.datasets.to_8bit)."""
        return np.dtype(ImageMode.getmode(self.file_mode).typestr).itemsize == 1

    @classmethod
    def read(cls, path: Path, mode: str) -> EncodedImage:
        """The file at `path`, checked to decode; IngestError naming it where it does not. A JPEG
        is decoded at its smallest scale (1/8), which still entropy-decodes every coefficient, so a
        cut or corrupt file fails here as a full decode would, for a third of its time."""
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise IngestError(path, f"unreadable: {exc.strerror or exc}") from exc
        try:
            with Image.open(io.BytesIO(content)) as image:
                width, height, file_format, file_mode = *image.size, image.format, image.mode
                image.draft(image.mode, (1, 1))  # JPEG only; other formats decode whole
                image.load()
        except DECODE_ERRORS as exc:
            raise IngestError(path, decode_error(content, exc)) from exc
        bands = Image.getmodebands(mode)
        return cls(content, (height, width) if bands == 1 else (height, width, bands), mode, file_format, file_mode)

    def attrs(self) -> dict[str, Any]:
        """What the stored array's attrs record under ATTR."""
        return {"format": self.format, "mode": self.mode, "shape": list(self.shape)}

    def pixels(self) -> np.ndarray:
        """The decoded image, as a reader of the stored array gets it."""
        return decode(self.content, self.attrs())


def decode(content: bytes, attrs: dict[str, Any]) -> np.ndarray:
    """The pixels of a stored image file, as its attrs (EncodedImage.attrs) describe them;
    ValueError saying why where they do not decode to that."""
    try:
        with Image.open(io.BytesIO(content)) as image:
            image.load()
            # np.array, not asarray: PIL's buffer is read-only, and torch warns of every read-only array it takes.
            pixels = np.array(image if image.mode == attrs["mode"] else image.convert(attrs["mode"]))
    except DECODE_ERRORS as exc:
        raise ValueError(decode_error(content, exc)) from exc
    if pixels.shape != tuple(attrs["shape"]) or pixels.dtype != np.uint8:
        raise ValueError(f"decodes to {pixels.shape} {pixels.dtype}, not the recorded {tuple(attrs['shape'])} uint8")
    return pixels
