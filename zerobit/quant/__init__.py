"""Quantizers, fake-quant layers, bit packing and policy application."""

from zerobit.quant.apply import apply_policy, prune_structure, quant_layers, set_policy_bits
from zerobit.quant.modules import ActQuant, QuantLayer

__all__ = ["ActQuant", "QuantLayer", "apply_policy", "prune_structure", "quant_layers", "set_policy_bits"]
