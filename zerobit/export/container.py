"""Strict reading of a .zbit container: every byte, field and bound checked before anything is allocated.

A .zbit file is a safetensors file (8-byte header length, JSON header, data). This reader parses it itself so
that nothing the file says is trusted unchecked: it opens regular files only, reads no more than the header
promises and the file holds, accepts only the 1-D tensors and dtypes zerobit writes, and checks every metadata
field and its bounds. Every problem is one `ZbitFormatError` naming the part that is wrong.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from zerobit.policy import ACT_BITS

MAX_FILE_BYTES = 1 << 34  # 16 GiB: far above any model this tool compresses
MAX_HEADER_BYTES = 1 << 24
MAX_SAMPLE_ELEMENTS = 1 << 18  # input elements per sample traced without the user's own example input
MAX_CHANNELS = 1 << 24
DTYPES = {"U8": np.dtype("u1"), "I16": np.dtype("<i2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}
_REQUIRED = ("format", "version", "model", "input_shape", "act_bits", "groups", "ignored", "crc32")


class ZbitFormatError(ValueError):
    """The file is not a readable .zbit file (corrupt, truncated, edited, or written for another model)."""


def checksum(metadata: Mapping[str, str], blobs: Mapping[str, np.ndarray]) -> int:
    """CRC-32 of everything that decides the model: the metadata (but the CRC itself), and every tensor's name,
    dtype, shape and bytes."""
    head = json.dumps({k: v for k, v in metadata.items() if k != "crc32"}, sort_keys=True).encode()
    crc = zlib.crc32(head)
    for key in sorted(blobs):
        a = np.ascontiguousarray(blobs[key])
        crc = zlib.crc32(f"{key}|{a.dtype.str}|{a.shape}".encode(), crc)
        crc = zlib.crc32(a.tobytes(), crc)
    return crc


def checksum_v1(blobs: Mapping[str, np.ndarray]) -> int:
    """The CRC of format 1 files: tensor bytes only."""
    crc = 0
    for key in sorted(blobs):
        crc = zlib.crc32(np.ascontiguousarray(blobs[key]).tobytes(), crc)
    return crc


def read_container(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """(metadata, tensors) of a safetensors file, read with every bound checked.

    Raises:
        FileNotFoundError: no such file.
        ZbitFormatError: anything else that is wrong with it.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ZbitFormatError(f"{path} cannot be read: {exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise ZbitFormatError(f"{path} is not a regular file")
    size = info.st_size
    if size < 8 or size > MAX_FILE_BYTES:
        raise ZbitFormatError(f"{path} is not a .zbit file: {size} bytes")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n < 2 or n > min(MAX_HEADER_BYTES, size - 8):
            raise ZbitFormatError(f"{path} is corrupt or truncated: its header claims {n} bytes")
        header = _parse_header(f.read(n), path)
        meta = header.pop("__metadata__", None)
        entries = _tensor_entries(header, path)
        data_len = size - 8 - n
        if entries and entries[-1][3] != data_len or not entries and data_len:
            raise ZbitFormatError(f"{path} is corrupt or truncated: the header does not describe the file's "
                                  f"{data_len} data bytes")
        data = f.read(data_len)
    if len(data) != data_len:
        raise ZbitFormatError(f"{path} changed while it was read")
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ZbitFormatError(f"{path} is not a .zbit file: no metadata")
    blobs = {key: np.frombuffer(data, dtype=DTYPES[dt], count=count, offset=begin).copy() if count
             else np.zeros(0, DTYPES[dt]) for key, dt, begin, _end, count in entries}
    return meta, blobs


def write_container(meta: Mapping[str, str], arrays: Mapping[str, np.ndarray],
                    header_edit: Callable[[dict], None] | None = None) -> bytes:
    """A safetensors file of 1-D tensors, built by hand: the inverse of `read_container`.

    `header_edit` may change the header before it is written (the fuzz tests write what zerobit never would).
    """
    names = {v: k for k, v in DTYPES.items()}
    header: dict = {"__metadata__": dict(meta)}
    parts, offset = [], 0
    for key, a in arrays.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[key] = {"dtype": names[a.dtype], "shape": [a.size], "data_offsets": [offset, offset + len(raw)]}
        parts.append(raw)
        offset += len(raw)
    if header_edit:
        header_edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(parts)


def _parse_header(raw: bytes, path: str | os.PathLike) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ZbitFormatError(f"{path} is corrupt: its header is not JSON ({type(exc).__name__})") from exc
    if not isinstance(header, dict):
        raise ZbitFormatError(f"{path} is corrupt: its header is not a JSON object")
    return header


def _tensor_entries(header: dict, path: str | os.PathLike) -> list[tuple[str, str, int, int, int]]:
    """(name, dtype, begin, end, count) of every tensor, checked to tile the data section exactly."""
    entries = []
    for key, e in header.items():
        ok = (isinstance(e, dict) and set(e) == {"dtype", "shape", "data_offsets"} and isinstance(e["dtype"], str)
              and e["dtype"] in DTYPES
              and isinstance(e["shape"], list) and len(e["shape"]) == 1 and _is_int(e["shape"][0])
              and isinstance(e["data_offsets"], list) and len(e["data_offsets"]) == 2
              and all(_is_int(v) for v in e["data_offsets"]))
        if not ok:
            raise ZbitFormatError(f"{path} is corrupt: tensor {key!r} has a damaged entry in the header")
        begin, end = e["data_offsets"]
        count = e["shape"][0]
        if not 0 <= begin <= end or end - begin != count * DTYPES[e["dtype"]].itemsize:
            raise ZbitFormatError(f"{path} is corrupt: tensor {key!r} has inconsistent offsets and shape")
        entries.append((key, e["dtype"], begin, end, count))
    entries.sort(key=lambda t: (t[2], t[3]))
    pos = 0
    for key, _dt, begin, end, _count in entries:
        if begin != pos:
            raise ZbitFormatError(f"{path} is corrupt: tensor {key!r} overlaps another or leaves a gap")
        pos = end
    return entries


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_FILE_BYTES


@dataclass(frozen=True)
class Header:
    """The checked metadata of a .zbit file."""

    version: str
    model: str
    input_shape: tuple[int, ...]
    act_bits: int
    groups: list[tuple[str, int]]
    ignored: list[str]


def check_metadata(meta: Mapping[str, str], path: str | os.PathLike, max_elements: int | None) -> Header:
    """Every metadata field parsed and bounded; `max_elements` caps the input size traced per sample."""
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ZbitFormatError(f"{path} has damaged metadata: missing {missing}")
    bad = _why_bad(meta, max_elements)
    if bad:
        raise ZbitFormatError(f"{path} has damaged metadata: {bad}")
    return Header(meta["version"], meta["model"], tuple(int(x) for x in meta["input_shape"].split(",")),
                  int(meta["act_bits"]), [(n, c) for n, c in json.loads(meta["groups"])],
                  json.loads(meta["ignored"]))


def _why_bad(meta: Mapping[str, str], max_elements: int | None) -> str:
    """What is wrong with the metadata, or '' when every field is in bounds."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{0,64}", meta["model"]):
        return f"model name {meta['model'][:80]!r}"
    if not re.fullmatch(r"[1-9][0-9]{0,5}(,[1-9][0-9]{0,5}){1,5}", meta["input_shape"]):
        return f"input_shape {meta['input_shape'][:80]!r}"
    sample = math.prod(int(x) for x in meta["input_shape"].split(",")[1:])
    if max_elements is not None and sample > max_elements:
        return (f"input_shape {meta['input_shape']} has {sample:,} elements per sample, more than "
                f"{max_elements:,}; pass example_inputs= to zerobit.load for inputs this large")
    if not re.fullmatch(r"[0-9]{1,2}", meta["act_bits"]) or int(meta["act_bits"]) not in ACT_BITS:
        return f"act_bits {meta['act_bits'][:20]!r}"
    groups, ignored = _json_list(meta["groups"]), _json_list(meta["ignored"])
    if groups is None or not groups or not all(
            isinstance(g, list) and len(g) == 2 and isinstance(g[0], str) and isinstance(g[1], int)
            and not isinstance(g[1], bool) and 1 <= g[1] <= MAX_CHANNELS for g in groups):
        return "groups"
    if len({g[0] for g in groups}) != len(groups):
        return "groups repeat a name"
    if ignored is None or not all(isinstance(n, str) for n in ignored):
        return "ignored"
    if not re.fullmatch(r"[0-9a-f]{8}", meta["crc32"]):
        return "crc32"
    return ""


def _json_list(text: str) -> list | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, list) else None
