"""Damaged and hostile .zbit files: each either loads to exactly the model written, or is one ZbitFormatError.

`ZbitFormatError` is the only exception allowed; no hang, no allocation beyond the model's own. Files whose
checksum was recomputed after the edit can only be caught by the checks of every field, shape and value.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import EXAMPLE, TINY_MODELS

from zerobit.export.container import ZbitFormatError, checksum, read_container, write_container
from zerobit.export.runtime import load, save_zbit
from zerobit.graph import analyse
from zerobit.policy import GroupDecision, LayerDecision, Policy
from zerobit.quant import apply_policy
from zerobit.train.calibrate import calibrate_activations

X = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(5))


def _written(path, sparse: bool) -> torch.Tensor:
    """Write a file of the tiny plain model (sparse layers and codebooks too when `sparse`); its outputs on X."""
    torch.manual_seed(0)
    model = TINY_MODELS["plain"]().eval()
    graph = analyse(model, EXAMPLE)
    groups = {n: GroupDecision((4,) * (g.channels - 2) + ((0, 0) if g.prunable else (4, 4)))
              for n, g in graph.groups.items()}
    layers = {n: LayerDecision(s, c) for n, s, c in zip(graph.layers, (0.5, 0.97, 0.3), (False, True, False),
                                                        strict=True)} if sparse else {}
    policy = Policy(groups, 8, layers=layers)
    q = apply_policy(model, graph, policy, EXAMPLE)
    calibrate_activations(q, [(torch.randn(32, 1, 8, 8), None)])
    save_zbit(q, graph, policy, path)
    with torch.no_grad():
        return q(X)


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "sparse"])
def original(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("zbit") / "m.zbit"
    out = _written(path, request.param)
    return path.read_bytes(), out


def resealed(data: bytes, tmp_path, edit_meta=None, edit_arrays=None) -> str:
    """The file with its metadata/tensors edited and the checksum recomputed, as a forger would."""
    src = tmp_path / "src.zbit"
    src.write_bytes(data)
    meta, arrays = read_container(src)
    if edit_meta:
        edit_meta(meta)
    if edit_arrays:
        edit_arrays(arrays)
    meta["crc32"] = f"{checksum(meta, arrays):08x}"
    out = tmp_path / "forged.zbit"
    out.write_bytes(write_container(meta, arrays))
    return out


def outcome(path, expected: torch.Tensor | None) -> str:
    """'error' for a ZbitFormatError, 'same' when it loads to the written model, 'other' for another model."""
    try:
        model = load(path, TINY_MODELS["plain"]())
    except ZbitFormatError:
        return "error"
    with torch.no_grad():
        return "same" if expected is not None and torch.equal(model(X), expected) else "other"


FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 7)), min_size=1, max_size=4))
def test_bit_flips(tmp_path, original, flips):
    data, out = original
    damaged = bytearray(data)
    for pos, bit in flips:
        damaged[pos % len(data)] ^= 1 << bit
    path = tmp_path / "d.zbit"
    path.write_bytes(bytes(damaged))
    assert outcome(path, out) in ("error", "same")


@FUZZ
@given(st.integers(0, 10**9))
def test_truncation(tmp_path, original, cut):
    data, _ = original
    path = tmp_path / "d.zbit"
    path.write_bytes(data[: cut % len(data)])
    assert outcome(path, None) == "error"


def _json_values():
    leaf = st.one_of(st.integers(-2**70, 2**70), st.text(max_size=12), st.booleans(), st.none(),
                     st.floats(allow_nan=True))
    return st.recursive(leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5),
                        inner, max_size=3), max_leaves=12)


@FUZZ
@given(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "drop", "add"]), _json_values(),
       st.integers(0, 50))
def test_header_edits(tmp_path, original, field, value, which):
    data, out = original
    src = tmp_path / "s.zbit"
    src.write_bytes(data)
    meta, arrays = read_container(src)
    keys = sorted(arrays)
    key = keys[which % len(keys)]

    def edit(header):
        if field == "entry":
            header[key] = value
        elif field == "drop":
            del header[key]
        elif field == "add":
            header["extra"] = {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}
        else:
            header[key][field] = value

    path = tmp_path / "d.zbit"
    path.write_bytes(write_container(meta, arrays, edit))
    assert outcome(path, out) in ("error", "same")


@FUZZ
@given(st.sampled_from(["act_bits", "input_shape", "groups", "ignored", "model", "version", "format", "other"]),
       st.one_of(st.text(max_size=30), _json_values().map(json.dumps)), st.booleans())
def test_metadata_edits(tmp_path, original, field, text, reseal):
    """Any metadata value: the checksum catches it, and when the forger recomputed it, the field checks do."""
    data, out = original

    def edit(meta):
        meta[field] = text

    if reseal:
        path = resealed(data, tmp_path, edit_meta=edit)
        assert outcome(path, out) in ("error", "same", "other")  # a consistent forgery may be another model
    else:
        src = tmp_path / "s.zbit"
        src.write_bytes(data)
        meta, arrays = read_container(src)
        edit(meta)
        path = tmp_path / "d.zbit"
        path.write_bytes(write_container(meta, arrays))
        assert outcome(path, out) in ("error", "same")


@FUZZ
@given(st.integers(0, 50), st.sampled_from(["nan", "inf", "longer", "shorter", "dtype", "zero", "random"]))
def test_tensor_edits_with_recomputed_checksum(tmp_path, original, which, how):
    data, out = original

    def edit(arrays):
        key = sorted(arrays)[which % len(arrays)]
        a = arrays[key]
        if how == "nan" and a.dtype.kind == "f":
            a = a.copy()
            a[0] = np.nan
        elif how == "inf" and a.dtype.kind == "f":
            a = a.copy()
            a[-1] = np.inf
        elif how == "longer":
            a = np.concatenate([a, a[:1]])
        elif how == "shorter":
            a = a[:-1]
        elif how == "dtype":
            a = a.astype(np.float32 if a.dtype != np.float32 else np.float16)
        elif how == "zero":
            a = np.zeros_like(a)
        elif how == "random":
            a = np.random.default_rng(which).integers(0, 256, a.nbytes, dtype=np.uint8).view(a.dtype)
        arrays[key] = a

    path = resealed(data, tmp_path, edit_arrays=edit)
    result = outcome(path, out)
    if how in ("longer", "shorter", "dtype"):
        assert result == "error"
    else:
        assert result in ("error", "same", "other")


def test_one_byte_edit_of_act_bits_is_caught(tmp_path, original):
    data, _ = original
    i = data.index(b'"act_bits":"8"') + len(b'"act_bits":"')
    path = tmp_path / "d.zbit"
    path.write_bytes(data[:i] + b"4" + data[i + 1:])
    with pytest.raises(ZbitFormatError, match="checksum"):
        load(path, TINY_MODELS["plain"]())


@pytest.mark.parametrize("shape", ["1,1,2000,2000", "1,1,100000,100000", "1,-1,8,8", "1", "1,1,8,8,8,8,8,8",
                                   "1,3,8,8", "1,1,5"])
def test_input_shape_is_bounded_before_tracing(tmp_path, original, shape):
    def edit(meta):
        meta["input_shape"] = shape

    path = resealed(original[0], tmp_path, edit_meta=edit)
    with pytest.raises(ZbitFormatError, match="input_shape"):
        load(path, TINY_MODELS["plain"]())


def test_nan_scales_extra_tensor_and_deep_json_are_refused(tmp_path, original):
    data = original[0]

    def nan_scale(arrays):
        arrays["scales"] = arrays["scales"].copy()
        arrays["scales"][3] = np.nan

    with pytest.raises(ZbitFormatError, match="'scales' holds NaN"):
        load(resealed(data, tmp_path, edit_arrays=nan_scale), TINY_MODELS["plain"]())
    with pytest.raises(ZbitFormatError, match="'x.spare'"):
        load(resealed(data, tmp_path, edit_arrays=lambda a: a.update({"x.spare": np.zeros(3, np.float32)})),
             TINY_MODELS["plain"]())
    with pytest.raises(ZbitFormatError, match="groups"):
        load(resealed(data, tmp_path, edit_meta=lambda m: m.update(groups="[" * 100_000 + "]" * 100_000)),
             TINY_MODELS["plain"]())


@pytest.mark.parametrize("path", ["/dev/zero", "fifo", "dir"])
def test_special_files_are_refused_at_once(tmp_path, path):
    if path == "fifo":
        path = tmp_path / "pipe.zbit"
        os.mkfifo(path)
    elif path == "dir":
        path = tmp_path
    with pytest.raises(ZbitFormatError, match="not a regular file"):
        load(path, TINY_MODELS["plain"]())


def test_cli_prints_one_line_for_a_damaged_file(tmp_path):
    path = tmp_path / "bad.zbit"
    path.write_bytes(os.urandom(500))
    run = subprocess.run([sys.executable, "-m", "zerobit.cli", "eval", str(path), "--data", "digits"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "Traceback" not in run.stderr
    assert "bad.zbit" in run.stderr
