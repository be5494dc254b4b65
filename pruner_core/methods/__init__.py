"""Selection methods behind one interface, registered by name."""

from .base import SIGNALS, Grid, SelectionMethod, Signals, get_method, method_names, register_method
from . import vlm_pruner  # noqa: F401  (registers)
from . import dart, divprune, fastv, grid, random_method, visionzip  # noqa: F401  (register)

__all__ = ["SIGNALS", "Grid", "SelectionMethod", "Signals", "get_method", "method_names", "register_method"]
