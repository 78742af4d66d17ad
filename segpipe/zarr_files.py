"""Groups and whole arrays written straight to Zarr v3 files on a local disk: byte for byte the
files zarr-python writes for them (tests/test_zarr_files.py compares every file), without zarr's
per-call cost; and arrays of the kind segpipe stores read back from their files (StoredArray),
without zarr's cost per chunk.

Why: zarr-python spends 1.5 ms of CPU to create a group and 5-9 ms to write an array, in its event
loop and codec pipeline, however small the array: a real Kvasir case (group, image and mask) took
20 ms to write against 3.8 ms to decode its JPEGs, so ingest ran at 0.37 of the decode-only rate.

Scope: what CaseStore writes in one go. An array is one chunk (unsharded) or one shard holding its
chunks (padded with the fill value 0 at the edges, as zarr pads them), compressed by COMPRESSOR
(or stored UNCOMPRESSED where LZ4 does not pay), or an image file as it came (segpipe.image_file);
a SparseMask's chunks without a 1 are left out (see write_array). The metadata documents come
from zarr's own classes (an array's is zarr's for an array of its kind, with its shapes put in), so only the
chunk bytes, the shard layout and its index are encoded here.
"""
from __future__ import annotations

import copy
import functools
import itertools
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, ShardingCodec
from zarr.core.array import AsyncArray, _parse_chunk_encoding_v3
from zarr.core.dtype import parse_dtype
from zarr.core.group import GroupMetadata
from zarr.core.indexing import morton_order_iter
from zarr.core.metadata import ArrayV3Metadata

from segpipe.errors import StoreError
from segpipe.image_file import NAME as IMAGE_FILE, ImageFile, ImageFileCodec, array_shape, decode as decode_image_file
from segpipe.sparse_mask import SparseMask

METADATA = "zarr.json"
# Chunk keys "c.0.0" rather than zarr's default "c/0/0": the key of an array's one file then needs
# no directories of its own (creating one cost as much as writing a file on the machines measured),
# and no array here has so many chunks that a flat folder would hurt.
CHUNK_KEY_ENCODING = {"name": "default", "separator": "."}
# Blosc-LZ4 (zarr v2's default), not zarr v3's zstd: on the Kvasir images zstd took longer to
# compress a case (6.2 ms) than to decode its JPEG (3.8 ms), LZ4 0.8 ms, for 1.3x the bytes.
COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
# Blosc at level 0 (a header, then the bytes as they are), for arrays LZ4 cannot shrink: X-rays (the
# real RSNA hand came to 99.4% of its size) cost ~1.3 ms a 2048 px image to try compressing, for nothing.
UNCOMPRESSED = BloscCodec(cname="lz4", clevel=0, shuffle="shuffle")
WORTH_COMPRESSING = 0.9  # LZ4 keeps an array whose sample chunk it brings under this share of its size
MISSING = 2**64 - 1  # a shard index's offset and length of a chunk that is not stored
_SHUFFLES = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
             "bitshuffle": numcodecs.Blosc.BITSHUFFLE}


def write_group(path: Path, attrs: dict[str, Any]) -> None:
    """A group with `attrs` at `path`, replacing whatever was there (zarr's overwrite=True)."""
    _empty_dir(path)
    write_group_attrs(path, attrs)


def write_group_attrs(path: Path, attrs: dict[str, Any]) -> None:
    """Replace the attrs of the group at `path` (its members stay)."""
    _write_file(path / METADATA, [_json(GroupMetadata(attributes=attrs).to_dict())])


def write_array(path: Path, data: np.ndarray | SparseMask | ImageFile, chunks: tuple[int, ...]) -> None:
    """`data` as an array at `path`, replacing whatever was there, in one file: a single chunk when
    `chunks` is the whole array, else one shard holding its chunks (chunk-aligned, covering it).
    An ImageFile is one chunk, its file's bytes as they are (segpipe.image_file's codec).

    A dense array has every chunk stored (zarr's write_empty_chunks=True: finding the empty ones
    would mean scanning every value). A SparseMask is made dense one chunk at a time, and its
    chunks without a 1, which it knows from its patches, are left out (write_empty_chunks=False,
    zarr's default: readers see the fill value 0 there); with none left there is no chunk file.
    A dense array of several chunks is compressed with COMPRESSOR unless its middle chunk shows
    that LZ4 does not pay (see WORTH_COMPRESSING); then it is stored UNCOMPRESSED.
    """
    chunks = tuple(chunks)
    if isinstance(data, ImageFile):
        if chunks != data.shape:
            raise ValueError(f"{path}: an image file is one chunk of its whole {data.shape}, not {chunks}")
        _empty_dir(path)
        _write_file(path / METADATA, [_image_file_document(data.shape, data.mode)])
        _write_file(path / _chunk_key((0,) * len(chunks)), [data.content])
        return
    shards = None if chunks == data.shape else tuple(-(-s // c) * c for s, c in zip(data.shape, chunks))
    grid = tuple(s // c for s, c in zip(shards or chunks, chunks))
    stored = data.chunks_with_ones(chunks) if isinstance(data, SparseMask) else set(np.ndindex(grid))
    document, blosc = _array_encoding(data.shape, data.dtype.str, chunks, shards, compressed=True)
    cut, encoded = _ChunkCutter(data, chunks), {}
    if shards is not None and not isinstance(data, SparseMask):
        middle = tuple(n // 2 for n in grid)
        encoded[middle] = blosc.encode(cut(middle))
        if len(encoded[middle]) >= WORTH_COMPRESSING * cut.buffer.nbytes:
            document, blosc = _array_encoding(data.shape, data.dtype.str, chunks, shards, compressed=False)
            encoded.clear()
    _empty_dir(path)
    _write_file(path / METADATA, [document])
    if stored:
        pieces = [blosc.encode(_chunk(np.asarray(data)))] if shards is None else \
            _encode_shard(grid, stored, lambda coords: encoded.get(coords) or blosc.encode(cut(coords)))
        _write_file(path / _chunk_key((0,) * data.ndim), pieces)  # the key of the one chunk or shard


@functools.lru_cache(maxsize=256)
def _array_encoding(shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...], shards: tuple[int, ...] | None,
                    compressed: bool) -> tuple[bytes, numcodecs.Blosc]:
    """The metadata document and the chunk compressor of an array: zarr's document for an array of
    this kind (data type, rank, sharded or not, COMPRESSOR or UNCOMPRESSED) with this array's shapes put in. Having
    zarr build the whole document took 0.2-0.3 ms, and Kvasir images come in a new size nearly every case."""
    template, blosc = _array_template(dtype, len(shape), shards is not None, compressed)
    return _with_shapes(template, shape, shards or chunks, chunks if shards is not None else None), blosc


def _image_file_document(shape: tuple[int, ...], mode: str) -> bytes:
    """The metadata document of an ImageFile's array: zarr's for one chunk with its codec."""
    return _with_shapes(_image_file_template(mode), shape, shape, None)


@functools.lru_cache(maxsize=16)
def _image_file_template(mode: str) -> dict[str, Any]:
    shape = array_shape(1, 1, mode)
    zdtype = parse_dtype(np.dtype(np.uint8), zarr_format=3)
    return AsyncArray._create_metadata_v3(shape=shape, dtype=zdtype, chunk_shape=shape, fill_value=0,
                                          codecs=(ImageFileCodec(mode=mode),),
                                          chunk_key_encoding=CHUNK_KEY_ENCODING).to_dict()


def _with_shapes(template: dict[str, Any], shape: tuple[int, ...], file_shape: tuple[int, ...],
                 inner_chunks: tuple[int, ...] | None) -> bytes:
    """A metadata `template` (zarr's, for an array of the same kind) encoded with this array's
    shape, chunk (or shard) shape, and where sharded, the shard's chunk shape."""
    document = copy.deepcopy(template)
    document["shape"] = list(shape)
    document["chunk_grid"]["configuration"]["chunk_shape"] = list(file_shape)
    if inner_chunks is not None:
        document["codecs"][0]["configuration"]["chunk_shape"] = list(inner_chunks)
    return _json(document)


@functools.lru_cache(maxsize=64)
def _array_template(dtype: str, ndim: int, sharded: bool, compressed: bool) -> tuple[dict[str, Any], numcodecs.Blosc]:
    """zarr's metadata (as a dict) and compressor for an array of this kind; only the shapes in it
    depend on the array's size."""
    ones = (1,) * ndim
    metadata = _array_metadata(ones, np.dtype(dtype), ones, ones if sharded else None,
                               COMPRESSOR if compressed else UNCOMPRESSED)
    return metadata.to_dict(), _numcodecs_blosc(metadata)


def _array_metadata(shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...],
                    shards: tuple[int, ...] | None, compressor: BloscCodec) -> ArrayV3Metadata:
    """What zarr.create_array(shape, dtype, chunks, shards, compressors=compressor, fill_value=0,
    chunk_key_encoding=CHUNK_KEY_ENCODING) records, built as zarr's init_array builds it."""
    zdtype = parse_dtype(dtype, zarr_format=3)
    filters, serializer, compressors = _parse_chunk_encoding_v3(
        compressors=compressor, filters="auto", serializer="auto", dtype=zdtype)
    codecs = (*filters, serializer, *compressors)
    if shards is not None:
        codecs = (ShardingCodec(chunk_shape=chunks, codecs=codecs),)
    return AsyncArray._create_metadata_v3(shape=shape, dtype=zdtype, chunk_shape=shards or chunks,
                                          fill_value=0, codecs=codecs, chunk_key_encoding=CHUNK_KEY_ENCODING)


def _numcodecs_blosc(metadata: ArrayV3Metadata) -> numcodecs.Blosc:
    """The numcodecs compressor zarr itself encodes chunks with, configured from the codec in
    `metadata` (zarr has filled in its typesize from the data type)."""
    codecs = metadata.codecs[0].codecs if isinstance(metadata.codecs[0], ShardingCodec) else metadata.codecs
    if len(codecs) != 2 or not isinstance(codecs[1], BloscCodec):  # bytes, then blosc: all that is encoded here
        raise ValueError(f"unsupported codecs {codecs}")
    blosc = codecs[1]
    return numcodecs.Blosc(cname=blosc.cname.value, clevel=blosc.clevel, shuffle=_SHUFFLES[blosc.shuffle.value],
                           blocksize=blosc.blocksize, typesize=blosc.typesize)


def _encode_shard(grid: tuple[int, ...], stored: set[tuple[int, ...]],
                  encode: Callable[[tuple[int, ...]], bytes]) -> list[bytes]:
    """The sharding_indexed codec's bytes for one shard of `grid` chunks, in pieces: the `stored`
    chunks (`encode(coords)`) in Morton order, then the index of (offset, length) per chunk as
    little-endian uint64 (both MISSING for a chunk left out) and its crc32c (index_location "end")."""
    index = np.full(grid + (2,), MISSING, dtype="<u8")
    pieces, offset = [], 0
    for coords in morton_order_iter(grid):
        if coords in stored:
            encoded = encode(coords)
            index[coords] = offset, len(encoded)
            pieces.append(encoded)
            offset += len(encoded)
    index_bytes = index.tobytes()
    return [*pieces, index_bytes, _crc32c(index_bytes)]


class _ChunkCutter:
    """Cuts an array's chunks into one reused buffer, padded with the fill value 0 at the edges as
    zarr pads them, in the bytes codec's layout (C order, little-endian): a new array per chunk
    cost a hand mask's 57 chunks ~0.7 ms more (fresh memory each time, colder caches)."""

    def __init__(self, data: np.ndarray | SparseMask, chunks: tuple[int, ...]):
        self.data, self.chunks = data, chunks
        self.buffer = np.empty(chunks, dtype=data.dtype.newbyteorder("<"))

    def __call__(self, coords: tuple[int, ...]) -> np.ndarray:
        region = _chunk_region(coords, self.chunks)
        if isinstance(self.data, SparseMask):
            self.data.read_into(self.buffer, region)
            return self.buffer
        part = self.data[region]
        if part.shape != self.chunks:  # an edge chunk
            self.buffer.fill(0)
        self.buffer[tuple(slice(0, n) for n in part.shape)] = part
        return self.buffer


class StoredArray:
    """An array as write_array and zarr (with this module's COMPRESSOR or UNCOMPRESSED, and
    CHUNK_KEY_ENCODING) store it, read by decoding its files here: Blosc chunks, in shards (index
    at the end) or not, or one image file; fill value 0. Read only.

    Why: zarr spends 0.1-0.4 ms of CPU on every chunk a read visits, stored or not. A demo hand's
    2048 px mask in 464 one-class chunks, 57 of them stored, took zarr 174-209 ms to read whole
    (108-142 ms in 16 all-class chunks) and 41-52 ms a 512-row band (20-30 ms); here 26-30 ms and
    7-8 ms. Its 2048 px image: 11-13 ms whole through zarr, 4 ms here.

    `array[key]` is numpy's basic indexing restricted to integers and step-1 slices, one per leading
    axis (or `...` for everything): a new array (a numpy scalar where integers pick one value).
    `np.asarray(array)` is the whole array. Every read reads the files again.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            document = json.loads((self.path / METADATA).read_bytes())
            self.shape = tuple(document["shape"])
            self.dtype = np.dtype(document["data_type"])
            self._file_shape = tuple(document["chunk_grid"]["configuration"]["chunk_shape"])
            codecs = document["codecs"]
            self._sharded = codecs[0]["name"] == "sharding_indexed"
            inner = codecs[0]["configuration"] if self._sharded else {"codecs": codecs, "chunk_shape": self._file_shape}
            self._chunks = tuple(inner["chunk_shape"])
            image_file = [c["name"] for c in codecs] == [IMAGE_FILE]
            self._image_mode = codecs[0]["configuration"]["mode"] if image_file else None
            blosc_chunks = ([c["name"] for c in inner["codecs"]] == ["bytes", "blosc"]
                            and inner["codecs"][0].get("configuration", {}).get("endian", "little") == "little"
                            and (not self._sharded or (len(codecs) == 1 and inner["index_location"] == "end"
                                                       and [c["name"] for c in inner["index_codecs"]] == ["bytes", "crc32c"])))
            supported = ((blosc_chunks or (image_file and self._file_shape == self.shape))
                         and document["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "."}}
                         and document["fill_value"] == 0)
        except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
            raise StoreError(f"{self.path}: not an array's metadata that segpipe can read ({exc!r})") from exc
        if not supported:
            raise StoreError(f"{self.path}: an array encoded as {codecs} with chunk keys "
                             f"{document['chunk_key_encoding']}, which segpipe does not write")
        self.ndim = len(self.shape)
        self._chunk_bytes = math.prod(self._chunks) * self.dtype.itemsize
        self._shard_grid = tuple(f // c for f, c in zip(self._file_shape, self._chunks))
        self._index_size = 16 * math.prod(self._shard_grid) + 4  # (offset, length) per chunk, and a crc32c

    def __getitem__(self, key: Any) -> np.ndarray:
        box, dropped = self._box(key)
        out = np.zeros([stop - start for start, stop in box], dtype=self.dtype)
        if out.size:  # else nothing to read: an empty slice can still start inside a chunk
            self._read_into(box, out)
        return out[tuple(0 if axis in dropped else slice(None) for axis in range(self.ndim))] if dropped else out

    def _read_into(self, box: list[tuple[int, int]], out: np.ndarray) -> None:
        """Fill `out` with the region `box` from every file it overlaps (a file not stored is all 0)."""
        for coords in itertools.product(*_covering(box, self._file_shape)):
            path = self.path / _chunk_key(coords)
            try:
                file = open(path, "rb")
            except FileNotFoundError:  # not stored: all fill value
                continue
            except IsADirectoryError:
                raise StoreError(f"{path}: a folder where a chunk or shard file belongs") from None
            origin = tuple(i * n for i, n in zip(coords, self._file_shape))
            with file:
                if self._sharded:
                    self._read_shard(path, file.fileno(), origin, box, out)
                else:
                    _place(self._decode(path, file.read()), origin, box, out)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        whole = self[...]
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def _box(self, key: Any) -> tuple[list[tuple[int, int]], set[int]]:
        """(start, stop) per axis of the region `key` selects, and the axes an integer dropped."""
        key = () if key is Ellipsis else key if isinstance(key, tuple) else (key,)
        if len(key) > self.ndim:
            raise IndexError(f"{self.path}: {len(key)} indices for an array of {self.ndim} dimensions")
        box, dropped = [], set()
        for axis, (k, n) in enumerate(itertools.zip_longest(key, self.shape, fillvalue=slice(None))):
            if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
                i = int(k) + n * (k < 0)
                if not 0 <= i < n:
                    raise IndexError(f"{self.path}: index {k} is out of bounds for axis {axis} with size {n}")
                box.append((i, i + 1))
                dropped.add(axis)
            elif isinstance(k, slice) and k.step in (None, 1):
                start, stop, _ = k.indices(n)
                box.append((start, max(start, stop)))
            else:
                raise IndexError(f"{self.path}: only integers and step-1 slices are read here, not {k!r}")
        return box, dropped

    def _read_shard(self, path: Path, fd: int, origin: tuple[int, ...], box: list[tuple[int, int]],
                    out: np.ndarray) -> None:
        """Decode into `out` the chunks of the shard file `fd` (whose first element is at `origin`)
        that `box` overlaps, reading its index and those chunks only."""
        end = os.fstat(fd).st_size - self._index_size  # where the chunks end and the index starts
        if end < 0:
            raise StoreError(f"{path}: truncated shard ({end + self._index_size} bytes; its index alone "
                             f"takes {self._index_size})")
        tail = os.pread(fd, self._index_size, end)
        if _crc32c(tail[:-4]) != tail[-4:]:
            raise StoreError(f"{path}: corrupt shard (its index does not match its checksum)")
        index = np.frombuffer(tail[:-4], dtype="<u8").reshape(self._shard_grid + (2,))
        local = [(max(start - o, 0), max(min(stop - o, f), 0)) for (start, stop), o, f
                 in zip(box, origin, self._file_shape)]
        for coords in itertools.product(*_covering(local, self._chunks)):
            offset, length = (int(v) for v in index[coords])
            if offset == MISSING:
                continue
            if offset + length > end:
                raise StoreError(f"{path}: truncated shard (chunk {coords} lies past its end)")
            chunk_origin = tuple(o + i * c for o, i, c in zip(origin, coords, self._chunks))
            _place(self._decode(path, os.pread(fd, length, offset)), chunk_origin, box, out)

    def _decode(self, path: Path, encoded: bytes) -> np.ndarray:
        if self._image_mode is not None:
            try:
                return decode_image_file(encoded, self._image_mode, self._chunks)
            except StoreError as exc:
                raise StoreError(f"{path}: {exc}") from None
        # Blosc is not told how many bytes it was given: a cut chunk would be read past its end, so
        # its header's sizes (uncompressed at 4:8, compressed at 12:16) are checked first.
        if (len(encoded) < 16 or int.from_bytes(encoded[12:16], "little") != len(encoded)
                or int.from_bytes(encoded[4:8], "little") != self._chunk_bytes):
            raise StoreError(f"{path}: corrupt chunk (its Blosc header does not match its {len(encoded)} bytes "
                             f"or a chunk of {self._chunks} {self.dtype})")
        try:
            raw = _BLOSC.decode(encoded)
        except (RuntimeError, ValueError) as exc:
            raise StoreError(f"{path}: corrupt chunk ({exc})") from exc
        return np.frombuffer(raw, dtype=self.dtype.newbyteorder("<")).reshape(self._chunks)


_BLOSC = numcodecs.Blosc()  # decoding needs no settings: a Blosc frame describes itself


def _covering(box: list[tuple[int, int]], tiles: tuple[int, ...]) -> list[range]:
    """Per axis, the indices of the tiles (of side `tiles`, from 0) that the region `box` overlaps."""
    return [range(start // t, -(-stop // t)) for (start, stop), t in zip(box, tiles)]


def _place(chunk: np.ndarray, origin: tuple[int, ...], box: list[tuple[int, int]], out: np.ndarray) -> None:
    """Copy the part of `chunk` (whose first element is at `origin`) inside `box` into `out` (`box`'s region)."""
    src = tuple(slice(max(start, o) - o, min(stop, o + n) - o) for (start, stop), o, n in zip(box, origin, chunk.shape))
    dst = tuple(slice(max(start, o) - start, min(stop, o + n) - start)
                for (start, stop), o, n in zip(box, origin, chunk.shape))
    out[dst] = chunk[src]


def _chunk_key(coords: tuple[int, ...]) -> str:
    """The file name of the chunk (or shard) at grid position `coords`, under CHUNK_KEY_ENCODING."""
    return ".".join(["c", *map(str, coords)])


def _chunk_region(coords: tuple[int, ...], chunks: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(i * c, (i + 1) * c) for i, c in zip(coords, chunks))


def _crc32c(content: bytes) -> bytes:
    return np.array([google_crc32c.value(content)], dtype="<u4").tobytes()


def _chunk(array: np.ndarray) -> np.ndarray:
    """A chunk's bytes as the bytes codec lays them out: C order, little-endian."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))


def _json(document: dict[str, Any]) -> bytes:
    """A metadata document (a group's or an array's to_dict()) encoded as zarr's to_buffer_dict
    encodes it."""
    return json.dumps(document, allow_nan=True, indent=zarr.config.get("json_indent")).encode()


def _empty_dir(path: Path) -> None:
    try:
        path.mkdir()
    except FileExistsError:
        shutil.rmtree(path)
        path.mkdir()


def _write_file(path: Path, pieces: list[bytes]) -> None:
    """Write `pieces` one after another (not joined first: that copied a hand X-ray's 4 MB once
    more). Straight to `path`, not through a temporary sibling and a rename as zarr writes: every
    segpipe store is built in a temporary folder renamed only when complete (segpipe.atomic), so
    no reader sees a file while it is written."""
    with open(path, "wb") as file:
        file.writelines(pieces)
