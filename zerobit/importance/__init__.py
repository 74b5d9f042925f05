"""Channel importance criteria: callables (model, graph, group name) -> one score per channel."""

from zerobit.importance.fisher import Fisher, fisher_scores
from zerobit.importance.magnitude import Magnitude, group_scores

__all__ = ["Fisher", "Magnitude", "fisher_scores", "group_scores"]
