"""VLM-Pruner core: token selection as pure tensor functions (no model code, no export code)."""

from .api import select_tokens
from .config import Keep, PrunerConfig, num_rounds, round_threshold
from .methods import Grid, SelectionMethod, Signals, get_method, method_names, register_method
from .reference import select_tokens_reference
from .selection import Selection

__all__ = [
    "Grid",
    "Keep",
    "PrunerConfig",
    "Selection",
    "SelectionMethod",
    "Signals",
    "get_method",
    "method_names",
    "num_rounds",
    "register_method",
    "round_threshold",
    "select_tokens",
    "select_tokens_reference",
]
