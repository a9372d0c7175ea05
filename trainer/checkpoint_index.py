"""Where each tensor of a checkpoint lies, read from its `.index` file alone.

A checkpoint's `.index` is a LevelDB-format table (TensorFlow's tensor bundle, uncompressed): key "" holds
the header (the number of data shards), every other key a `BundleEntryProto` with the tensor's shard,
offset and size in its `.data-NNNNN-of-MMMMM` file. Comparing those extents with the data files' sizes
finds a truncated checkpoint without reading its tensors (on a large checkpoint, gigabytes).
"""
from __future__ import annotations

import os
import struct
from typing import Dict, Iterator, Tuple

_MAGIC = 0xDB4775248B80FB57  # LevelDB's table magic number, the footer's last 8 bytes
_FOOTER = 48


def _varint(data: bytes, pos: int) -> Tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _block(table: bytes, handle: bytes) -> Iterator[Tuple[bytes, bytes]]:
    """The (key, value) entries of the block a BlockHandle (offset, size varints) points at."""
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    data = table[offset:offset + size]
    if len(data) != size or size < 4:
        raise ValueError("a block lies past the end of the .index file")
    restarts = struct.unpack("<I", data[-4:])[0]
    end, pos, key = size - 4 - 4 * restarts, 0, b""
    while pos < end:
        shared, pos = _varint(data, pos)
        unshared, pos = _varint(data, pos)
        length, pos = _varint(data, pos)
        key = key[:shared] + data[pos:pos + unshared]
        pos += unshared
        yield key, data[pos:pos + length]
        pos += length


def _fields(message: bytes) -> Dict[int, int]:
    """The varint fields of a protobuf message (the others skipped): enough for shard, offset, size."""
    out, pos = {}, 0
    while pos < len(message):
        tag, pos = _varint(message, pos)
        kind = tag & 7
        if kind == 0:
            out[tag >> 3], pos = _varint(message, pos)
        elif kind == 1:
            pos += 8
        elif kind == 2:
            length, pos = _varint(message, pos)
            pos += length
        elif kind == 5:
            pos += 4
        else:
            raise ValueError(f"unexpected protobuf wire type {kind}")
    return out


def data_extents(prefix: str) -> Dict[str, int]:
    """{data file: the bytes its tensors need} per the checkpoint's index. Raises OSError (no .index) or
    ValueError (an .index that is not a tensor bundle table)."""
    with open(prefix + ".index", "rb") as f:
        table = f.read()
    if len(table) < _FOOTER or struct.unpack("<Q", table[-8:])[0] != _MAGIC:
        raise ValueError("the .index file is not a checkpoint index (damaged or cut short)")
    footer = table[-_FOOTER:]
    _, pos = _varint(footer, 0)  # the metaindex handle: offset, size
    _, pos = _varint(footer, pos)
    shards, needed = 1, {}
    for _, handle in _block(table, footer[pos:]):
        for key, value in _block(table, handle):
            fields = _fields(value)
            if key == b"":
                shards = fields.get(1, 1)  # BundleHeaderProto.num_shards
                continue
            shard, end = fields.get(3, 0), fields.get(4, 0) + fields.get(5, 0)  # shard_id, offset + size
            needed[shard] = max(needed.get(shard, 0), end)
    return {f"{prefix}.data-{shard:05d}-of-{shards:05d}": end for shard, end in needed.items()}


def truncation(prefix: str) -> "str | None":
    """Why the checkpoint's files cannot hold its tensors (a missing or short data file), else None."""
    for path, end in data_extents(prefix).items():
        if not os.path.exists(path):
            return f"its data file {os.path.basename(path)} is missing"
        size = os.path.getsize(path)
        if size < end:
            return f"its data file {os.path.basename(path)} holds {size} bytes, its index needs {end} (cut short)"
    return None
