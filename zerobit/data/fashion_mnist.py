"""Fashion-MNIST: locate, verify, parse (IDX format) and split.

Search order for the four ``*-ubyte.gz`` files: the ``root`` argument, ``$ZEROBIT_DATA``,
``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``) and
``~/.cache/zerobit/fashion-mnist``. If none has them, they are downloaded into the cache directory.

Example:
    >>> from zerobit.data.fashion_mnist import fashion_mnist_splits
    >>> splits = fashion_mnist_splits()  # doctest: +SKIP
    >>> len(splits.train), len(splits.val), len(splits.test)  # doctest: +SKIP
    (55000, 5000, 10000)
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from zerobit.data.loaders import Splits, TensorData

MEAN = 0.2860
STD = 0.3530
FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CHECKSUMS_PATH = Path(__file__).with_name("checksums.json")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def cache_dir() -> Path:
    """Return the download cache directory, ``~/.cache/zerobit/fashion-mnist``."""
    return Path.home() / ".cache" / "zerobit" / "fashion-mnist"


def _checksums() -> dict:
    return json.loads(CHECKSUMS_PATH.read_text())


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse a decompressed IDX payload into a numpy array.

    Args:
        raw: File contents: magic ``00 00 <dtype> <ndim>``, ``ndim`` big-endian int32 sizes, data.
        name: File name used in error messages.

    Raises:
        ValueError: Bad magic number, unknown dtype code or a size mismatch (truncated file).

    Example:
        >>> parse_idx(bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 9])).tolist()
        [7, 9]
    """
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{name}: not an IDX file (bad magic number); delete it and re-fetch the dataset")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{name}: unknown IDX dtype code 0x{code:02x}; delete it and re-fetch the dataset")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{name}: truncated IDX header; delete it and re-fetch the dataset")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{name}: IDX size mismatch (dims {dims} need {expected} bytes, file has {len(raw)}); "
            "the file is truncated or corrupt - delete it and re-fetch the dataset"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx_gz(path: str | Path, verify: bool = True) -> np.ndarray:
    """Decompress, optionally checksum-verify, and parse one gzipped IDX file.

    Args:
        path: A ``*-ubyte.gz`` file.
        verify: Check the SHA-256 of the decompressed payload against ``checksums.json``
            (only for the four known Fashion-MNIST file names).

    Raises:
        ValueError: Corrupt gzip stream, IDX parse error or checksum mismatch (message names the file).

    Example:
        >>> labels = read_idx_gz("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")  # doctest: +SKIP
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: corrupt or truncated gzip file ({err}); delete it and re-fetch it") from err
    if verify and path.name in FILES:
        verify_payload(path.name, raw, source=str(path))
    return parse_idx(raw, name=str(path))


def verify_payload(name: str, raw: bytes, source: str | None = None) -> None:
    """Check the SHA-256 of a decompressed Fashion-MNIST file against ``checksums.json``.

    Raises:
        ValueError: The digest differs; the message names the file and how to fix it.

    Example:
        >>> verify_payload("t10k-labels-idx1-ubyte.gz", b"garbage")  # doctest: +SKIP
        Traceback (most recent call last):
        ValueError: ... checksum mismatch ...
    """
    want = _checksums()["files"][name]["sha256_idx"]
    got = hashlib.sha256(raw).hexdigest()
    if got != want:
        raise ValueError(
            f"{source or name}: checksum mismatch (SHA-256 of the decompressed data is {got}, expected {want}); "
            "the file is corrupt or not Fashion-MNIST - delete it and re-fetch it "
            "(apt-get install dataset-fashion-mnist, or let zerobit download it)"
        )


def _has_all(directory: Path) -> bool:
    return all((directory / f).is_file() for f in FILES)


def _candidates(root: str | Path | None) -> list[Path]:
    dirs = [Path(root).expanduser()] if root is not None else []
    if os.environ.get("ZEROBIT_DATA"):
        dirs.append(Path(os.environ["ZEROBIT_DATA"]).expanduser())
    return [*dirs, DEBIAN_DIR, cache_dir()]


def _missing_message(searched: list[Path], reason: str) -> str:
    where = ", ".join(str(p) for p in searched)
    return (
        f"Fashion-MNIST not found (searched: {where}) and download failed ({reason}). Fix: "
        "`apt-get install dataset-fashion-mnist`, or put the 4 files "
        f"({', '.join(FILES)}) into ~/.cache/zerobit/fashion-mnist or into the directory named by $ZEROBIT_DATA."
    )


def download(directory: Path | None = None, timeout: float = 30.0) -> Path:
    """Download the four files from the official mirror into ``directory`` (default: cache dir).

    Each file is checked against the official MD5 of the ``.gz`` and the SHA-256 of its payload.

    Raises:
        FileNotFoundError: Network error or checksum mismatch, with instructions for a manual install.

    Example:
        >>> download()  # doctest: +SKIP
        PosixPath('/home/me/.cache/zerobit/fashion-mnist')
    """
    directory = directory or cache_dir()
    sums = _checksums()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            if (directory / name).is_file():
                continue
            with urllib.request.urlopen(sums["base_url"] + name, timeout=timeout) as resp:
                blob = resp.read()
            if hashlib.md5(blob, usedforsecurity=False).hexdigest() != sums["files"][name]["md5_gz_official"]:
                raise ValueError(f"downloaded {name} has the wrong MD5")
            verify_payload(name, gzip.decompress(blob))
            tmp = directory / (name + ".part")
            tmp.write_bytes(blob)
            tmp.replace(directory / name)
    except (OSError, ValueError, EOFError, zlib.error) as err:
        raise FileNotFoundError(_missing_message(_candidates(None), str(err))) from err
    return directory


def find_dir(root: str | Path | None = None, allow_download: bool = True) -> Path:
    """Return the first directory holding all four files, downloading them if allowed.

    Example:
        >>> find_dir()  # doctest: +SKIP
        PosixPath('/usr/share/datasets/fashion-mnist')
    """
    searched = _candidates(root)
    for directory in searched:
        if _has_all(directory):
            return directory
    if not allow_download:
        raise FileNotFoundError(_missing_message(searched, "downloading disabled"))
    return download()


@functools.lru_cache(maxsize=4)
def _load_dir(directory: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    arrays = [read_idx_gz(Path(directory) / name) for name in FILES]
    for name, arr in zip(FILES, arrays, strict=True):
        if list(arr.shape) != _checksums()["files"][name]["shape"]:
            raise ValueError(f"{directory}/{name}: unexpected shape {arr.shape}; delete it and re-fetch it")
    xtr, ytr, xte, yte = arrays
    return (torch.from_numpy(xtr), torch.from_numpy(ytr.astype(np.int64)),
            torch.from_numpy(xte), torch.from_numpy(yte.astype(np.int64)))


def load_fashion_mnist(root: str | Path | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Load raw Fashion-MNIST (parsed once per process, then cached; do not modify in place).

    Args:
        root: Optional directory searched first.

    Returns:
        ``train_images`` uint8 (60000, 28, 28), ``train_labels`` int64 (60000,),
        ``test_images`` uint8 (10000, 28, 28), ``test_labels`` int64 (10000,).

    Example:
        >>> xtr, ytr, xte, yte = load_fashion_mnist()  # doctest: +SKIP
        >>> xtr.shape, yte.dtype  # doctest: +SKIP
        (torch.Size([60000, 28, 28]), torch.int64)
    """
    return _load_dir(str(find_dir(root).resolve()))


def normalize(images: Tensor) -> Tensor:
    """Map uint8 images (N, H, W) to normalized float32 (N, 1, H, W).

    Example:
        >>> normalize(torch.zeros(1, 28, 28, dtype=torch.uint8)).shape
        torch.Size([1, 1, 28, 28])
    """
    return ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1).contiguous()


def fashion_mnist_splits(val_size: int = 5000, seed: int = 0, root: str | Path | None = None) -> Splits:
    """Fixed train/val split of the 60k training images plus the official 10k test set.

    Args:
        val_size: Images held out of the training set for validation.
        seed: Seed of the permutation that chooses the validation images.
        root: Optional data directory searched first.

    Example:
        >>> s = fashion_mnist_splits()  # doctest: +SKIP
        >>> tuple(s.train.x.shape)  # doctest: +SKIP
        (55000, 1, 28, 28)
    """
    xtr, ytr, xte, yte = load_fashion_mnist(root)
    if not 0 < val_size < len(xtr):
        raise ValueError(f"val_size must be between 1 and {len(xtr) - 1}, got {val_size}")
    perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    fill = (0.0 - MEAN) / STD
    x = normalize(xtr)
    return Splits(
        train=TensorData(x[train_idx], ytr[train_idx], fill),
        val=TensorData(x[val_idx], ytr[val_idx], fill),
        test=TensorData(normalize(xte), yte.clone(), fill),
        num_classes=10,
        input_shape=(1, 28, 28),
    )
