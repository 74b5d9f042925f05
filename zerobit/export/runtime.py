"""Write and read .zbit files; reading rebuilds a plain nn.Module of the pruned, dequantized model."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from zerobit.device import DeviceLike, model_device, move, resolve
from zerobit.export.container import (
    MAX_SAMPLE_ELEMENTS,
    Header,
    ZbitFormatError,
    check_metadata,
    checksum,
    checksum_v1,
    read_container,
)
from zerobit.export.layout import PACKED_BITS, LayerLayout, decode_positions, layer_layouts
from zerobit.export.zbit import (
    BLOB_DTYPES,
    DTYPES_BY_TORCH,
    FUSED_VERSIONS,
    READ_VERSIONS,
    UNTIED_VERSIONS,
    V5_ATTENTION_VERSIONS,
    blob_sizes,
    decode_act_bits,
    decode_layer_decisions,
    decode_policy,
    to_bytes,
)
from zerobit.graph import ModelGraph, analyse
from zerobit.graph.analysis import input_shape
from zerobit.graph.linears import linearized
from zerobit.policy import FLOAT_BITS, Policy
from zerobit.quant.apply import prune_structure, set_module
from zerobit.quant.modules import ActQuant, attach_input_quant, grid_bias
from zerobit.quant.pack import packed_bytes, unpack


def save_zbit(qmodel: nn.Module, graph: ModelGraph, policy: Policy, path: str | os.PathLike) -> int:
    """Write the .zbit file of a fake-quant model (on any device; what is written is computed on the CPU);
    returns the bytes written.

    Example:
        >>> # n = save_zbit(result.model, result.graph, result.policy, "small.zbit")
    """
    if model_device(qmodel).type != "cpu":
        qmodel = copy.deepcopy(qmodel).cpu()
    data = to_bytes(qmodel, graph, policy)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return len(data)


@dataclass
class ZbitFile:
    """A parsed, checksum-verified .zbit file (metadata fields checked; tensors checked against a model later)."""

    metadata: dict[str, str]
    blobs: dict[str, torch.Tensor]
    policy: Policy
    header: Header

    @property
    def model_name(self) -> str:
        return self.header.model

    def full_policy(self, graph: ModelGraph) -> Policy:
        """The policy with its per-layer decisions (their layer names come from the model's graph)."""
        policy = self.policy
        if "ldec" in self.blobs:
            policy = replace(policy, layers=decode_layer_decisions(self.blobs["ldec"].numpy(), list(graph.layers)))
        if "abits" in self.blobs:
            policy = replace(policy, act=decode_act_bits(self.blobs["abits"].numpy(), list(graph.layers)))
        return policy

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.header.input_shape


def read_zbit(path: str | os.PathLike, max_input_elements: int | None = MAX_SAMPLE_ELEMENTS) -> ZbitFile:
    """Parse and verify a .zbit file: container, checksum, and every metadata field with its bounds.

    Raises:
        ZbitFormatError: if the file is corrupt, truncated, edited or not a .zbit file.
    """
    meta, arrays = read_container(path)
    if meta.get("format") != "zbit":
        raise ZbitFormatError(f"{path} is a safetensors file but not a .zbit file")
    version = meta.get("version")
    if version not in READ_VERSIONS:
        raise ZbitFormatError(f"{path} has .zbit version {str(version)[:20]!r}; this zerobit reads "
                              f"{', '.join(READ_VERSIONS)}")
    crc = checksum(meta, arrays) if version != "1" else checksum_v1(arrays)
    if f"{crc:08x}" != meta.get("crc32"):
        raise ZbitFormatError(f"{path} is corrupt: its checksum does not match its contents")
    header = check_metadata(meta, path, max_input_elements)
    for key, a in arrays.items():
        want = BLOB_DTYPES.get(key, np.float32 if key.startswith("x.") else None)
        if want is None or a.dtype != want:
            raise ZbitFormatError(f"{path} is damaged: tensor {key!r} ({a.dtype}) is not one a .zbit file holds")
    blobs = {k: torch.from_numpy(v) for k, v in arrays.items()}
    if "bits" not in blobs:
        raise ZbitFormatError(f"{path} is damaged: it holds no policy")
    policy = decode_policy(blobs["bits"].numpy(), header.groups, header.act_bits)
    return ZbitFile(meta, blobs, policy, header)


def check_blobs(zf: ZbitFile, graph: ModelGraph, policy: Policy) -> None:
    """Every tensor of the file has the name, dtype and length `policy` needs on `graph`, and finite values."""
    expected = {k: (DTYPES_BY_TORCH[dt], n) for k, (dt, n) in blob_sizes(graph, policy).items()}
    for key in sorted(set(zf.blobs) | set(expected)):
        if key not in expected:
            raise ZbitFormatError(f"the file holds a tensor {key!r} that the model does not have")
        if key not in zf.blobs:
            raise ZbitFormatError(f"the file lacks the tensor {key!r} of {expected[key][1]} values")
        blob, (dtype, n) = zf.blobs[key].numpy(), expected[key]
        if blob.dtype != dtype or blob.size != n:
            raise ZbitFormatError(f"tensor {key!r} holds {blob.size} {blob.dtype} values; the policy needs "
                                  f"{n} {dtype}")
        if blob.dtype.kind == "f" and not np.isfinite(blob).all():
            raise ZbitFormatError(f"tensor {key!r} holds NaN or infinity")
    if "act" in zf.blobs and bool((zf.blobs["act"] == 0).any()):
        raise ZbitFormatError("tensor 'act' holds an activation scale of 0")


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


@dataclass
class LayerCodes:
    """One layer as the file stores it: integer codes, float16 scales, and what decodes them."""

    codes: torch.Tensor  # (C, per) integer-valued float32; a codebook layer's centroid indices
    scale16: torch.Tensor  # (C,) float16; 0 for float channels (a codebook layer: the folded BatchNorm multiplier)
    bits: torch.Tensor  # (C,) bits of each kept channel (32 = float)
    mask: torch.Tensor | None = None  # (C, per) bool, unstructured sparsity
    book16: torch.Tensor | None = None  # (2^b,) float16 centroids of a codebook layer
    floats: torch.Tensor | None = None  # (channels at 32 bits, per) float32 weights

    def weight(self) -> torch.Tensor:
        """The dequantized (C, per) weight, exactly as QuantLayer.deploy computes it."""
        scale = self.scale16.float().view(-1, 1)
        if self.book16 is not None:
            weight = self.book16.float()[self.codes.long()] * scale
            return weight * self.mask if self.mask is not None else weight
        weight = self.codes * scale
        if self.floats is not None:
            weight[self.bits == FLOAT_BITS] = self.floats
        return weight


def _layer_codes(lay: LayerLayout, cur: dict[str, _Cursor]) -> LayerCodes:
    """Read one layer's codes, scales and float channels from the file's blobs."""
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
        return LayerCodes(codes, scale16, bits, mask, cur["books"].take(lay.book_entries))
    floats = None
    if bool((~quantized).any()):
        floats = cur["floats"].take(int((~quantized).sum()) * per).view(-1, per)
    return LayerCodes(codes, scale16, bits, mask, None, floats)


def rebuild(model: nn.Module, zf: ZbitFile, graph: ModelGraph, policy: Policy,
            layer_codes: dict[str, LayerCodes] | None = None, example_inputs: Any = None) -> nn.Module:
    """Prune a fresh copy of `model` by the file's policy and load the file's weights into it.

    Layers keep their own class (a Conv2d stays a Conv2d, so model code reading its attributes still works);
    activation quantizers are attached as `input_quant` submodules run by a forward pre-hook. When
    `layer_codes` is a dict, it receives every layer's codes as stored (for exporters).
    """
    example = example_inputs if example_inputs is not None else torch.zeros((1,) + zf.input_shape[1:])
    pruned = prune_structure(model, graph, policy, example)
    cur = {k: _Cursor(zf.blobs.get(k)) for k in ("codes", "scales", "floats", "biases", "act", "pos", "books")}
    grid = zf.header.version not in ("1", "2")  # older files decode their biases as stored
    read: dict[str, LayerCodes] = {}
    for lay in layer_layouts(graph, policy):
        if lay.removed:  # its group is gone whole (a reader's constant is read with the extra tensors)
            if "act" in zf.blobs:
                cur["act"].take(1)
            continue
        module = pruned.get_submodule(lay.name)
        owner = graph.layers[lay.name].shares
        stored = read[lay.name] = read[owner] if owner else _layer_codes(lay, cur)
        if layer_codes is not None:
            layer_codes[lay.name] = stored
        if owner:  # tied weights: one Parameter, as in the original model
            module.weight = pruned.get_submodule(owner).weight
        else:
            module.weight = nn.Parameter(stored.weight().view_as(module.weight).contiguous())
        bias = cur["biases"].take(len(lay.kept_bits)).float() if lay.has_bias else None
        if graph.layers[lay.name].bn:
            set_module(pruned, graph.layers[lay.name].bn, nn.Identity())
        if "act" in zf.blobs:
            s, bits = float(cur["act"].take(1)), policy.act_of(lay.name)
            # an Embedding's inputs are token ids: kept as they are
            if bits < FLOAT_BITS and graph.layers[lay.name].kind != "embedding":
                quant = ActQuant(bits, abs(s), s < 0)
                attach_input_quant(module, quant)
                if bias is not None and grid and stored.book16 is None and stored.floats is None:
                    bias = grid_bias(bias, quant.scale, stored.scale16)
        if bias is not None:
            module.bias = nn.Parameter(bias)
    state = pruned.state_dict()
    for key, blob in zf.blobs.items():
        if key.startswith("x."):
            target = state[key[2:]]
            target.copy_(blob.view(target.shape).to(target.dtype))
    return pruned.eval()


def load(path: str | os.PathLike, model: nn.Module | None = None, example_inputs: Any = None,
         device: DeviceLike = "cpu") -> nn.Module:
    """Rebuild the compressed model stored in `path` as a plain nn.Module (eval mode).

    Works inside ``torch.no_grad()`` and ``torch.inference_mode()``. Every part of the file is checked against
    the model before it is used: a damaged file raises one `ZbitFormatError`.

    Args:
        path: a file written by `zerobit.save`.
        model: the original (uncompressed) model object; optional for zoo models, whose name the file holds.
        example_inputs: an input like the one compressed with (a tensor, tuple or dict, as the model is called);
            needed when the model does not take one float tensor (e.g. token ids, or a dict for a Hugging Face
            model), and when one sample has more than 2^18 elements (a file's metadata alone is not trusted to
            size the tracing). Without it the model is traced on zeros of the stored input shape.
        device: where the rebuilt model lives ("cpu", "cuda", "cuda:N", "auto"); the file is decoded on the CPU.

    Example:
        >>> # small = zerobit.load("small.zbit")          # zoo model
        >>> # small = zerobit.load("mine.zbit", MyNet())  # your own architecture, weights come from the file
    """
    target = resolve(device)  # a bad name fails before any work
    return decode(path, model, example_inputs)[0].to(target)


def decode(path: str | os.PathLike, model: nn.Module | None = None, example_inputs: Any = None,
           layer_codes: dict[str, LayerCodes] | None = None) -> tuple[nn.Module, ZbitFile, ModelGraph]:
    """`load` on the CPU, also returning the parsed file and the model's graph (`layer_codes` as in `rebuild`)."""
    zf = read_zbit(path, None if example_inputs is not None else MAX_SAMPLE_ELEMENTS)
    if example_inputs is not None:
        example_inputs = move(example_inputs, torch.device("cpu"))
        if input_shape(example_inputs)[1:] != zf.input_shape[1:]:
            raise ZbitFormatError(f"{path} was written for inputs of shape {zf.input_shape[1:]} per sample, "
                                  f"example_inputs has {input_shape(example_inputs)[1:]}")
    if model is None:
        model = _zoo_model(path, zf)
    elif model_device(model).type != "cpu":  # decoded on the CPU; the caller's model stays where it is
        model = copy.deepcopy(model).cpu()
    model = linearized(model, split=zf.header.version not in FUSED_VERSIONS,
                       attention=zf.header.version not in V5_ATTENTION_VERSIONS)  # as it was compressed
    with torch.inference_mode(False), torch.enable_grad():  # tracing needs autograd
        graph = _graph_of(path, model, zf, example_inputs)
        try:
            policy = zf.full_policy(graph)
            policy.validate(graph)
            check_blobs(zf, graph, policy)
            loaded = rebuild(model, zf, graph, policy, layer_codes, example_inputs)
        except (ValueError, RuntimeError, IndexError) as exc:  # ZbitFormatError is a ValueError
            raise ZbitFormatError(f"{path} is damaged: {exc}") from exc
    zf.policy = policy
    return loaded, zf, graph


def _zoo_model(path: str | os.PathLike, zf: ZbitFile) -> nn.Module:
    from zerobit import zoo

    if not zf.model_name:
        raise ValueError(f"{path} holds a custom model: pass the model object, zerobit.load(path, model)")
    if zf.model_name not in zoo.names():
        raise ZbitFormatError(f"{path} names the model {zf.model_name!r}, which is not in the zoo "
                              f"({', '.join(zoo.names())}); pass the model object")
    want = tuple(zoo.example_input(zf.model_name).shape[1:])
    if zf.input_shape[1:] != want:
        raise ZbitFormatError(f"{path} is damaged: {zf.model_name} takes inputs of shape {want}, the file says "
                              f"{zf.input_shape[1:]}")
    return zoo.build(zf.model_name)


def _graph_of(path: str | os.PathLike, model: nn.Module, zf: ZbitFile, example_inputs: Any = None) -> ModelGraph:
    """The model's graph, traced as it was when the file was written; a different model is refused."""
    example = example_inputs if example_inputs is not None else torch.zeros((1,) + zf.input_shape[1:])
    try:
        graph = analyse(model, example, ignored_layers=zf.header.ignored,
                        tied=zf.header.version not in UNTIED_VERSIONS, split=zf.header.version not in FUSED_VERSIONS,
                        attention=zf.header.version not in V5_ATTENTION_VERSIONS)
    except ValueError as exc:  # the model ran when the file was written: its input shape or names do not fit
        hint = "" if example_inputs is not None else (" If the model does not take one float tensor (token ids, a "
                                                       "dict of inputs), pass example_inputs= to zerobit.load.")
        raise ZbitFormatError(f"{path} was written for a different model, or its input_shape "
                              f"{zf.input_shape} is damaged: {exc}{hint}") from exc
    graph.model_name = zf.model_name
    mine = [(n, g.channels) for n, g in graph.groups.items()]
    if mine != zf.header.groups:
        missing = sorted(set(zf.header.groups) - set(mine))[:3]
        extra = sorted(set(mine) - set(zf.header.groups))[:3]
        raise ZbitFormatError(f"{path} was written for a different model: the file's channel groups "
                              f"{missing} are not the model's {extra}; pass the model object it was written from")
    return graph
