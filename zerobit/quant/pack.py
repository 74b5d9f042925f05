"""Bit packing: n integer codes of b bits each (1 ≤ b ≤ 32) into ⌈n·b/8⌉ bytes (little-endian bit order)."""

from __future__ import annotations

import numpy as np

MAX_BITS = 32


def packed_bytes(count: int, bits: int) -> int:
    """Bytes taken by `count` codes of `bits` bits."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"codes of {bits} bits cannot be packed (1 to {MAX_BITS} bits)")


def pack(codes: np.ndarray, bits: int, signed: bool = True) -> np.ndarray:
    """Pack integer codes in [−2^(b−1), 2^(b−1)−1] (or [0, 2^b) when not `signed`) into a uint8 array.

    Every code keeps all of its `bits` bits: position codes of wide layers need more than 8.

    Example:
        >>> unpack(pack(np.array([-1, 0, 1, 1]), 2), 2, 4).tolist()
        [-1, 0, 1, 1]
        >>> unpack(pack(np.array([300, 4095]), 12, signed=False), 12, 2, signed=False).tolist()
        [300, 4095]
    """
    _check_bits(bits)
    codes = np.asarray(codes, dtype=np.int64).ravel()
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if codes.size and (codes.min() < lo or codes.max() > hi):
        raise ValueError(f"codes outside the {bits}-bit range [{lo}, {hi}]")
    unsigned = (codes & ((1 << bits) - 1)).astype("<u8")  # two's complement in the low `bits` bits
    bit_matrix = np.unpackbits(unsigned.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")[:, :bits]
    return np.packbits(bit_matrix.ravel(), bitorder="little")


def unpack(data: np.ndarray, bits: int, count: int, signed: bool = True) -> np.ndarray:
    """Inverse of `pack`: `count` codes from the first ⌈count·bits/8⌉ bytes of `data`."""
    _check_bits(bits)
    need = packed_bytes(count, bits)
    if len(data) < need:
        raise ValueError(f"packed data is truncated: {len(data)} bytes, {need} needed")
    flat = np.unpackbits(np.asarray(data[:need], dtype=np.uint8), bitorder="little")[: count * bits]
    weights = (1 << np.arange(bits)).astype(np.int64)
    unsigned = flat.reshape(count, bits).astype(np.int64) @ weights
    if not signed:
        return unsigned
    return np.where(unsigned >= 2 ** (bits - 1), unsigned - (1 << bits), unsigned)
