"""One self-contained ONNX file from a torch model, and the lossless clean-up every file zerobit writes gets."""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import itertools
import logging
import os
import string
import warnings
from collections.abc import Iterator

import torch
from torch import nn

OPSET = 21


def _onnx():
    try:
        import onnx
    except ImportError as exc:  # an optional dependency
        raise ImportError("ONNX export needs onnx and onnxscript: pip install 'zerobit[onnx]'") from exc
    return onnx



@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the torch exporter's progress prints and warnings."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = logging.root.manager.disable  # the caller's own level comes back, not NOTSET
        logging.disable(max(before, logging.WARNING))
        try:
            yield
        finally:
            logging.disable(before)


def export_float(model: nn.Module, example, path: str | os.PathLike) -> None:
    """One self-contained opset-21 ONNX file of `model` (CPU, eval) with a dynamic batch dimension.

    `example` is an input as the model is called: a tensor (input "x"), a tuple, or a dict of keyword inputs
    (e.g. a tokenizer's output: inputs named by their keys; the second dimension of integer inputs, the sequence,
    is dynamic too)."""
    from zerobit.device import move

    _onnx()
    example = move(example, torch.device("cpu"))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")

    def dims(t):
        dynamic = {0: batch}
        if not t.is_floating_point() and t.dim() >= 2:
            dynamic[1] = seq
        return dynamic

    params = inspect.signature(model.forward).parameters
    star = {p.kind: name for name, p in params.items()}  # a forward(*args, **kwargs) takes shapes under its names
    if isinstance(example, torch.Tensor):
        args, kwargs, shapes, names = (example,), {}, ({0: batch},), {"input_names": ["x"]}
    elif isinstance(example, dict):
        args, kwargs, names = (), dict(example), {}
        shapes = {k: dims(v) if isinstance(v, torch.Tensor) else None for k, v in example.items()}
        if inspect.Parameter.VAR_KEYWORD in star and not set(shapes) <= set(params):
            shapes = {star[inspect.Parameter.VAR_KEYWORD]: shapes}
    else:
        args, kwargs, names = tuple(example), {}, {}
        shapes = tuple(dims(v) if isinstance(v, torch.Tensor) else None for v in args)
        if inspect.Parameter.VAR_POSITIONAL in star:
            shapes = {star[inspect.Parameter.VAR_POSITIONAL]: shapes}
    config = getattr(model, "config", None)
    cached = bool(getattr(config, "use_cache", False))  # torch.export cannot return a Hugging Face cache object,
    try:  # and a deployed classifier or language model's logits have no use for it: off while exporting
        if cached:
            config.use_cache = False
        with quiet():
            torch.onnx.export(model.cpu().eval(), args, str(path), kwargs=kwargs, dynamo=True, external_data=False,
                              output_names=["y"], opset_version=OPSET, dynamic_shapes=shapes, **names)
    except Exception as exc:  # the exporter raises many types; the user needs one clear message
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        summary = [line for i, line in enumerate(lines) if i and lines[i - 1] == "## Exception summary"]
        first = (summary or lines or [type(exc).__name__])[0]
        raise ValueError(f"torch.onnx.export could not export {type(model).__name__}: {first[:300]}. The model "
                         "must run under torch.export (no data-dependent Python control flow on tensor values); "
                         "the .zbit file itself still loads with zerobit.load") from exc
    finally:
        if cached:
            config.use_cache = True


def _toposort(graph) -> None:
    """Order the nodes so each comes after the producers of its inputs (graph surgery that gives several readers
    of a tensor one quantized copy may leave a reader, e.g. a Shape node, before that copy's nodes)."""
    nodes = list(graph.node)
    produced_by = {out: i for i, n in enumerate(nodes) for out in n.output}
    order, state = [], [0] * len(nodes)  # 0 unvisited, 1 on the stack, 2 placed
    for start in range(len(nodes)):
        stack = [(start, iter(nodes[start].input))]
        while stack:
            i, inputs = stack[-1]
            if state[i] == 2:
                stack.pop()
                continue
            state[i] = 1
            dep = next((produced_by[v] for v in inputs if v in produced_by and state[produced_by[v]] == 0), None)
            if dep is not None:
                stack.append((dep, iter(nodes[dep].input)))
                continue
            if not any(v in produced_by and state[produced_by[v]] == 0 for v in nodes[i].input):
                state[i] = 2
                order.append(nodes[i])
                stack.pop()
    if [id(n) for n in order] != [id(n) for n in nodes]:
        graph.ClearField("node")
        graph.node.extend(order)


def clean(model):
    """A lossless smaller copy of an ONNX model: the same nodes and tensors, without doc strings, metadata,
    producer fields or inner shape hints, every inner value renamed to one or two letters (the graph's inputs and
    outputs keep their names) and nodes left unnamed.

    Tensors kept in typed fields are stored raw instead (same values), so a file's size depends on shapes only.
    """
    from onnx import numpy_helper

    out = copy.deepcopy(model)
    _toposort(out.graph)
    for name in ("producer_name", "producer_version", "domain", "model_version", "doc_string", "metadata_props"):
        out.ClearField(name)
    graph = out.graph
    graph.name = "g"
    kept = {v.name for v in itertools.chain(graph.input, graph.output)}  # the names callers feed and fetch
    short = ("".join(c) for n in itertools.count(1) for c in itertools.product(string.ascii_letters, repeat=n)
             if "".join(c) not in kept)
    renamed: dict[str, str] = {"": ""} | {name: name for name in kept}  # "" (an omitted optional input) stays ""

    def rename(name: str) -> str:
        if name not in renamed:
            renamed[name] = next(short)
        return renamed[name]

    for proto in itertools.chain([graph], graph.input, graph.initializer, graph.node, graph.output):
        for name in ("doc_string", "metadata_props"):
            if name in proto.DESCRIPTOR.fields_by_name:
                proto.ClearField(name)
    graph.ClearField("value_info")
    for tensor in graph.initializer:
        if not tensor.raw_data and tensor.data_location == tensor.DEFAULT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
    for value in itertools.chain(graph.input, graph.initializer):
        value.name = rename(value.name)
    for node in graph.node:
        node.ClearField("name")
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    for value in graph.output:
        value.name = rename(value.name)
    return out
