"""A GGUF file's fingerprint: what the conversion cache is keyed by, and what a converted
directory checks its source file against before reading from it.

The fingerprint hashes the file's size, its whole header (metadata and tensor infos: names,
types, shapes, offsets; parsed here, as far as the tensor infos end) and 32 samples of 4 KiB
spread evenly over its tensor data, the last at the file's end. Reading it costs the header
and 132 KiB whatever the file's size, so a server start checks it at once; a changed header
(another chat template, a renamed model), a re-quantization or a truncated copy changes it.
"""

from __future__ import annotations

import hashlib
import mmap
import struct

_SAMPLES, _SAMPLE_BYTES = 32, 4096
# GGUF value type -> bytes (8: string, 9: array are read apart)
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _skip_value(data: mmap.mmap, pos: int, vtype: int) -> int:
    if vtype in _SCALAR_BYTES:
        return pos + _SCALAR_BYTES[vtype]
    if vtype == 8:
        return pos + 8 + struct.unpack_from("<Q", data, pos)[0]
    if vtype != 9:
        raise ValueError(f"not a GGUF file: value type {vtype}")
    etype, count = struct.unpack_from("<IQ", data, pos)
    pos += 12
    if etype in _SCALAR_BYTES:
        return pos + count * _SCALAR_BYTES[etype]
    for _ in range(count):
        pos = _skip_value(data, pos, etype)
    return pos


def _header_end(data: mmap.mmap) -> int:
    """The offset where the tensor infos end (GGUF version 2 and 3 layout)."""
    if data[:4] != b"GGUF":
        raise ValueError("not a GGUF file")
    num_tensors, num_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24
    for _ in range(num_kv):
        pos = _skip_value(data, pos, 8)  # the key
        pos = _skip_value(data, pos + 4, struct.unpack_from("<I", data, pos)[0])
    for _ in range(num_tensors):
        pos = _skip_value(data, pos, 8)  # the name
        num_dims = struct.unpack_from("<I", data, pos)[0]
        pos += 4 + 8 * num_dims + 4 + 8  # dims, type, offset
    return pos


def gguf_fingerprint(path: str) -> str:
    """A hash of `path`'s size, header and sampled tensor bytes (the module docstring)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        size = len(data)
        try:
            end = _header_end(data)
        except (struct.error, ValueError) as e:  # a header running past the file's end
            raise ValueError(f"{path} is not a whole GGUF file: {e}") from None
        digest = hashlib.sha256(f"{size}|".encode())
        digest.update(data[:end])
        span = max(size - end - _SAMPLE_BYTES, 0)
        for i in range(_SAMPLES + 1):  # the last sample is the file's end
            start = end + span * i // _SAMPLES
            digest.update(data[start : start + _SAMPLE_BYTES])
    return digest.hexdigest()[:32]
