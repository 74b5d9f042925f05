"""ONNX export of a .zbit model: pruned widths, QDQ weights from the stored codes, one self-contained file.

The exported graph is the torch exporter's graph of the decoded model, rewritten:
- every stored layer's weight becomes `DequantizeLinear(codes, per-channel scales)`: int8 codes (a b-bit code is
  an exact int8 value), int4 at opset 21 where all of a layer's channels have ≤ 4 bits; layers with float
  channels or a codebook keep float weights (`OnnxReport.layers` says which);
- every quantized layer input becomes `QuantizeLinear → DequantizeLinear` with the file's scale (uint8 after
  ReLUs, int8 where the data is signed);
- mode "fast" (the default) also quantizes, with scales calibrated on `calibration_data`, the tensors the .zbit
  model keeps in float between quantized layers (layer outputs before a residual add, the add's other input),
  so that onnxruntime fuses integer kernels (QLinearConv, QLinearAdd) instead of running float Conv; mode
  "exact" computes what the .zbit model computes and nothing else.
The file is cleaned (no doc strings, metadata or exporter debug data; one- or two-letter names), checked with
`onnx.checker` and written without external data.
"""

from __future__ import annotations

import copy
import itertools
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from zerobit.export.onnx_file import _onnx, clean, export_float
from zerobit.export.onnx_run import calibrate, onnx_session, parity
from zerobit.export.runtime import LayerCodes, decode
from zerobit.policy import FLOAT_BITS

__all__ = ["MODES", "OnnxReport", "export_onnx", "onnx_session", "parity", "weight_format"]

MODES = ("fast", "exact")
LINEAR_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class OnnxReport:
    """What `export_onnx` wrote: its bytes beside the .zbit's, and what each layer became."""

    path: str
    onnx_bytes: int
    zbit_bytes: int
    mode: str
    layers: dict[str, str] = field(default_factory=dict)  # layer → "int8", "int4", "float (codebook)", …
    calibrated: int = 0  # tensors quantized beyond the .zbit model's own (mode "fast")

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for kind in self.layers.values():
            kinds[kind] = kinds.get(kind, 0) + 1
        made = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        return (f"{self.path}: {self.onnx_bytes:,} bytes (the .zbit: {self.zbit_bytes:,}); mode {self.mode}; "
                f"layers: {made}; {self.calibrated} extra activation scales calibrated")


class _Graph:
    """Edits of an ONNX graph: new initializers and nodes, consumers of a value, fresh names."""

    def __init__(self, model, prefix: str = "") -> None:
        self.model = model
        self.graph = model.graph
        self.prefix = prefix  # before the exported model's weight names (a wrapped model's: "model.")
        self.count = itertools.count()
        self.transposed: set[str] = set()  # layers whose weight initializer is Wᵀ (see _layer_nodes)
        self.written: dict[int, tuple[list[str], bool]] = {}  # id(LayerCodes) → its codes' DQ inputs, transposed

    def name(self, hint: str) -> str:
        return f"{hint}__{next(self.count)}"

    def constant(self, hint: str, array: np.ndarray, onnx_type: int | None = None) -> str:
        from onnx import helper, numpy_helper

        name = self.name(hint)
        if onnx_type is None:
            self.graph.initializer.append(numpy_helper.from_array(array, name))
        else:  # int4: two codes per byte, the first in the low nibble
            flat = (array.astype(np.int8).ravel() & 0x0F).astype(np.uint8)
            if flat.size % 2:
                flat = np.append(flat, np.uint8(0))
            packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
            self.graph.initializer.append(helper.make_tensor(name, onnx_type, array.shape, packed, raw=True))
        return name

    def drop_initializer(self, name: str) -> None:
        for i, t in enumerate(self.graph.initializer):
            if t.name == name:
                del self.graph.initializer[i]
                return

    def consumers(self, value: str) -> list:
        return [n for n in self.graph.node if value in n.input]

    def producer(self, value: str):
        return next((n for n in self.graph.node if value in n.output), None)

    def insert_before(self, anchor, nodes: list) -> None:
        """Insert `nodes` just before `anchor` (keeps the node list topologically sorted)."""
        index = list(self.graph.node).index(anchor)
        for offset, node in enumerate(nodes):
            self.graph.node.insert(index + offset, node)

    def qdq(self, value: str, scale: float, signed: bool, anchor) -> str:
        """Quantize-dequantize `value` (per tensor, zero point 0) in front of `anchor`; the new value's name."""
        from onnx import helper

        s = self.constant("s", np.array(scale, dtype=np.float32))
        # uint8 throughout (onnxruntime's fast integer kernels take uint8 activations): signed values are the
        # same integers shifted by a zero point of 128
        zp = self.constant("z", np.array(128 if signed else 0, dtype=np.uint8))
        q, dq = self.name("q"), self.name("dq")
        self.insert_before(anchor, [helper.make_node("QuantizeLinear", [value, s, zp], [q]),
                                    helper.make_node("DequantizeLinear", [q, s, zp], [dq])])
        return dq


def weight_format(bits: list[int] | tuple[int, ...], codebook: bool = False, int4: bool = True) -> str:
    """How a layer's weights are exported, from the bits of its kept channels (one place for the latency table too):
    "int4" (all ≤ 4 bits, opset 21), "int8", "uint8" (8-bit codes, see below), "codebook" or "float"."""
    if codebook:
        return "codebook"
    if FLOAT_BITS in bits:
        return "float"
    top = max(bits)
    # 8-bit codes reach ±127: x86 u8×s8 kernels without VNNI add pairs of products in int16 and saturate
    # (2·255·127 > 32767), so such layers store codes + 128 as uint8 (u8×u8 kernels widen first): same integers
    return "int4" if int4 and top <= 4 else "uint8" if top == 8 else "int8"


def _weight_kind(stored: LayerCodes, int4: bool) -> str:
    kind = weight_format(stored.bits.tolist(), stored.book16 is not None, int4)
    if kind == "codebook":
        return "codebook (uint8 indices, decoded at load)"
    if kind == "float":
        return "float (float channels)"
    if stored.mask is not None:
        kind += f" (sparse, {int((~stored.mask).sum())} zeros stored)"
    return kind


def _weight_input(node) -> int:
    """Which input of a layer's node is its weight: a Gather (embedding lookup) reads its table first."""
    return 0 if node.op_type == "Gather" else 1


def _quantize_weight(g: _Graph, node, layer: str, stored: LayerCodes, kind: str) -> None:
    """Replace `node`'s float weight by DequantizeLinear(codes, scales) with the same values."""
    from onnx import TensorProto, helper, numpy_helper

    weight_name = node.input[_weight_input(node)]
    init = next((t for t in g.graph.initializer if t.name == weight_name), None)
    if init is None:  # one tensor read by several equal layers: already replaced by the first one's codes
        return
    shape = tuple(numpy_helper.to_array(init).shape)
    flip = layer in g.transposed  # the initializer is Wᵀ (in, out): channels along axis 1
    onnx_type = TensorProto.INT4 if kind.startswith("int4") else None
    prior = g.written.get(id(stored))  # a tied weight (zerobit.graph.tied): its codes are in the file already
    if prior is not None and (prior[1] == flip or (onnx_type is None and len(shape) == 2)):
        (q, *inputs), nodes = prior[0], []
        if prior[1] != flip:  # read the other way round (an embedding's table, a MatMul's Wᵀ): transposed codes
            nodes.append(helper.make_node("Transpose", [q], [q := g.name(f"{layer}.qt")], perm=[1, 0]))
        g.drop_initializer(weight_name)
        g.insert_before(node, [*nodes, helper.make_node("DequantizeLinear", [q, *inputs], [weight_name],
                                                        axis=int(flip))])
        return
    codes = _as_stored(stored.codes.numpy(), shape, flip).astype(np.int16)
    if stored.mask is not None:
        codes = codes * _as_stored(stored.mask.numpy(), shape, flip)
    inputs = [g.constant(f"{layer}.s", stored.scale16.float().numpy())]
    if kind.startswith("uint8"):
        codes = codes + 128
        inputs.append(g.constant(f"{layer}.z", np.full(shape[int(flip)], 128, dtype=np.uint8)))
    q = g.constant(f"{layer}.q", codes.astype(np.uint8 if kind.startswith("uint8") else np.int8), onnx_type)
    g.written[id(stored)] = ([q, *inputs], flip)
    g.drop_initializer(weight_name)
    g.insert_before(node, [helper.make_node("DequantizeLinear", [q, *inputs], [weight_name], axis=int(flip))])


def _as_stored(values: np.ndarray, shape: tuple[int, ...], transposed: bool) -> np.ndarray:
    """A layer's per-weight values (stored channel-major) in the layout of its ONNX initializer."""
    return values.reshape(shape[::-1]).T if transposed else values.reshape(shape)


def _codebook_weight(g: _Graph, node, layer: str, stored: LayerCodes) -> None:
    """Replace `node`'s float weight by Gather(centroids, uint8 indices) × per-channel scale: exact, one byte a
    weight (onnxruntime folds it to a float weight when the session starts). Removed weights index a 0 entry."""
    from onnx import TensorProto, helper, numpy_helper

    weight_name = node.input[_weight_input(node)]
    init = next((t for t in g.graph.initializer if t.name == weight_name), None)
    if init is None:  # one tensor read by several equal layers: already replaced by the first one's codes
        return
    shape = tuple(numpy_helper.to_array(init).shape)
    book = np.append(stored.book16.float().numpy(), np.float32(0.0)).astype(np.float32)
    flip = layer in g.transposed
    index = stored.codes.numpy().astype(np.int64)
    if stored.mask is not None:
        index = np.where(stored.mask.numpy(), index, len(book) - 1)
    index = _as_stored(index, shape, flip)
    idx = g.constant(f"{layer}.i", index.astype(np.uint8 if len(book) <= 256 else np.uint16))
    books = g.constant(f"{layer}.b", book)
    per_channel = (1, -1) if flip else (-1,) + (1,) * (len(shape) - 1)
    scale = g.constant(f"{layer}.s", stored.scale16.float().numpy().reshape(per_channel))
    idx32, values = g.name("i32"), g.name("w")
    g.drop_initializer(weight_name)
    g.insert_before(node, [helper.make_node("Cast", [idx], [idx32], to=TensorProto.INT32),
                           helper.make_node("Gather", [books, idx32], [values]),
                           helper.make_node("Mul", [values, scale], [weight_name])])


def _layer_nodes(g: _Graph, layers: Iterable[str], model: nn.Module) -> dict[str, object]:
    """The Conv/Gemm/MatMul node (a Gather for an embedding) whose weight input is each layer's `.weight`
    initializer, or (a Linear on (B, T, C) exports as MatMul with the weight folded to Wᵀ under another name) an
    initializer equal to Wᵀ; the latter are listed in `g.transposed`."""
    from onnx import numpy_helper

    readers: dict[str, list] = {}
    for n in g.graph.node:
        if n.op_type in LINEAR_OPS and len(n.input) > 1:
            readers.setdefault(n.input[1], []).append(n)
        elif n.op_type == "Gather" and n.input:  # an embedding table, looked up by token ids
            readers.setdefault(n.input[0], []).append(n)
    def op_of(name: str) -> tuple[str, ...]:
        return ("Gather",) if isinstance(model.get_submodule(name), nn.Embedding) else LINEAR_OPS

    found = {}
    for name in layers:  # by name; a tied weight has one name, read by a Gather and a MatMul: take the right op
        match = [n for n in readers.get(f"{g.prefix}{name}.weight", ()) if n.op_type in op_of(name)]
        if match:
            found[name] = match[0]
    by_value: dict[bytes, list] = {}  # the exporter stores equal constants once: one tensor, several readers
    for t in g.graph.initializer:
        if t.name in readers and len(t.dims) == 2:
            key = numpy_helper.to_array(t).tobytes() + bytes(str(tuple(t.dims)), "ascii")
            by_value.setdefault(key, []).extend(n for n in readers[t.name] if n not in found.values())
    for name in layers:
        w = model.get_submodule(name).weight.detach().float().numpy()
        if name in found or w.ndim != 2:
            continue
        for flip, value in ((False, w), (True, w.T)):  # a tied table under another layer's name, or Wᵀ
            key = np.ascontiguousarray(value).tobytes() + bytes(str(value.shape), "ascii")
            match = [n for n in by_value.get(key, ()) if n.op_type in op_of(name) and (n.op_type == "MatMul") == flip]
            if match:  # each node once
                found[name] = match[0]
                by_value[key].remove(match[0])
                if flip:
                    g.transposed.add(name)
                break
    return found


def _input_quants(model: nn.Module) -> dict[str, nn.Module]:
    """Layer name → the ActQuant a decoded model runs on that layer's input."""
    return {name: m.input_quant for name, m in model.named_modules()
            if hasattr(m, "input_quant") and m.input_quant.bits < FLOAT_BITS}


def _without_input_quants(model: nn.Module) -> nn.Module:
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if hasattr(m, "input_quant"):
            m._forward_pre_hooks.clear()
            del m.input_quant
    return plain


def _quantize_input(g: _Graph, node, quant: nn.Module, exact: bool) -> str:
    """QDQ on `node`'s data input with the file's scale; values beyond the file's integer range are clipped first
    (below 8 bits always; at 8 bits signed only in mode "exact": int8 reaches −128, the file's codes −127)."""
    from onnx import helper

    bits, scale, signed = quant.bits, float(quant.scale), bool(quant.signed)
    hi = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    value = node.input[0]
    if bits < 8 or (signed and exact):
        lo_name = g.constant("lo", np.array(-hi * scale if signed else 0.0, dtype=np.float32))
        hi_name = g.constant("hi", np.array(hi * scale, dtype=np.float32))
        clipped = g.name("clip")
        g.insert_before(node, [helper.make_node("Clip", [value, lo_name, hi_name], [clipped])])
        value = clipped
    out = g.qdq(value, scale, signed, node)
    node.input[0] = out
    return out


def _fake_quantize_input(g: _Graph, node, quant: nn.Module) -> None:
    """`node`'s data input quantized as the .zbit model does it — Div, Round, Clip, Mul in float32, the very
    operations of `fake_quant_activation` — where a QDQ pair would make onnxruntime requantize a float weight."""
    from onnx import helper

    bits, signed = quant.bits, bool(quant.signed)
    hi = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    scale = g.constant("s", np.array(float(quant.scale), dtype=np.float32))
    lo_name = g.constant("lo", np.array(-hi if signed else 0, dtype=np.float32))
    hi_name = g.constant("hi", np.array(hi, dtype=np.float32))
    names = [g.name("fq") for _ in range(4)]
    g.insert_before(node, [helper.make_node("Div", [node.input[0], scale], [names[0]]),
                           helper.make_node("Round", [names[0]], [names[1]]),
                           helper.make_node("Clip", [names[1], lo_name, hi_name], [names[2]]),
                           helper.make_node("Mul", [names[2], scale], [names[3]])])
    node.input[0] = names[3]


def _share_quantized_inputs(g: _Graph, quantized: dict[str, str]) -> None:
    """Fast mode: consumers of a float value that a layer quantizes (a residual shortcut) read the quantized copy."""
    for raw, dq in quantized.items():
        for node in g.consumers(raw):
            if node.op_type not in ("QuantizeLinear", "Clip"):
                node.input[:] = [dq if v == raw else v for v in node.input]


def _reaches_quantize(g: _Graph, value: str) -> bool:
    """Whether every consumer of `value` (through a Relu) is a QuantizeLinear."""
    consumers = g.consumers(value)
    if len(consumers) == 1 and consumers[0].op_type == "Relu":
        consumers = g.consumers(consumers[0].output[0])
    return bool(consumers) and all(n.op_type == "QuantizeLinear" for n in consumers)


def _float_edges(g: _Graph, layer_nodes: list) -> list[str]:
    """Fast mode: outputs of layers and residual adds that no quantizer follows (after a Relu where there is one)."""
    outputs = {o.name for o in g.graph.output}
    adds = [n for n in g.graph.node if n.op_type == "Add" and all(
        (p := g.producer(v)) is not None and p.op_type in ("DequantizeLinear", *LINEAR_OPS) for v in n.input)]
    edges = []
    for node in [*layer_nodes, *adds]:
        value = node.output[0]
        consumers = g.consumers(value)
        if len(consumers) == 1 and consumers[0].op_type == "Relu":
            value = consumers[0].output[0]
        if value not in outputs and not _reaches_quantize(g, value):
            edges.append(value)
    return edges


def _quantize_edge(g: _Graph, value: str, scale: float, signed: bool) -> None:
    """QDQ right after `value` is produced; every consumer reads the dequantized copy."""
    consumers = g.consumers(value)
    producer = g.producer(value)
    anchor = g.graph.node[list(g.graph.node).index(producer) + 1]
    dq = g.qdq(value, scale, signed, anchor)
    for node in consumers:
        node.input[:] = [dq if v == value else v for v in node.input]


def _source(source, model: nn.Module | None, tmp: Path) -> tuple[Path, nn.Module | None, object, object]:
    """(.zbit path, model object, default calibration data, example input or None) of a CompressResult or a
    .zbit path."""
    from zerobit.api import CompressResult

    if isinstance(source, CompressResult):
        path = tmp / "model.zbit"
        source.save(path)
        return path, model if model is not None else source.original, source.train_data, source.example_inputs
    if isinstance(source, (str, os.PathLike)):
        return Path(source), model, None, None
    raise TypeError(f"export_onnx takes a CompressResult or the path of a .zbit file, not {type(source).__name__}; "
                    "to export a model loaded with zerobit.load, export the .zbit file it came from")


def _check_one_float_input(model: nn.Module | None, exc: Exception) -> None:
    """The exporter traces the model on one float tensor: a model that failed there and looks up token ids in
    embedding tables is refused with what to use instead."""
    tables = [n for n, m in (model.named_modules() if model is not None else ()) if isinstance(m, nn.Embedding)]
    if tables:
        raise ValueError(f"this model looks up token ids in embedding tables ({', '.join(tables[:2])}"
                         f"{', …' if len(tables) > 2 else ''}): pass export_onnx(..., example_inputs=...) an input "
                         "as the model is called (e.g. a tokenizer's output), to trace it and name the file's "
                         "inputs") from exc


def _write_weights(g: _Graph, stored: dict[str, LayerCodes], nodes: dict[str, object],
                   int4: bool) -> dict[str, str]:
    """Every stored layer's weight written into the graph as the file holds it; layer → what it became."""
    kinds = {}
    for layer, codes in stored.items():
        kind = _weight_kind(codes, int4)
        if layer not in nodes and not bool(codes.weight().any()):
            kind = "none (every weight is zero: the exporter folded the layer into its bias)"
        elif layer not in nodes:
            kind = "float (its weight is not a plain Conv/Gemm input in the exported graph)"
        elif kind.startswith("codebook"):
            _codebook_weight(g, nodes[layer], layer, codes)
        elif not kind.startswith("float"):
            _quantize_weight(g, nodes[layer], layer, codes, kind)
        kinds[layer] = kind
    return kinds


def _write_inputs(g: _Graph, decoded: nn.Module, nodes: dict[str, object], kinds: dict[str, str],
                  mode: str) -> dict[str, str]:
    """Every quantized layer input written into the graph; returns float value → its dequantized copy."""
    quantized: dict[str, str] = {}
    for layer, quant in _input_quants(decoded).items():
        # a float weight behind QDQ inputs is requantized to int8 by onnxruntime itself (lossy): such layers
        # (codebooks, float channels) quantize their input with plain float operators it does not fuse
        if layer in nodes and not kinds[layer].startswith(("int", "uint")):
            _fake_quantize_input(g, nodes[layer], quant)
        elif layer in nodes:
            raw = nodes[layer].input[0]
            if mode == "fast" and raw in quantized:  # one quantizer per tensor, or onnxruntime cannot fuse
                nodes[layer].input[0] = quantized[raw]  # its producer (layers reading one tensor were
                continue                                # calibrated on it alike: their scales agree)
            quantized.setdefault(raw, _quantize_input(g, nodes[layer], quant, mode == "exact"))
    return quantized


def _quantize_float_edges(g: _Graph, decoded: nn.Module, nodes: dict, data, max_calibration: int,
                          percentile: float) -> int:
    """Mode "fast": quantize the tensors between quantized layers that the .zbit model keeps in float, with scales
    calibrated on `data`; returns how many."""
    edges = _float_edges(g, [nodes[n] for n in nodes if _input_quants(decoded).get(n) is not None])
    if not edges:
        return 0
    if data is None:
        raise ValueError(f"mode 'fast' quantizes {len(edges)} tensors the .zbit model keeps in float and needs "
                         "calibration_data= (a few hundred inputs) for their scales; or pass mode='exact'")
    for value, (scale, signed) in calibrate(g.model, edges, data, max_calibration, percentile).items():
        _quantize_edge(g, value, scale, signed)
    return len(edges)


def export_onnx(source, path: str | os.PathLike, *, model: nn.Module | None = None, example_inputs=None,
                calibration_data=None, mode: str = "fast", int4: bool = True, max_calibration: int = 512,
                percentile: float = 0.9999) -> OnnxReport:
    """Write the ONNX file of a compressed model: pruned widths, QDQ weights and activations, one file.

    Args:
        source: a `CompressResult`, or the path of a .zbit file (any file ever written can be deployed).
        path: the .onnx file to write.
        model: the original model object (not needed for zoo models or a CompressResult).
        example_inputs: an input as the model is called (a tensor, tuple or dict — e.g. a tokenizer's output for
            a Hugging Face text model, whose token ids then become the file's inputs); needed for models that do
            not take one float tensor (a CompressResult brings its own).
        calibration_data: inputs for the scales mode "fast" adds: a tensor, a TensorData or an iterable of
            batches (default for a CompressResult: its training data). Not needed in mode "exact".
        mode: "fast" (integer kernels in onnxruntime; a few tensors the .zbit keeps in float get 8-bit scales) or
            "exact" (computes exactly what the .zbit model computes; slower in onnxruntime).
        int4: store the codes of layers whose channels all have ≤ 4 bits as int4 (opset 21).
        max_calibration: inputs used for calibration. percentile: of |x| that sets each calibrated scale.

    Example:
        >>> # report = zerobit.export_onnx("small.zbit", "small.onnx", calibration_data=splits.train)
        >>> # print(report.summary())
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    onnx = _onnx()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        zbit_path, model, default_data, example = _source(source, model, tmp)
        example = example_inputs if example_inputs is not None else example
        stored: dict[str, LayerCodes] = {}
        try:
            decoded, zf, _graph = decode(zbit_path, model, example_inputs=example, layer_codes=stored)
        except ValueError as exc:  # ZbitFormatError, UntraceableModelError: traced on a float tensor of zeros
            if example is None:
                _check_one_float_input(model, exc)
            raise
        example = example if example is not None else torch.zeros((1,) + zf.input_shape[1:])
        export_float(_without_input_quants(decoded), example, tmp / "float.onnx")
        g = _Graph(onnx.load(str(tmp / "float.onnx")))
        report = OnnxReport(str(path), 0, zbit_path.stat().st_size, mode)
        nodes = _layer_nodes(g, stored, decoded)
        report.layers = _write_weights(g, stored, nodes, int4)
        quantized = _write_inputs(g, decoded, nodes, report.layers, mode)
        if mode == "fast":
            _share_quantized_inputs(g, quantized)
            data = calibration_data if calibration_data is not None else default_data
            report.calibrated = _quantize_float_edges(g, decoded, nodes, data, max_calibration, percentile)
        final = clean(g.model)
        onnx.checker.check_model(final, full_check=True)
        onnx.save(final, str(path))
    report.onnx_bytes = os.path.getsize(path)
    return report
