"""Write and read .zbit files; reading rebuilds a plain nn.Module of the pruned, dequantized model."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
from safetensors.torch import load as st_load
from torch import nn

from zerobit.export.layout import PACKED_BITS, LayerLayout, decode_positions, layer_layouts
from zerobit.export.zbit import (
    FORMAT_VERSION,
    ZbitFormatError,
    crc_of,
    decode_layer_decisions,
    decode_policy,
    to_bytes,
)
from zerobit.graph import ModelGraph, analyse
from zerobit.policy import FLOAT_BITS, Policy
from zerobit.quant.apply import prune_structure, set_module
from zerobit.quant.modules import ActQuant
from zerobit.quant.pack import packed_bytes, unpack


def save_zbit(qmodel: nn.Module, graph: ModelGraph, policy: Policy, path: str | os.PathLike) -> int:
    """Write the .zbit file of a fake-quant model; returns the bytes written.

    Example:
        >>> # n = save_zbit(result.model, result.graph, result.policy, "small.zbit")
    """
    data = to_bytes(qmodel, graph, policy)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return len(data)


@dataclass
class ZbitFile:
    """A parsed, checksum-verified .zbit file."""

    metadata: dict[str, str]
    blobs: dict[str, torch.Tensor]
    policy: Policy

    @property
    def model_name(self) -> str:
        return self.metadata.get("model", "")

    def full_policy(self, graph: ModelGraph) -> Policy:
        """The policy with its per-layer decisions (their layer names come from the model's graph)."""
        if "ldec" not in self.blobs:
            return self.policy
        return replace(self.policy, layers=decode_layer_decisions(self.blobs["ldec"].numpy(), list(graph.layers)))

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(x) for x in self.metadata["input_shape"].split(","))


def read_zbit(path: str | os.PathLike) -> ZbitFile:
    """Parse and verify a .zbit file.

    Raises:
        ZbitFormatError: if the file is corrupt, truncated or not a .zbit file.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        blobs = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    except Exception as exc:
        raise ZbitFormatError(f"{path} is not a readable .zbit file (corrupt or truncated): {exc}") from exc
    if meta.get("format") != "zbit":
        raise ZbitFormatError(f"{path} is a safetensors file but not a .zbit file")
    if meta.get("version") != FORMAT_VERSION:
        raise ZbitFormatError(f"{path} has .zbit version {meta.get('version')}; this zerobit reads {FORMAT_VERSION}")
    if f"{crc_of(blobs):08x}" != meta.get("crc32"):
        raise ZbitFormatError(f"{path} is corrupt: its checksum does not match its contents")
    try:
        groups = [(n, int(c)) for n, c in json.loads(meta["groups"])]
        policy = decode_policy(blobs["bits"].numpy(), groups, int(meta["act_bits"]))
    except (KeyError, ValueError) as exc:
        raise ZbitFormatError(f"{path} has damaged metadata: {exc}") from exc
    return ZbitFile(meta, blobs, policy)


class _Cursor:
    """Reads consecutive slices of one blob."""

    def __init__(self, blob: torch.Tensor | None) -> None:
        self.data = blob if blob is not None else torch.zeros(0)
        self.pos = 0

    def take(self, n: int) -> torch.Tensor:
        if self.pos + n > self.data.numel():
            raise ZbitFormatError("the file holds fewer values than its policy needs")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out


def _single_width_codes(lay: LayerLayout, cur: dict[str, _Cursor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(codes, mask) of a sparse and/or codebook layer, shaped (C, per)."""
    channels, per, bits = len(lay.kept_bits), lay.weights_per_channel, lay.kept_bits[0]
    values = unpack(cur["codes"].take(packed_bytes(lay.nnz, bits)).numpy(), bits, lay.nnz)
    if lay.codebook:
        values = values + 2 ** (bits - 1)
    if lay.sparsity == 0:
        return torch.from_numpy(values.astype(np.float32)).view(channels, per), None
    raw = cur["pos"].take(lay.position_bytes).numpy()
    mask = torch.from_numpy(decode_positions(raw, channels, per, lay.nnz).astype(bool))
    codes = torch.zeros(channels, per)
    codes[mask] = torch.from_numpy(values.astype(np.float32))
    return codes, mask


def _layer_weight(lay: LayerLayout, cur: dict[str, _Cursor]) -> torch.Tensor:
    """Dequantized (C, per) weight of one layer, decoded exactly as QuantLayer.deploy computes it."""
    bits, per = torch.tensor(lay.kept_bits), lay.weights_per_channel
    mask = None
    if lay.single_width:
        codes, mask = _single_width_codes(lay, cur)
    else:
        codes = torch.zeros(len(bits), per)
        for b in PACKED_BITS:
            sel = bits == b
            n = int(sel.sum())
            if n:
                raw = cur["codes"].take(packed_bytes(n * per, b)).numpy()
                codes[sel] = torch.from_numpy(unpack(raw, b, n * per).astype(np.float32)).view(n, per)
    quantized = bits != FLOAT_BITS
    scale16 = torch.zeros(len(bits), dtype=torch.float16)
    scale16[quantized] = cur["scales"].take(int(quantized.sum()))
    if lay.codebook:
        book16 = cur["books"].take(lay.book_entries)
        weight = book16.float()[codes.long()] * scale16.float().view(-1, 1)
        return weight * mask if mask is not None else weight
    weight = codes * scale16.float().view(-1, 1)
    if bool((~quantized).any()):
        weight[~quantized] = cur["floats"].take(int((~quantized).sum()) * per).view(-1, per)
    return weight


def rebuild(model: nn.Module, zf: ZbitFile, graph: ModelGraph) -> nn.Module:
    """Prune a fresh copy of `model` by the file's policy and load the file's weights into it."""
    zf.policy = zf.full_policy(graph)
    example = torch.zeros(zf.input_shape)
    pruned = prune_structure(model, graph, zf.policy, example)
    cur = {k: _Cursor(zf.blobs.get(k)) for k in ("codes", "scales", "floats", "biases", "act", "pos", "books")}
    for lay in layer_layouts(graph, zf.policy):
        module = pruned.get_submodule(lay.name)
        weight = _layer_weight(lay, cur)
        module.weight = nn.Parameter(weight.view_as(module.weight).contiguous())
        if lay.has_bias:
            module.bias = nn.Parameter(cur["biases"].take(len(lay.kept_bits)).float())
        if graph.layers[lay.name].bn:
            set_module(pruned, graph.layers[lay.name].bn, nn.Identity())
        if zf.policy.act_bits < FLOAT_BITS:
            s = float(cur["act"].take(1))
            set_module(pruned, lay.name, nn.Sequential(ActQuant(zf.policy.act_bits, abs(s), s < 0), module))
    state = pruned.state_dict()
    for key, blob in zf.blobs.items():
        if key.startswith("x."):
            target = state[key[2:]]
            target.copy_(blob.view(target.shape).to(target.dtype))
    return pruned.eval()


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the compressed model stored in `path` as a plain nn.Module (eval mode).

    Args:
        path: a file written by `zerobit.save`.
        model: the original (uncompressed) model object; optional for zoo models, whose name the file holds.

    Example:
        >>> # small = zerobit.load("small.zbit")          # zoo model
        >>> # small = zerobit.load("mine.zbit", MyNet())  # your own architecture, weights come from the file
    """
    zf = read_zbit(path)
    if model is None:
        if not zf.model_name:
            raise ValueError(f"{path} holds a custom model: pass the model object, zerobit.load(path, model)")
        from zerobit import zoo

        model = zoo.build(zf.model_name)
    graph = analyse(model, torch.zeros(zf.input_shape), ignored_layers=json.loads(zf.metadata["ignored"]))
    graph.model_name = zf.model_name
    try:
        zf.policy.validate(graph)
    except ValueError as exc:
        raise ValueError(f"{path} was written for a different model: {exc}") from exc
    return rebuild(model, zf, graph)
