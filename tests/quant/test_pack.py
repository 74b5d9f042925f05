from __future__ import annotations

import numpy as np
import pytest

from zerobit.quant.pack import pack, packed_bytes, unpack


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("count", [1, 7, 64, 1001])
def test_roundtrip_and_size(bits, count):
    rng = np.random.default_rng(bits * 1000 + count)
    codes = rng.integers(-(2 ** (bits - 1)) + 1, 2 ** (bits - 1), size=count)
    data = pack(codes, bits)
    assert len(data) == packed_bytes(count, bits) == -(-count * bits // 8)
    assert np.array_equal(unpack(data, bits, count), codes)


@pytest.mark.parametrize("bits", range(1, 33))
def test_every_width_keeps_every_bit(bits):
    """Position codes of wide layers need 9+ bits: the extremes of each width survive a round trip."""
    rng = np.random.default_rng(bits)
    top = 2**bits - 1
    codes = np.concatenate([[0, top, top >> 1, 1], rng.integers(0, top, size=61, endpoint=True)])
    data = pack(codes, bits, signed=False)
    assert len(data) == packed_bytes(len(codes), bits)
    assert np.array_equal(unpack(data, bits, len(codes), signed=False), codes)
    if bits >= 2:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        signed = np.array([lo, hi, -1, 0, 1])
        assert np.array_equal(unpack(pack(signed, bits), bits, 5), signed)


def test_out_of_range_and_truncated():
    with pytest.raises(ValueError, match="range"):
        pack(np.array([2]), 2)
    with pytest.raises(ValueError, match="range"):
        pack(np.array([256]), 8, signed=False)
    with pytest.raises(ValueError, match="truncated"):
        unpack(pack(np.arange(-3, 4), 3)[:1], 3, 7)
    with pytest.raises(ValueError, match="cannot be packed"):
        pack(np.array([1]), 33)
