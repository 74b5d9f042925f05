"""Run exported ONNX files in onnxruntime: sessions, calibration of the scales mode "fast" adds, and parity with
the .zbit model (see zerobit.export.onnx)."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

CALIBRATION_BATCH = 64


def feeds(data, names: list[str]) -> Iterator[tuple[object, dict[str, np.ndarray]]]:
    """(the model's inputs, onnxruntime's feed by input name) per batch of a tensor, a TensorData, or an iterable
    of batches: tensors, (inputs, labels) pairs, or dicts of keyword inputs (a tokenizer's output)."""
    from zerobit.task import DEFAULT_TASK

    def array(t: torch.Tensor) -> np.ndarray:
        return (t.float() if t.is_floating_point() else t).detach().cpu().numpy()

    if isinstance(data, torch.Tensor) or hasattr(data, "x"):
        whole = data if isinstance(data, torch.Tensor) else data.x
        batches = (whole[i:i + CALIBRATION_BATCH] for i in range(0, len(whole), CALIBRATION_BATCH))
    else:
        batches = (DEFAULT_TASK.inputs(batch) for batch in data)
    for x in batches:
        if isinstance(x, torch.Tensor):
            yield x, {names[0]: array(x)}
        elif isinstance(x, dict):
            missing = [n for n in names if n not in x]
            if missing:
                raise ValueError(f"the data's batches lack the model's inputs {missing} (they hold {sorted(x)})")
            yield x, {n: array(x[n]) for n in names}
        else:
            yield x, {n: array(v) for n, v in zip(names, x, strict=False)}


def calibrate(model, values: list[str], data, max_samples: int, percentile: float) -> dict[str, tuple[float, bool]]:
    """(scale, signed) of each value: a high percentile of |x| over the calibration inputs, run in onnxruntime."""
    import onnxruntime as ort
    from onnx import helper

    probe = copy.deepcopy(model)
    probe.graph.output.extend([helper.make_empty_tensor_value_info(v) for v in values])
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    seen: dict[str, list[np.ndarray]] = {v: [] for v in values}
    count = 0
    for _, feed in feeds(data, names):
        for v, out in zip(values, session.run(values, feed), strict=True):
            seen[v].append(out.ravel()[:: max(1, out.size // 200_000)])
        count += len(feed[names[0]])
        if count >= max_samples:
            break
    if count == 0:
        raise ValueError("calibration_data holds no inputs")
    found = {}
    for v in values:
        sample = np.concatenate(seen[v])
        signed = bool((sample < 0).any())
        amax = max(float(np.quantile(np.abs(sample), percentile)), 1e-8)
        found[v] = (amax / (127 if signed else 255), signed)
    return found


def onnx_session(path: str | os.PathLike, threads: int = 0, optimize: bool = True):
    """An onnxruntime CPU session of `path` (threads 0 = onnxruntime's default; optimize=False: graph as written)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError("running ONNX files needs onnxruntime: pip install 'zerobit[onnx]'") from exc
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def parity(path: str | os.PathLike, reference: nn.Module, data, max_samples: int | None = None,
           optimize: bool = True, threads: int = 0) -> dict[str, float]:
    """Compare onnxruntime's outputs of `path` with `reference` (e.g. the model `zerobit.load` rebuilds).

    In mode "exact" the file computes what the .zbit model computes, to float rounding, with onnxruntime's
    optimizations (the default, as deployed: fused integer kernels) or without (`optimize=False`, the graph as
    written); in mode "fast" the tensors it quantizes beyond the .zbit model's make the difference.

    `threads`: onnxruntime's threads (0 = its default, every core).

    Returns {"agreement": share of equal argmax (per example; per token for a language model's logits),
    "max_abs_diff": largest logit difference, "samples": n}.
    """
    from zerobit.device import move
    from zerobit.task import call, main_output

    session = onnx_session(path, threads, optimize)
    names = [i.name for i in session.get_inputs()]
    reference = reference.cpu().eval()
    same, positions, total, worst = 0, 0, 0, 0.0
    for x, feed in feeds(data, names):
        theirs = main_output(call(reference, move(x, torch.device("cpu")))).float().numpy()
        outputs = session.run(None, feed)  # the output the reference's main output is: the first of its shape
        ours = next((o for o in outputs if o.shape == theirs.shape), outputs[0])
        agree = ours.argmax(-1) == theirs.argmax(-1)  # per example, or per token of a language model
        same, positions = same + int(agree.sum()), positions + agree.size
        worst = max(worst, float(np.abs(ours - theirs).max()))
        total += len(feed[names[0]])
        if max_samples is not None and total >= max_samples:
            break
    return {"agreement": same / max(positions, 1), "max_abs_diff": worst, "samples": total}
