"""Strategies: each turns a Problem into a Policy. Adding one = one file + @register_strategy."""

from zerobit.strategies.admm import ADMM
from zerobit.strategies.ajpq import AJPQ, ActionSpace, ProxyConfig
from zerobit.strategies.base import (
           STRATEGIES,
           Problem,
           SearchResult,
           Strategy,
           get_strategy,
           register_strategy,
)
from zerobit.strategies.opq import OPQ
from zerobit.strategies.sbs import SBS
from zerobit.strategies.sequential import Sequential
from zerobit.strategies.uniform import Uniform

__all__ = ["ADMM", "AJPQ", "ActionSpace", "OPQ", "ProxyConfig", "SBS", "STRATEGIES", "Problem", "SearchResult", "Sequential", "Strategy", "Uniform", "get_strategy",
           "register_strategy"]
