"""Tests for zerobit.data: IDX parsing, checksums, splits, batching and augmentation."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from zerobit.data import Batches, TensorData, digits_splits, fashion_mnist_splits, get_splits, parse_idx
from zerobit.data import fashion_mnist as fm
from zerobit.data.loaders import random_crop_flip


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_gz(path: Path, payload: bytes) -> Path:
    path.write_bytes(gzip.compress(payload))
    return path


def test_parse_idx_roundtrip() -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = parse_idx(_idx_bytes(arr))
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr)


def test_parse_idx_rejects_bad_magic_and_truncation() -> None:
    good = _idx_bytes(np.zeros((3, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="magic"):
        parse_idx(b"\x01" + good[1:], name="x.idx")
    with pytest.raises(ValueError, match=r"x\.idx.*truncated"):
        parse_idx(good[:-1], name="x.idx")
    with pytest.raises(ValueError, match="dtype"):
        parse_idx(good[:2] + b"\x07" + good[3:])


def test_read_idx_gz_corrupt_and_truncated_files(tmp_path: Path) -> None:
    arr = np.ones((4, 2, 2), dtype=np.uint8)
    ok = _write_gz(tmp_path / "fake-idx3-ubyte.gz", _idx_bytes(arr))
    np.testing.assert_array_equal(fm.read_idx_gz(ok), arr)
    truncated_payload = _write_gz(tmp_path / "short-idx3-ubyte.gz", _idx_bytes(arr)[:-3])
    with pytest.raises(ValueError, match="short-idx3-ubyte.gz"):
        fm.read_idx_gz(truncated_payload)
    cut_stream = tmp_path / "cut-idx3-ubyte.gz"
    cut_stream.write_bytes(gzip.compress(_idx_bytes(arr))[:-10])
    with pytest.raises(ValueError, match="cut-idx3-ubyte.gz.*gzip"):
        fm.read_idx_gz(cut_stream)


def test_checksum_mismatch_names_file_and_fix(tmp_path: Path) -> None:
    name = "t10k-labels-idx1-ubyte.gz"
    fake = _write_gz(tmp_path / name, _idx_bytes(np.zeros(10000, dtype=np.uint8)))
    with pytest.raises(ValueError, match=rf"{name}.*checksum mismatch.*dataset-fashion-mnist"):
        fm.read_idx_gz(fake)
    # verify=False skips the checksum and parses the (fake) content
    assert fm.read_idx_gz(fake, verify=False).shape == (10000,)


def test_checksums_json_is_consistent() -> None:
    sums = json.loads(fm.CHECKSUMS_PATH.read_text())
    assert set(sums["files"]) == set(fm.FILES)
    # both digests of every entry describe the same payload: the decompressed file found on this machine
    directory = fm.find_dir(allow_download=False)
    for name, entry in sums["files"].items():
        raw = gzip.decompress((directory / name).read_bytes())
        assert hashlib.sha256(raw).hexdigest() == entry["sha256_idx"], name
        assert hashlib.md5(raw, usedforsecurity=False).hexdigest() == entry["md5_idx"], name
        assert list(parse_idx(raw).shape) == entry["shape"], name


def test_corrupt_file_in_root_is_reported(tmp_path: Path) -> None:
    for name in fm.FILES:
        _write_gz(tmp_path / name, _idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(ValueError, match="checksum mismatch"):
        fm.load_fashion_mnist(root=tmp_path)


def test_missing_everywhere_raises_helpful_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "nope")
    monkeypatch.setattr(fm, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.delenv("ZEROBIT_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fm.find_dir(tmp_path / "empty", allow_download=False)


def test_load_fashion_mnist_shapes_and_types() -> None:
    xtr, ytr, xte, yte = fm.load_fashion_mnist()
    assert xtr.shape == (60000, 28, 28) and xtr.dtype == torch.uint8
    assert ytr.shape == (60000,) and ytr.dtype == torch.int64
    assert xte.shape == (10000, 28, 28) and yte.shape == (10000,)
    assert torch.bincount(yte).tolist() == [1000] * 10
    assert fm.load_fashion_mnist()[0] is xtr  # parsed once per process


def test_fashion_mnist_splits_sizes_determinism_disjoint() -> None:
    s = fashion_mnist_splits()
    assert (len(s.train), len(s.val), len(s.test)) == (55000, 5000, 10000)
    assert s.train.x.shape[1:] == (1, 28, 28) and s.train.x.dtype == torch.float32
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10
    assert abs(float(s.train.x.mean())) < 0.02 and abs(float(s.train.x.std()) - 1.0) < 0.02
    assert s.train.fill == pytest.approx((0 - fm.MEAN) / fm.STD)
    again = fashion_mnist_splits()
    assert torch.equal(again.val.x, s.val.x) and torch.equal(again.val.y, s.val.y)
    other = fashion_mnist_splits(seed=1)
    assert not torch.equal(other.val.y, s.val.y)
    # train + val is a partition of the official 60k training images (disjoint and complete)
    raw_train = fm.load_fashion_mnist()[0]
    original = Counter(r.tobytes() for r in raw_train.flatten(1).numpy())
    def keys(d: TensorData) -> Counter:
        raw = torch.round((d.x * fm.STD + fm.MEAN) * 255).to(torch.uint8)
        return Counter(r.tobytes() for r in raw.flatten(1).numpy())
    assert keys(s.train) + keys(s.val) == original
    with pytest.raises(ValueError, match="val_size"):
        fashion_mnist_splits(val_size=0)


def test_get_splits_unknown_name_lists_names() -> None:
    with pytest.raises(ValueError, match="fashion-mnist.*digits"):
        get_splits("cifar10")


def test_digits_splits() -> None:
    s = digits_splits()
    assert (len(s.train), len(s.val), len(s.test)) == (1200, 300, 297)
    assert s.input_shape == (1, 8, 8) and s.train.x.shape == (1200, 1, 8, 8)
    assert abs(float(s.train.x.mean())) < 1e-4 and float(s.train.x.std()) == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(digits_splits().test.y, s.test.y)
    assert s.train.x.min() == pytest.approx(s.train.fill)
    assert get_splits("digits").train.x.shape == s.train.x.shape


def _toy(n: int = 50) -> TensorData:
    return TensorData(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 4, 4).clone(),
                      torch.arange(n))


def test_batches_len_and_order() -> None:
    data = _toy(50)
    assert len(Batches(data, 16)) == 4 and len(Batches(data, 16, drop_last=True)) == 3
    ys = torch.cat([y for _, y in Batches(data, 16)])
    assert torch.equal(ys, torch.arange(50))
    with pytest.raises(ValueError, match="batch_size"):
        Batches(data, 0)


def test_batches_shuffle_deterministic_and_reshuffles() -> None:
    data = _toy(50)
    a, b = Batches(data, 10, shuffle=True, seed=3), Batches(data, 10, shuffle=True, seed=3)
    epoch1 = torch.cat([y for _, y in a])
    assert torch.equal(epoch1, torch.cat([y for _, y in b]))
    assert sorted(epoch1.tolist()) == list(range(50)) and not torch.equal(epoch1, torch.arange(50))
    epoch2 = torch.cat([y for _, y in a])
    assert not torch.equal(epoch1, epoch2)
    for x, y in Batches(data, 10, shuffle=True, seed=3):
        assert torch.equal(x[:, 0, 0, 0], y.float())  # images stay paired with labels


def test_augmentation_shape_determinism_and_content() -> None:
    s = digits_splits()
    x1, y1 = next(iter(Batches(s.train, 64, shuffle=True, augment=True, seed=5, channels_last=True)))
    x2, _ = next(iter(Batches(s.train, 64, shuffle=True, augment=True, seed=5)))
    assert x1.shape == (64, 1, 8, 8) and y1.shape == (64,)
    assert x1.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x1, x2)
    plain, _ = next(iter(Batches(s.train, 64, shuffle=True, seed=5)))
    assert not torch.equal(x1, plain)
    # every augmented image is a shifted (and possibly mirrored) copy padded with the background value
    img = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4).repeat(200, 1, 1, 1)
    out = random_crop_flip(img, torch.Generator().manual_seed(0), pad=2, fill=-9.0)
    padded = torch.nn.functional.pad(img[:1], (2, 2, 2, 2), value=-9.0)[0, 0]
    crops = {(padded[dy:dy + 4, dx:dx + 4].flip(1) if f else padded[dy:dy + 4, dx:dx + 4]).numpy().tobytes()
             for dy in range(5) for dx in range(5) for f in (False, True)}
    assert all(o[0].numpy().tobytes() in crops for o in out)
    assert len({o.numpy().tobytes() for o in out}) > 20  # the offsets and flips actually vary
