"""Latency of a policy on this machine's onnxruntime, from a per-layer table measured once and cached on disk.

Each layer is timed alone, as `export_onnx` (mode "fast") writes it: uint8 activations quantized in and out, weights
dequantized from their stored format ("int8", "uint8", "int4", or "float" for codebook and float layers). A layer's
time is measured on a grid of kept input × output channels and interpolated bilinearly. A layer's time is that of
its one-layer model minus that of the same call without the layer, the least of `SESSIONS` fresh sessions, each
scaled to the machine's speed when the table began (see `kernel_ms`: a busy moment slows a measurement up to 2×,
one session of the same model runs up to 1.5× slower than another). The grid is
then made monotone (`monotone`), so predictions never fall when channels are added. A policy's latency is the sum of
its layers plus the cost of one runtime call; `zerobit.budget.Latency` scales it to the whole model it is used on
(layers timed alone run faster or slower than in a model). The table lives in `cache_dir()` (one JSON file per CPU,
onnxruntime version, threads and batch), so a machine measures each layer shape once.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zerobit.graph import ModelGraph
from zerobit.policy import FLOAT_BITS, Policy
from zerobit.quant.apply import kept_in_features

GRID_FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 3 / 4)
INPUT_SCALE = 0.02
SESSIONS = 3  # fresh sessions a layer is timed in; the least time is kept
TABLE_VERSION = 4  # bump when what is measured changes: older tables are then measured again


def cache_dir() -> Path:
    """Where latency tables are kept: $ZEROBIT_CACHE/latency, else ~/.cache/zerobit/latency."""
    root = os.environ.get("ZEROBIT_CACHE") or Path.home() / ".cache" / "zerobit"
    return Path(root) / "latency"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_ms(session, feed: dict, reps: int = 7, warmup: int = 2, min_seconds: float = 0.0) -> float:
    """Median wall time of `session.run` on `feed` in milliseconds (one place for every latency measured)."""
    for _ in range(warmup):
        session.run(None, feed)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


@dataclass(frozen=True)
class LayerShape:
    """What decides one layer's time apart from its kept channels."""

    kind: str  # "conv" | "depthwise" | "linear"
    in_full: int
    out_full: int
    kernel: int
    stride: int
    height: int  # output positions: height × width (a Linear: rows per sample)
    width: int
    groups: int

    @classmethod
    def of(cls, graph: ModelGraph, name: str) -> LayerShape:
        layer = graph.layers[name]
        side = math.isqrt(layer.out_area)
        height, width = (side, side) if side * side == layer.out_area else (1, layer.out_area)
        kernel = math.isqrt(layer.kernel_area)
        if kernel * kernel != layer.kernel_area:
            raise ValueError(f"layer {name}: the latency table models square kernels only")
        return cls(layer.kind, layer.in_features, layer.out_channels, kernel, layer.stride, height, width,
                   layer.groups)

    def key(self) -> str:
        return "|".join(str(v) for v in (self.kind, self.in_full, self.out_full, self.kernel, self.stride,
                                         self.height, self.width, self.groups))


# The layer timed beside every measurement (at batch REFERENCE_BATCH, int8 weights, uint8 activations): its time then
# over its time when the table began is how much slower the machine is at that moment.
REFERENCE = LayerShape("conv", 32, 32, 3, 1, 16, 16, 1)
REFERENCE_BATCH = 4


def timed_layers(graph: ModelGraph) -> list[str]:
    """The layers the table times: every Conv2d/Linear. An embedding table's lookup (a Gather of token rows) has
    no entry: its time, like the attention's, is in what `compress` calibrates against whole-model timings."""
    return [name for name, layer in graph.layers.items() if layer.kind != "embedding"]


def grid(channels: int) -> list[int]:
    """Channel counts a layer is timed at: 1, a few fractions, all."""
    return sorted({1, channels} | {max(1, round(channels * f)) for f in GRID_FRACTIONS})


def _layer_model(shape: LayerShape, cin: int, cout: int, weights: str, act: str, batch: int):
    """A one-layer ONNX model as export_onnx writes that layer, with random weights; and its input."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes = [], []
    groups = cout if shape.kind == "depthwise" else shape.groups
    cin = cout if shape.kind == "depthwise" else max(groups, cin // groups * groups)
    if shape.kind == "linear":
        x = rng.uniform(0, 2, (batch * shape.height * shape.width, cin)).astype(np.float32)
        wshape = (cout, cin)
    else:
        x = rng.uniform(0, 2, (batch, cin, shape.height * shape.stride, shape.width * shape.stride))
        x = x.astype(np.float32)
        wshape = (cout, cin // groups, shape.kernel, shape.kernel)

    def constant(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array, name))
        return name

    value = "x"
    if act == "u8":
        s, z = constant("s", np.array(INPUT_SCALE, np.float32)), constant("z", np.array(0, np.uint8))
        nodes += [helper.make_node("QuantizeLinear", ["x", s, z], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", s, z], ["xd"])]
        value = "xd"
    nodes += _weight_nodes(rng.integers(-7, 8, wshape), weights, constant, inits)
    bias = constant("b", np.zeros(cout, np.float32))
    if shape.kind == "linear":
        nodes.append(helper.make_node("Gemm", [value, "w", bias], ["y"], transB=1))
    else:
        pad = shape.kernel // 2
        nodes.append(helper.make_node("Conv", [value, "w", bias], ["y"], strides=[shape.stride] * 2,
                                      pads=[pad] * 4, group=groups))
    nodes.append(helper.make_node("Relu", ["y"], ["r"]))
    out = "r"
    if act == "u8":
        s2, z2 = constant("s2", np.array(0.05, np.float32)), constant("z2", np.array(0, np.uint8))
        nodes += [helper.make_node("QuantizeLinear", ["r", s2, z2], ["rq"]),
                  helper.make_node("DequantizeLinear", ["rq", s2, z2], ["out"])]
        out = "out"
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), x


def _weight_nodes(codes: np.ndarray, weights: str, constant, inits: list) -> list:
    """Nodes that make the layer's float weight "w" from `codes` stored in format `weights` (as export_onnx
    stores them: per-output-channel scales, int4 packed two to a byte), adding their initializers."""
    from onnx import TensorProto, helper

    if weights == "float":
        constant("w", (codes * 0.01).astype(np.float32))
        return []
    scale = constant("ws", np.full(codes.shape[0], 0.01, np.float32))
    if weights == "int4":
        flat = (codes.astype(np.int8).ravel() & 0x0F).astype(np.uint8)
        flat = np.append(flat, np.uint8(0)) if flat.size % 2 else flat
        packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
        inits.append(helper.make_tensor("wq", TensorProto.INT4, codes.shape, packed, raw=True))
        return [helper.make_node("DequantizeLinear", ["wq", scale], ["w"], axis=0)]
    if weights == "uint8":
        constant("wq", (codes + 128).astype(np.uint8))
        zero = constant("wz", np.full(codes.shape[0], 128, np.uint8))
        return [helper.make_node("DequantizeLinear", ["wq", scale, zero], ["w"], axis=0)]
    constant("wq", codes.astype(np.int8))
    return [helper.make_node("DequantizeLinear", ["wq", scale], ["w"], axis=0)]


def _boundary_model(x: np.ndarray, quantized: bool):
    """The parts of a one-layer model that a whole model does not repeat per layer: the call, and with quantized
    activations the input's quantization (in a whole model the layer before delivers uint8)."""
    from onnx import TensorProto, helper, numpy_helper

    inits, nodes = [], [helper.make_node("Identity", ["x"], ["y"])]
    if quantized:
        inits = [numpy_helper.from_array(np.array(INPUT_SCALE, np.float32), "s"),
                 numpy_helper.from_array(np.array(0, np.uint8), "z")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "boundary", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def monotone(ms: np.ndarray) -> np.ndarray:
    """`ms` made non-decreasing along both axes: along each, the midpoint of its running maximum from the start and
    its running minimum from the end (both non-decreasing; a running maximum alone carries every slow outlier to
    all larger widths)."""
    out = np.asarray(ms, dtype=float)
    for axis in (0, 1):
        rising = np.maximum.accumulate(out, axis=axis)
        falling = np.flip(np.minimum.accumulate(np.flip(out, axis), axis=axis), axis)
        out = (rising + falling) / 2
    return out


class LatencyTable:
    """Per-layer latencies (ms) of one machine, onnxruntime version, thread count and batch; cached on disk.

    Example:
        >>> # table = LatencyTable(batch=1, threads=1)
        >>> # table.predict(graph, policy)   # ms; measures (once) the layer shapes it has not seen
    """

    def __init__(self, batch: int = 1, threads: int = 1, path: str | os.PathLike | None = None) -> None:
        import onnxruntime as ort

        if batch < 1 or threads < 0:
            raise ValueError(f"batch must be ≥ 1 and threads ≥ 0, got batch={batch}, threads={threads}")
        self.batch, self.threads = batch, threads
        machine = re.sub(r"[^A-Za-z0-9]+", "-", cpu_name()).strip("-")[:60]
        name = f"v{TABLE_VERSION}_{machine}_ort{ort.__version__}_t{threads}_b{batch}.json"
        self.path = Path(path) if path is not None else cache_dir() / name
        self.entries: dict[str, dict] = {}
        self.overhead: float | None = None
        self.reference_ms: float | None = None  # the REFERENCE layer's time when the table began
        self._reference_run = None
        if self.path.exists():
            try:
                saved = json.loads(self.path.read_text())
                self.entries, self.overhead, self.reference_ms = saved["layers"], saved["overhead_ms"], \
                    saved["reference_ms"]
            except (ValueError, KeyError, TypeError):  # a damaged cache is measured again, not trusted
                self.entries, self.overhead, self.reference_ms = {}, None, None

    def _session(self, model):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def _call_overhead(self) -> float:
        """Time of one runtime call that does (almost) nothing."""
        if self.overhead is None:
            from onnx import TensorProto, helper

            graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "empty",
                                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
            self.overhead = median_ms(self._session(model), {"x": np.zeros(1, np.float32)}, reps=50)
            self.save()
        return self.overhead

    def reference_now(self) -> float:
        """Milliseconds of the REFERENCE layer now, in one session kept for the table's life (its speed then
        changes only with the machine's). The first call sets `reference_ms`, the machine's speed the table is in."""
        if self._reference_run is None:
            model, x = _layer_model(REFERENCE, REFERENCE.in_full, REFERENCE.out_full, "int8", "u8", REFERENCE_BATCH)
            session = self._session(model)
            self._reference_run = lambda: median_ms(session, {"x": x}, reps=7, min_seconds=0.01)
        now = self._reference_run()
        if self.reference_ms is None:
            self.reference_ms = min([now] + [self._reference_run() for _ in range(4)])
        return now

    def kernel_ms(self, model, x: np.ndarray) -> float:
        """Milliseconds a one-layer model spends on its layer: its time minus that of `_boundary_model`, at the
        machine speed of the table (`reference_ms`), the least over `SESSIONS` fresh sessions of both.

        A busy machine slows a measurement for seconds at a time (a layer's cells measured in such a moment came
        out up to 2× slow); each session's time is multiplied by `reference_ms` / the REFERENCE layer's time around
        it, measured just before and after, which halved the error of a table measured beside a busy process.
        One session of a model can also run slower than another of the same model: the least is its own cost.
        (onnxruntime's profiler was tried first: at batch 1 it inflates some kernels several-fold.)
        """
        quantized = any(n.op_type == "QuantizeLinear" and n.input[0] == "x" for n in model.graph.node)
        boundary = _boundary_model(x, quantized)
        times, before = [], self.reference_now()
        for _ in range(SESSIONS):
            cost = median_ms(self._session(model), {"x": x}, reps=7, min_seconds=0.02) - \
                median_ms(self._session(boundary), {"x": x}, reps=7, min_seconds=0.02)
            after = self.reference_now()  # also the next session's "before"
            times.append(cost * self.reference_ms / min(before, after))
            before = after
        return max(0.0, min(times))

    def _measured(self, shape: LayerShape, weights: str, act: str) -> dict:
        key = f"{shape.key()}|{weights}|{act}"
        if key not in self.entries:
            ins = [1] if shape.kind == "depthwise" else grid(shape.in_full)
            outs = grid(shape.out_full)
            ms = np.zeros((len(ins), len(outs)))
            for i, cin in enumerate(ins):
                for j, cout in enumerate(outs):
                    model, x = _layer_model(shape, cin, cout, weights, act, self.batch)
                    ms[i, j] = self.kernel_ms(model, x)
            self.entries[key] = {"in": ins, "out": outs, "ms": monotone(ms).tolist(), "measured": ms.tolist()}
            self.save()
        return self.entries[key]

    def layer_ms(self, shape: LayerShape, cin: int, cout: int, weights: str, act: str) -> float:
        """Milliseconds of one layer with `cin` input and `cout` output channels kept."""
        entry = self._measured(shape, weights, act)
        ms = np.asarray(entry["ms"])
        if len(entry["in"]) == 1:
            return float(np.interp(cout, entry["out"], ms[0]))
        rows = [np.interp(cout, entry["out"], row) for row in ms]
        return float(np.interp(cin, entry["in"], rows))

    def layer_ms_torch(self, shape: LayerShape, cin, cout, weights: str, act: str):
        """`layer_ms` for channel counts that are tensors (SBS's expected kept channels): the same value,
        differentiable in both counts (the table is piecewise linear; below its first grid point, where the value
        stays that of the first point, the first piece's slope carries the gradient)."""
        import torch

        entry = self._measured(shape, weights, act)
        ms = torch.tensor(entry["ms"], dtype=torch.float32)
        rows = [_interp(cout, entry["out"], row) for row in ms]
        return rows[0] if len(entry["in"]) == 1 else _interp(cin, entry["in"], torch.stack(rows))

    def predict(self, graph: ModelGraph, policy: Policy, int4: bool = True) -> float:
        """Milliseconds of one call of the exported model of `policy` (batch `self.batch`)."""
        from zerobit.export.onnx import weight_format

        total = self._call_overhead()
        gone = policy.removed_layers(graph)
        for name in timed_layers(graph):
            if name in gone:  # a group removed whole: its layers do not run
                continue
            layer = graph.layers[name]
            act = "u8" if policy.act_of(name) < FLOAT_BITS else "float"
            bits = policy[layer.out_group].kept_bits()
            fmt = weight_format(bits, policy.layer(name).codebook, int4)
            fmt = "float" if fmt == "codebook" else fmt
            total += self.layer_ms(LayerShape.of(graph, name), kept_in_features(graph, policy, name), len(bits),
                                   fmt, act)
        return total

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"cpu": cpu_name(), "batch": self.batch, "threads": self.threads,
                                   "overhead_ms": self.overhead, "reference_ms": self.reference_ms,
                                   "layers": self.entries}))
        os.replace(tmp, self.path)


def _interp(x, xs: list[int], ys):
    """np.interp(x, xs, ys) for a tensor `x` (or a number) and tensor `ys`, differentiable in both."""
    import torch

    x = torch.as_tensor(x, dtype=torch.float32, device=ys.device)
    if len(xs) == 1:
        return ys[0] + 0 * x
    v = float(x.detach())
    i = min(max(bisect.bisect_right(xs, v) - 1, 0), len(xs) - 2)
    slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
    inside = min(max(v, xs[0]), xs[-1])  # np.interp holds the end values outside the grid
    return ys[i] + slope * (inside - xs[i]) + slope * (x - x.detach())


def export_policy(model, graph: ModelGraph, policy: Policy, example, data, path: str | os.PathLike) -> Path:
    """`policy` applied to `model` and written to `path` exactly as `export_onnx` (mode "fast") writes it, for
    timing. Latency does not depend on the weights' values, so the policy is applied without fine-tuning; `data`
    (its first batches, up to 256 inputs) calibrates the activation scales. `example` is an input as the model is
    called (token ids for a text model)."""
    import tempfile

    from zerobit.data.loaders import batches_of
    from zerobit.export.onnx import export_onnx
    from zerobit.export.runtime import save_zbit
    from zerobit.quant.apply import apply_policy
    from zerobit.train.calibrate import calibrate_activations

    qmodel = apply_policy(model, graph, policy, example).eval()
    calibrate_activations(qmodel, batches_of(data, 256), max_batches=1)
    with tempfile.TemporaryDirectory() as tmp:
        save_zbit(qmodel, graph, policy, f"{tmp}/m.zbit")
        export_onnx(f"{tmp}/m.zbit", path, model=model, example_inputs=example, calibration_data=data,
                    max_calibration=256)
    return Path(path)


def measure_policy(model, graph: ModelGraph, policy: Policy, example, data, batch: int, threads: int,
                   seconds: float = 0.3) -> float:
    """Measured milliseconds of one onnxruntime call (batch `batch`) of `policy` applied to `model` and exported
    by `export_policy`: the median of calls over at least `seconds`."""
    return measure_policies(model, graph, [policy], example, data, batch, threads, seconds, rounds=1)[0]


def measure_policies(model, graph: ModelGraph, policies: list[Policy], example, data, batch: int, threads: int,
                     seconds: float = 0.4, rounds: int = 2) -> list[float]:
    """`measure_policy` of each of `policies`, each exported once and timed `rounds` times in turn (all policies,
    then all again), `seconds` in all: the least of its medians. A busy moment of the machine (seconds long)
    then has to last through every round to slow a policy's time."""
    import tempfile

    from zerobit.export.onnx import onnx_session

    with tempfile.TemporaryDirectory() as tmp:
        sessions = [onnx_session(export_policy(model, graph, p, example, data, f"{tmp}/{i}.onnx"), threads)
                    for i, p in enumerate(policies)]
        feed = _feed(sessions[0], data, batch) if sessions else {}
        best = [math.inf] * len(sessions)
        for _ in range(rounds):
            for i, session in enumerate(sessions):
                best[i] = min(best[i], median_ms(session, feed, reps=9, min_seconds=seconds / rounds))
        return best


def measure_float(model, example, data, batch: int, threads: int) -> float:
    """Measured milliseconds of one onnxruntime call (batch `batch`) of `model` exported in float32."""
    import tempfile

    from zerobit.export.onnx import onnx_session
    from zerobit.export.onnx_file import export_float

    with tempfile.TemporaryDirectory() as tmp:
        export_float(model, example, f"{tmp}/fp32.onnx")
        session = onnx_session(f"{tmp}/fp32.onnx", threads)
        return median_ms(session, _feed(session, data, batch), reps=9, min_seconds=0.3)


def _feed(session, data, batch: int) -> dict[str, np.ndarray]:
    """onnxruntime's feed of `batch` inputs from the data's first batch (its rows repeated when it holds fewer),
    for every input of the session: one image tensor, or a text model's token ids and attention mask."""
    from zerobit.export.onnx_run import feeds

    names = [i.name for i in session.get_inputs()]
    _, first = next(iter(feeds(data, names)), (None, None))
    if first is None:
        raise ValueError("latency is measured on the data's inputs, and the data holds none")
    return {n: np.concatenate([a] * -(-batch // len(a)))[:batch] for n, a in first.items()}
