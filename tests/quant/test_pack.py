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


def test_out_of_range_and_truncated():
    with pytest.raises(ValueError, match="range"):
        pack(np.array([2]), 2)
    with pytest.raises(ValueError, match="truncated"):
        unpack(pack(np.arange(-3, 4), 3)[:1], 3, 7)
