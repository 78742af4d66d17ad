"""Groups and whole arrays written straight to Zarr v3 files on a local disk: byte for byte the
files zarr-python writes for them (tests/test_zarr_files.py compares every file), without zarr's
per-call cost. Reading stays with zarr.

Why: zarr-python spends 1.5 ms of CPU to create a group and 5-9 ms to write an array, in its event
loop and codec pipeline, however small the array: a real Kvasir case (group, image and mask) took
20 ms to write against 3.8 ms to decode its JPEGs, so ingest ran at 0.37 of the decode-only rate.

Scope: what CaseStore writes in one go. An array is one chunk (unsharded) or one shard holding all
of its chunks (every chunk written, padded with the fill value 0 at the edges, as zarr does with
write_empty_chunks), compressed by COMPRESSOR. The metadata documents come from zarr's own
classes (an array's is zarr's for an array of its kind, with its shapes put in), so only the
chunk bytes, the shard layout and its index are encoded here.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import shutil
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

from segpipe.sparse_mask import SparseMask

METADATA = "zarr.json"
# Chunk keys "c.0.0" rather than zarr's default "c/0/0": the key of an array's one file then needs
# no directories of its own (creating one cost as much as writing a file on the machines measured),
# and no array here has so many chunks that a flat folder would hurt.
CHUNK_KEY_ENCODING = {"name": "default", "separator": "."}
# Blosc-LZ4 (zarr v2's default), not zarr v3's zstd: on the Kvasir images zstd took longer to
# compress a case (6.2 ms) than to decode its JPEG (3.8 ms), LZ4 0.8 ms, for 1.3x the bytes.
COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
_SHUFFLES = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
             "bitshuffle": numcodecs.Blosc.BITSHUFFLE}


def write_group(path: Path, attrs: dict[str, Any]) -> None:
    """A group with `attrs` at `path`, replacing whatever was there (zarr's overwrite=True)."""
    _empty_dir(path)
    _write_file(path / METADATA, _json(GroupMetadata(attributes=attrs).to_dict()))


def write_array(path: Path, data: np.ndarray | SparseMask, chunks: tuple[int, ...]) -> None:
    """`data` as an array at `path`, replacing whatever was there, in one file: a single chunk when
    `chunks` is the whole array, else one shard holding every chunk (chunk-aligned, covering it).
    A SparseMask is made dense one chunk at a time."""
    chunks = tuple(chunks)
    shards = None if chunks == data.shape else tuple(-(-s // c) * c for s, c in zip(data.shape, chunks))
    document, blosc = _array_encoding(data.shape, data.dtype.str, chunks, shards)
    body = blosc.encode(_chunk(np.asarray(data))) if shards is None else _encode_shard(data, chunks, shards, blosc)
    _empty_dir(path)
    _write_file(path / METADATA, document)
    _write_file(path / ".".join(["c"] + ["0"] * data.ndim), body)  # the key of the one chunk or shard


@functools.lru_cache(maxsize=256)
def _array_encoding(shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...],
                    shards: tuple[int, ...] | None) -> tuple[bytes, numcodecs.Blosc]:
    """The metadata document and the chunk compressor of an array: zarr's document for an array of
    this kind (data type, rank, sharded or not) with this array's shapes put in. Having zarr build
    the whole document took 0.2-0.3 ms, and Kvasir images come in a new size nearly every case."""
    template, blosc = _array_template(dtype, len(shape), shards is not None)
    document = copy.deepcopy(template)
    document["shape"] = list(shape)
    document["chunk_grid"]["configuration"]["chunk_shape"] = list(shards or chunks)
    if shards is not None:
        document["codecs"][0]["configuration"]["chunk_shape"] = list(chunks)
    return _json(document), blosc


@functools.lru_cache(maxsize=64)
def _array_template(dtype: str, ndim: int, sharded: bool) -> tuple[dict[str, Any], numcodecs.Blosc]:
    """zarr's metadata (as a dict) and compressor for an array of this kind; only the shapes in it
    depend on the array's size."""
    ones = (1,) * ndim
    metadata = _array_metadata(ones, np.dtype(dtype), ones, ones if sharded else None)
    return metadata.to_dict(), _numcodecs_blosc(metadata)


def _array_metadata(shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...],
                    shards: tuple[int, ...] | None) -> ArrayV3Metadata:
    """What zarr.create_array(shape, dtype, chunks, shards, compressors=COMPRESSOR, fill_value=0,
    chunk_key_encoding=CHUNK_KEY_ENCODING) records, built as zarr's init_array builds it."""
    zdtype = parse_dtype(dtype, zarr_format=3)
    filters, serializer, compressors = _parse_chunk_encoding_v3(
        compressors=COMPRESSOR, filters="auto", serializer="auto", dtype=zdtype)
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


def _encode_shard(data: np.ndarray | SparseMask, chunks: tuple[int, ...], shards: tuple[int, ...],
                  blosc: numcodecs.Blosc) -> bytes:
    """The sharding_indexed codec's bytes for one shard: the chunks in Morton order, then the index
    of (offset, length) per chunk as little-endian uint64 and its crc32c (index_location "end")."""
    grid = tuple(s // c for s, c in zip(shards, chunks))
    index = np.empty(grid + (2,), dtype="<u8")
    pieces, offset = [], 0
    for coords in morton_order_iter(grid):
        chunk = data[tuple(slice(i * c, (i + 1) * c) for i, c in zip(coords, chunks))]
        if chunk.shape != chunks:  # an edge chunk, stored at full size with the fill value around it
            padded = np.zeros(chunks, dtype=data.dtype)
            padded[tuple(slice(0, n) for n in chunk.shape)] = chunk
            chunk = padded
        encoded = blosc.encode(_chunk(chunk))
        index[coords] = offset, len(encoded)
        pieces.append(encoded)
        offset += len(encoded)
    index_bytes = index.tobytes()
    return b"".join([*pieces, index_bytes, np.array([google_crc32c.value(index_bytes)], dtype="<u4").tobytes()])


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


def _write_file(path: Path, content: bytes) -> None:
    """Write through a temporary sibling and rename, as zarr does: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(content)
    os.replace(tmp, path)
