"""Tracing: quantizable layers, coupled channel groups, per-layer statistics."""

from zerobit.graph.analysis import (
    ChannelGroup,
    ExtraTensor,
    Layer,
    ModelGraph,
    UntraceableModelError,
    analyse,
    build_dependency_graph,
    fp32_file_bytes,
)

__all__ = ["ChannelGroup", "ExtraTensor", "Layer", "ModelGraph", "UntraceableModelError", "analyse", "build_dependency_graph",
           "fp32_file_bytes"]
