"""Bit packing: n signed codes of b bits each into ⌈n·b/8⌉ bytes (little-endian bit order)."""

from __future__ import annotations

import numpy as np


def packed_bytes(count: int, bits: int) -> int:
    """Bytes taken by `count` codes of `bits` bits."""
    return (count * bits + 7) // 8


def pack(codes: np.ndarray, bits: int, signed: bool = True) -> np.ndarray:
    """Pack integer codes in [−2^(b−1), 2^(b−1)−1] (or [0, 2^b) when not `signed`) into a uint8 array.

    Example:
        >>> unpack(pack(np.array([-1, 0, 1, 1]), 2), 2, 4).tolist()
        [-1, 0, 1, 1]
    """
    codes = np.asarray(codes, dtype=np.int64).ravel()
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if codes.size and (codes.min() < lo or codes.max() > hi):
        raise ValueError(f"codes outside the {bits}-bit range [{lo}, {hi}]")
    unsigned = (codes & ((1 << bits) - 1)).astype(np.uint8)
    bit_matrix = np.unpackbits(unsigned[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(bit_matrix.ravel(), bitorder="little")


def unpack(data: np.ndarray, bits: int, count: int, signed: bool = True) -> np.ndarray:
    """Inverse of `pack`: `count` signed codes from the first ⌈count·bits/8⌉ bytes of `data`."""
    need = packed_bytes(count, bits)
    if len(data) < need:
        raise ValueError(f"packed data is truncated: {len(data)} bytes, {need} needed")
    flat = np.unpackbits(np.asarray(data[:need], dtype=np.uint8), bitorder="little")[: count * bits]
    weights = (1 << np.arange(bits)).astype(np.int64)
    unsigned = flat.reshape(count, bits).astype(np.int64) @ weights
    if not signed:
        return unsigned
    return np.where(unsigned >= 2 ** (bits - 1), unsigned - (1 << bits), unsigned)
