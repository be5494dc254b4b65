"""Selection methods behind one interface, registered by name."""

from .base import SIGNALS, Grid, SelectionMethod, Signals, get_method, method_names, register_method
from . import vlm_pruner  # noqa: F401  (registers)

__all__ = ["SIGNALS", "Grid", "SelectionMethod", "Signals", "get_method", "method_names", "register_method"]
