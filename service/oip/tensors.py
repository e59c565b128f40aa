"""Tensor data of the Open Inference Protocol: BYTES and FP32 in their raw and JSON forms.

Raw form (the REST binary tensor extension and gRPC's raw_input_contents/raw_output_contents):
the flattened, row-major elements; a BYTES element is its length as 4 bytes little-endian,
then the bytes; FP32 is little-endian float32. JSON form: `data` is the elements, flat or
nested by the shape (the protocol allows both); BYTES elements are strings.
"""
from __future__ import annotations

import struct
from math import prod

import numpy as np

from service.tagger import ServiceError

_LEN = struct.Struct("<I")


class TensorError(ServiceError):
    """A malformed tensor: 400, naming the tensor."""

    def __init__(self, name: str, message: str):
        super().__init__(400, f"inputs.{name}: {message}", field=f"inputs.{name}")


def element_count(name: str, shape: list[int]) -> int:
    if any((not isinstance(d, int)) or isinstance(d, bool) or d < 0 for d in shape):
        raise TensorError(name, f"shape must be non-negative integers, got {shape}")
    return prod(shape)


def decode_bytes(name: str, raw: bytes, count: int) -> list[bytes]:
    """Raw BYTES -> `count` elements (each: 4-byte little-endian length, then the bytes)."""
    out, pos, end = [], 0, len(raw)
    view = memoryview(raw)
    for _ in range(count):
        if pos + 4 > end:
            raise TensorError(name, f"raw BYTES data ends after {len(out)} of {count} elements")
        (n,) = _LEN.unpack_from(raw, pos)
        pos += 4
        if pos + n > end:
            raise TensorError(name, f"raw BYTES element {len(out)} says {n} bytes, {end - pos} left")
        out.append(bytes(view[pos:pos + n]))
        pos += n
    if pos != end:
        raise TensorError(name, f"{end - pos} bytes of raw data beyond the {count} elements of its shape")
    return out


_PREFIXED: dict[str, bytes] = {}     # tag name -> its raw BYTES element (the catalogue repeats in every answer)
_MAX_PREFIXED = 200_000


def _prefixed(text: str) -> bytes:
    raw = text.encode("utf-8")
    out = _LEN.pack(len(raw)) + raw
    if len(_PREFIXED) < _MAX_PREFIXED:
        _PREFIXED[text] = out
    return out


def encode_strings(items: list[str]) -> bytes:
    """BYTES elements given as text -> raw form (UTF-8, each length-prefixed, concatenated)."""
    get = _PREFIXED.get
    return b"".join([get(x) or _prefixed(x) for x in items])


def encode_fp32(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values, dtype="<f4").tobytes()


def flatten_json(name: str, data, count: int) -> list:
    """JSON `data` (flat or nested by shape) -> the flat list of `count` elements."""
    if not isinstance(data, list):
        raise TensorError(name, f"data must be a list, got {type(data).__name__}")
    flat = data
    while flat and any(isinstance(x, list) for x in flat):
        if not all(isinstance(x, list) for x in flat):
            raise TensorError(name, "data mixes lists and elements")
        flat = [y for x in flat for y in x]
    if len(flat) != count:
        raise TensorError(name, f"data has {len(flat)} elements, its shape needs {count}")
    return flat


def json_bytes_elements(name: str, data, count: int) -> list[bytes]:
    """JSON BYTES data -> elements as bytes (strings are UTF-8 encoded)."""
    out = []
    for x in flatten_json(name, data, count):
        if not isinstance(x, str):
            raise TensorError(name, f"BYTES elements must be strings, got {type(x).__name__}")
        out.append(x.encode("utf-8"))
    return out
