"""An image stored as the file it came in (a Kvasir JPEG): its bytes are the array's one chunk, and
the zarr codec `segpipe.image_file` decodes them with PIL when the array is read.

Why: a Kvasir image is a ~40 kB JPEG of ~1 MB of pixels. Decoding it at ingest only to compress the
pixels again with LZ4 added ~2 ms of user and 1-2 ms of kernel time a case (chunks, LZ4, ~0.8 MB of
new files) to the 3.3 ms that decoding the pair takes; the file as it is costs a copy of 40 kB. The stored array is
exactly what decoding the source gives (PIL's decoder, then `mode`), and its bytes are the source's,
so its sha256 is the one ingest records. Readers pay the JPEG decode instead of LZ4's (~2 ms
against ~0.3 ms a Kvasir image), once per stage: training caches small images resized.
Ingest still proves the file decodes (ImageFile.read): a JPEG is decoded at 1/8 scale, which
entropy-decodes every coefficient, so a truncated or corrupt file fails as a full decode would, for
a third of its time.

The pixels are what the reading process's PIL decodes; Pillow is pinned in pyproject.toml (its
wheels bring their own libjpeg-turbo), so every stage and machine decodes the same.
The codec only decodes (segpipe.zarr_files writes the file as it is): zarr refuses a write to such
an array, except one of all zeros, which zarr stores by deleting the chunk without calling a codec;
segpipe opens the stores it reads read-only. zarr finds the codec through the `zarr.codecs` entry
point in pyproject.toml wherever segpipe is installed, and through the registration below once
segpipe is imported. CaseStore.reader (zarr_files.StoredArray) names the file of a chunk that does
not decode; through zarr the error cannot say which (a codec is not told).
"""
from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
from PIL import Image, ImageMode
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.core.chunk_grids import ChunkGrid, RegularChunkGrid
from zarr.core.common import JSON, parse_named_configuration
from zarr.core.dtype import ZDType
from zarr.registry import register_codec

from segpipe.errors import IngestError, StoreError

NAME = "segpipe.image_file"
# What PIL raises for a file it cannot open or decode (a truncated JPEG: OSError "image file is truncated").
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImageFile:
    """An image file's bytes, proven to decode, and the array they decode to in `mode`."""

    content: bytes
    shape: tuple[int, ...]  # (H, W) for a one-band mode, else (H, W, bands)
    mode: str  # PIL's mode the array holds, the file's pixels converted to it (e.g. "RGB")
    dtype = np.dtype(np.uint8)

    @classmethod
    def read(cls, path: Path, mode: str) -> ImageFile:
        """The file at `path`, checked to decode; IngestError naming it where it does not."""
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise IngestError(path, f"unreadable: {exc.strerror or exc}") from exc
        try:
            with Image.open(io.BytesIO(content)) as image:
                width, height = image.size
                image.draft(image.mode, (1, 1))  # JPEG: the smallest scale (1/8); other formats: no-op
                image.load()
        except DECODE_ERRORS as exc:
            raise IngestError(path, f"corrupt or truncated image: {exc}") from exc
        return cls(content, array_shape(height, width, mode), mode)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        pixels = decode(self.content, self.mode, self.shape)
        return pixels if dtype is None else pixels.astype(dtype, copy=False)


def array_shape(height: int, width: int, mode: str) -> tuple[int, ...]:
    bands = Image.getmodebands(mode)
    return (height, width) if bands == 1 else (height, width, bands)


def decode(content: bytes, mode: str, shape: tuple[int, ...]) -> np.ndarray:
    """The pixels of an image file in `mode`, which must come out as `shape`; StoreError otherwise."""
    try:
        with Image.open(io.BytesIO(content)) as image:
            image.load()
            pixels = np.asarray(image if image.mode == mode else image.convert(mode))
    except DECODE_ERRORS as exc:
        raise StoreError(f"an image-file chunk that does not decode: {exc}") from exc
    if pixels.shape != tuple(shape) or pixels.dtype != np.uint8:
        raise StoreError(f"an image-file chunk that decodes to {pixels.shape} {pixels.dtype} in mode {mode}, "
                         f"not the array's {tuple(shape)} uint8")
    return pixels


@dataclass(frozen=True)
class ImageFileCodec(ArrayBytesCodec):
    """zarr's codec for a chunk that is an image file: the whole array, uint8, in `mode`."""

    is_fixed_size = False
    mode: str

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> Self:
        _, configuration = parse_named_configuration(data, NAME)
        return cls(mode=str(configuration["mode"]))

    def to_dict(self) -> dict[str, JSON]:
        return {"name": NAME, "configuration": {"mode": self.mode}}

    def validate(self, *, shape: tuple[int, ...], dtype: ZDType[Any, Any], chunk_grid: ChunkGrid) -> None:
        if dtype.to_native_dtype() != np.uint8:
            raise ValueError(f"{NAME} holds uint8 pixels, not {dtype}")
        if not isinstance(chunk_grid, RegularChunkGrid) or tuple(chunk_grid.chunk_shape) != tuple(shape):
            raise ValueError(f"{NAME}: an image file is the whole array, one chunk")
        if np.dtype(ImageMode.getmode(self.mode).typestr) != np.uint8:
            raise ValueError(f"{NAME}: mode {self.mode} does not decode to uint8")
        if len(shape) < 2 or tuple(shape[2:]) != array_shape(1, 1, self.mode)[2:]:
            raise ValueError(f"{NAME}: shape {shape} does not hold an image in mode {self.mode}")

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        # In a thread, as zarr runs its compressors: PIL releases the GIL while it decodes.
        pixels = await asyncio.to_thread(decode, chunk_bytes.to_bytes(), self.mode, chunk_spec.shape)
        return chunk_spec.prototype.nd_buffer.from_numpy_array(pixels)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        raise StoreError(f"{NAME}: an array stored as its source image file cannot be written through zarr; "
                         "write a new array instead")

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError  # variable: the file's size


register_codec(NAME, ImageFileCodec)
