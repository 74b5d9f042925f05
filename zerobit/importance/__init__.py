"""Channel importance criteria: callables (model, graph, group name) -> one score per channel."""

from zerobit.importance.magnitude import Magnitude, group_scores

__all__ = ["Magnitude", "group_scores"]
