"""The .zbit container: channels removed, weights bit-packed, everything counted in the file's bytes.

A safetensors file (no pickle, nothing executes on load) with a handful of flat blobs, walked layer by layer
in graph order:

- ``codes`` (uint8): for each layer, for each bit-width 2…8 in increasing order, the codes of the kept
  channels with that width, channel after channel, bit-packed and padded to a byte;
- ``scales`` (float16): one per quantized kept channel (BatchNorm folded in);
- ``biases`` (float16): one per kept channel of layers with a bias or folded BatchNorm;
- ``floats`` (float32): folded weights of float (32-bit) channels;
- ``pos`` (uint8): positions of the nonzero weights of sparse layers (see layout.py);
- ``books`` (float16): the centroids of codebook layers (codes index them; scales then hold the BatchNorm);
- ``bits`` (uint8): the policy, one 4-bit code per channel of every group, so a file replays by itself;
- ``act`` (float32): each layer's input scale, negative when the activation is signed (when any layer's
  inputs are quantized);
- ``abits`` (uint8, only with per-layer activation bits): each layer's input bits (32 = float);
- ``ldec`` (int16, only with per-layer decisions): each layer's sparsity in 1/10000, as −1−value for codebooks;
- (a layer that shares an earlier layer's weight — tied weights — stores only its bias there);
- ``x.<name>``: any other parameter or buffer of the model (float32), pruned with the channels it follows, e.g.
  a LayerNorm, a layer-scale, or a BatchNorm no conv precedes; and ``x.<layer>.value``, the constant output of a
  layer whose every input channel is removed (a residual branch removed whole, see zerobit.graph.emptying).

The metadata names the model, its input shape and its channel groups, and holds a CRC-32 of everything that
decides the model (metadata, and every tensor's name, dtype, shape and bytes). Reading is strict (see
container.py and runtime.py): a damaged file is one `ZbitFormatError`. Nothing non-finite is ever written.

`estimate_bytes` builds the same header around empty blobs of the right sizes, so it equals the written size.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import save as st_save
from torch import nn

from zerobit.export.container import ZbitFormatError, checksum
from zerobit.export.layout import PACKED_BITS, LayerLayout, encode_positions, layer_layouts
from zerobit.graph import ModelGraph
from zerobit.policy import ACT_BITS, ALL_BITS, FLOAT_BITS, GroupDecision, LayerDecision, Policy
from zerobit.quant.apply import quant_layers
from zerobit.quant.pack import pack

FORMAT_VERSION = "7"  # 2: the CRC covers the metadata and every tensor's dtype and shape too; 3: biases behind
# quantized inputs decode to the accumulator's grid (quant.modules.grid_bias), as integer runtimes add them;
# 4: layers that share a weight (zerobit.graph.tied) store it once, in one channel group; 5: fused q/k/v
# projections are three layers (zerobit.graph.fused), rotary attention heads one group (zerobit.graph.rotary);
# 6: the q heads of attention with grouped k/v heads are one group, tied across the k/v heads (graph.rotary), and
# nn.MultiheadAttention is three Linears (graph.mha); 7: a group may lose every channel (graph.emptying): its
# layers and its readers store nothing but their place in the per-layer blobs, the readers' constants are x.<name>
READ_VERSIONS = ("1", "2", "3", "4", "5", "6", FORMAT_VERSION)
UNTIED_VERSIONS = ("1", "2", "3")  # files that store tied weights twice
FUSED_VERSIONS = ("1", "2", "3", "4")  # files traced without split q/k/v projections and rotary head groups
V5_ATTENTION_VERSIONS = (*FUSED_VERSIONS, "5")  # files that trace attention as version 5 did (see analyse)
_BIT_CODE = {b: i for i, b in enumerate(ALL_BITS)}

def _metadata(graph: ModelGraph, policy: Policy, crc: int) -> dict[str, str]:
    return {
        "format": "zbit", "version": FORMAT_VERSION, "model": graph.model_name or "",
        "input_shape": ",".join(map(str, graph.input_shape)), "act_bits": str(policy.act_bits),
        "groups": json.dumps([[n, g.channels] for n, g in graph.groups.items()], separators=(",", ":")),
        "ignored": json.dumps(list(graph.ignored), separators=(",", ":")), "crc32": f"{crc:08x}",
    }


def blob_sizes(graph: ModelGraph, policy: Policy) -> dict[str, tuple[torch.dtype, int]]:
    layouts = list(layer_layouts(graph, policy))
    channels = sum(g.channels for g in graph.groups.values())
    sizes = {
        "codes": (torch.uint8, sum(lay.code_bytes for lay in layouts)),
        "scales": (torch.float16, sum(lay.scales for lay in layouts)),
        "biases": (torch.float16, sum(len(lay.kept_bits) for lay in layouts if lay.has_bias)),
        "floats": (torch.float32, sum(lay.floats for lay in layouts)),
        "pos": (torch.uint8, sum(lay.position_bytes for lay in layouts)),
        "books": (torch.float16, sum(lay.book_entries for lay in layouts)),
        "bits": (torch.uint8, (channels + 1) // 2),
        "act": (torch.float32, len(layouts) if policy.quantizes_activations(graph.layers) else 0),
        "abits": (torch.uint8, len(layouts) if policy.act else 0),
        "ldec": (torch.int16, len(layouts) if policy.layers else 0),
    }
    removed = {n: d.channels - d.kept for n, d in policy.groups.items()}
    sizes.update({f"x.{k}": (torch.float32, t.numel(removed)) for k, t in graph.extra_params.items()})
    sizes.update({f"x.{n}.value": (torch.float32, policy[graph.layers[n].out_group].kept)
                  for n in policy.emptied(graph)[1]})  # the constants that readers of removed groups output
    return {k: v for k, v in sizes.items() if v[1] > 0}


def estimate_bytes(graph: ModelGraph, policy: Policy) -> int:
    """Exact bytes of the .zbit file `save` writes for `policy` (every tensor counted as the pruned model has it).

    Example:
        >>> # estimate_bytes(graph, policy) == os.path.getsize("model.zbit")
    """
    return safetensors_bytes(_metadata(graph, policy, 0), blob_sizes(graph, policy))


# safetensors writes the metadata keys sorted, then the tensors by dtype (widest first: its dtype order,
# descending) and by name, as compact JSON padded with spaces to 8 bytes; the data follows in that order
_SAFETENSORS_DTYPES = {torch.float32: ("F32", 3), torch.float16: ("F16", 2), torch.int16: ("I16", 1),
                       torch.uint8: ("U8", 0)}


def safetensors_bytes(meta: dict[str, str], sizes: dict[str, tuple[torch.dtype, int]]) -> int:
    """Bytes of the safetensors file of 1-D tensors of these (dtype, elements) with this metadata, without
    building it (a large model's file would be hundreds of MB per estimate)."""
    header: dict = {"__metadata__": dict(sorted(meta.items()))}
    offset = 0
    for name, (dtype, n) in sorted(sizes.items(), key=lambda kv: (-_SAFETENSORS_DTYPES[kv[1][0]][1], kv[0])):
        end = offset + n * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype][0], "shape": [n], "data_offsets": [offset, end]}
        offset = end
    text = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    return 8 + text + (-text % 8) + offset


def _bits_blob(policy: Policy) -> np.ndarray:
    codes = np.array([_BIT_CODE[b] for d in policy.groups.values() for b in d.bits], dtype=np.uint8)
    if len(codes) % 2:
        codes = np.append(codes, 0)
    return (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)


def _ldec_blob(graph: ModelGraph, policy: Policy) -> torch.Tensor:
    values = []
    for name in graph.layers:
        d = policy.layer(name)
        v = int(round(d.sparsity * 10000))
        values.append(-1 - v if d.codebook else v)
    return torch.tensor(values, dtype=torch.int16)


def decode_layer_decisions(ldec: np.ndarray, layer_names: list[str]) -> dict[str, LayerDecision]:
    """Per-layer decisions from a file's ``ldec`` blob."""
    if len(ldec) != len(layer_names):
        raise ZbitFormatError("the per-layer decisions stored in the file do not match the model's layers")
    out = {}
    for name, v in zip(layer_names, ldec.tolist(), strict=True):
        codebook = v < 0
        sparsity = (-1 - v) if codebook else v
        if not 0 <= sparsity < 10000:
            raise ZbitFormatError(f"layer {name!r}: the stored sparsity {sparsity / 100:.2f}% is impossible")
        out[name] = LayerDecision(sparsity / 10000, codebook)
    return out


def decode_act_bits(abits: np.ndarray, layer_names: list[str]) -> dict[str, int]:
    """Per-layer activation bits from a file's ``abits`` blob."""
    if len(abits) != len(layer_names):
        raise ZbitFormatError("the per-layer activation bits stored in the file do not match the model's layers")
    bad = sorted({int(b) for b in abits.tolist()} - set(ACT_BITS))
    if bad:
        raise ZbitFormatError(f"the file stores activation bits {bad}; zerobit writes {ACT_BITS}")
    return {name: int(b) for name, b in zip(layer_names, abits.tolist(), strict=True)}


def decode_policy(bits_blob: np.ndarray, groups: list[tuple[str, int]], act_bits: int,
                  layers: dict[str, LayerDecision] | None = None) -> Policy:
    """The Policy stored in a file's ``bits`` blob (plus its per-layer decisions)."""
    codes = np.stack([bits_blob & 15, bits_blob >> 4], axis=1).ravel()
    if len(codes) < sum(c for _, c in groups) or codes.max(initial=0) >= len(ALL_BITS):
        raise ZbitFormatError("the policy stored in the file is damaged")
    decisions, pos = {}, 0
    for name, channels in groups:
        decisions[name] = GroupDecision(tuple(ALL_BITS[int(c)] for c in codes[pos:pos + channels]))
        pos += channels
    return Policy(decisions, act_bits, layers=layers or {})


DTYPES_BY_TORCH = {torch.uint8: np.dtype("u1"), torch.int16: np.dtype("<i2"), torch.float16: np.dtype("<f2"),
                   torch.float32: np.dtype("<f4")}
LAYER_BLOBS = ("codes", "scales", "floats", "biases", "pos", "books")
BLOB_DTYPES = {"codes": np.uint8, "scales": np.float16, "floats": np.float32, "biases": np.float16,
               "pos": np.uint8, "books": np.float16, "bits": np.uint8, "act": np.float32, "ldec": np.int16,
               "abits": np.uint8}


def _single_width_codes(q: nn.Module, lay: LayerLayout, codes: torch.Tensor, out: dict) -> None:
    """Codes of a sparse and/or codebook layer: nonzeros only (positions coded apart), one bit-width."""
    bits = lay.kept_bits[0]
    if q.mask is not None:
        mask = q.mask.flatten(1).numpy().astype(np.int64)
        if int(mask.sum()) != lay.nnz:
            raise RuntimeError(f"layer {lay.name!r} keeps {int(mask.sum())} weights, its policy {lay.nnz}")
        out["pos"].append(encode_positions(mask))
        values = codes.numpy()[mask.astype(bool)]
    else:
        values = codes.numpy().ravel()
    offset = 2 ** (bits - 1) if lay.codebook else 0  # centroid indices 0…2^b−1 → signed range
    out["codes"].append(pack(values.astype(np.int64) - offset, bits))


def _check_finite(name: str, q: nn.Module) -> None:
    """Refuse to write a layer whose stored numbers are not finite (a diverged fine-tune, a float16 overflow)."""
    bad = q.non_finite_parts()
    if bad:
        raise ValueError(f"layer {name!r}: its {' and '.join(bad)} are not finite (NaN, infinity or a zero scale), "
                         "so no file was written. The fine-tune diverged (lower FinetuneConfig.lr), a folded "
                         "BatchNorm overflows float16 (check its running_var), or activations were not calibrated.")


def _layer_blobs(q: nn.Module, lay: LayerLayout) -> dict[str, list[np.ndarray]]:
    _check_finite(lay.name, q)
    d = q.deploy()
    if lay.shared:  # its weight is stored with the layer it shares it with
        return {"biases": [d.bias.numpy()]} if d.bias is not None else {}
    flat_codes = d.codes.flatten(1)
    if flat_codes.shape[1] != lay.weights_per_channel:
        raise RuntimeError(f"layer {lay.name!r} has {flat_codes.shape[1]} weights per channel, layout expects "
                           f"{lay.weights_per_channel}")
    out: dict[str, list[np.ndarray]] = {k: [] for k in LAYER_BLOBS}
    if lay.single_width:
        _single_width_codes(q, lay, flat_codes, out)
    else:
        for b in PACKED_BITS:
            sel = q.bits == b
            if bool(sel.any()):
                out["codes"].append(pack(flat_codes[sel].reshape(-1).numpy().astype(np.int64), b))
    quantized = q.bits != FLOAT_BITS
    out["scales"].append(d.scale[quantized].numpy())
    out["floats"].append(d.weight.flatten(1)[~quantized].reshape(-1).numpy().astype(np.float32))
    if d.bias is not None:
        out["biases"].append(d.bias.numpy())
    if d.book is not None:
        out["books"].append(d.book.numpy())
    return out


def container_tensors(qmodel: nn.Module, graph: ModelGraph, policy: Policy) -> dict[str, torch.Tensor]:
    """The blobs of the file for a fake-quant model made by `apply_policy(model, graph, policy)`."""
    layers = quant_layers(qmodel)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in LAYER_BLOBS}
    act = []
    for lay in layer_layouts(graph, policy):
        if lay.removed:  # its group is gone whole: only its place in the per-layer blobs
            act.append(1.0)
            continue
        q = layers[lay.name]
        for key, arrays in _layer_blobs(q, lay).items():
            parts[key].extend(arrays)
        act.append(float(q.act.scale) * (-1.0 if bool(q.act.signed) else 1.0))
    blobs = {k: torch.from_numpy(np.concatenate(v).astype(BLOB_DTYPES[k]) if v else np.zeros(0, BLOB_DTYPES[k]))
             for k, v in parts.items()}
    blobs["bits"] = torch.from_numpy(_bits_blob(policy))
    blobs["act"] = torch.tensor(act, dtype=torch.float32) if policy.quantizes_activations(graph.layers) \
        else torch.zeros(0)
    blobs["abits"] = torch.tensor([policy.act_of(n) for n in graph.layers], dtype=torch.uint8) if policy.act \
        else torch.zeros(0)
    blobs["ldec"] = _ldec_blob(graph, policy) if policy.layers else torch.zeros(0)
    quant_keys = {f"{n}.{k}" for n, q in layers.items() for k in q.state_dict()}
    for key, value in qmodel.state_dict().items():
        if key not in quant_keys:
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{key!r} is not finite (NaN or infinity), so no file was written")
            blobs[f"x.{key}"] = value.detach().float().contiguous().reshape(-1)
    return {k: v for k, v in blobs.items() if v.numel() > 0}


def to_bytes(qmodel: nn.Module, graph: ModelGraph, policy: Policy) -> bytes:
    """The .zbit file content of an applied, fine-tuned fake-quant model."""
    blobs = container_tensors(qmodel, graph, policy)
    meta = _metadata(graph, policy, 0)
    meta["crc32"] = f"{checksum(meta, {k: v.numpy() for k, v in blobs.items()}):08x}"
    return st_save(blobs, metadata=meta)
