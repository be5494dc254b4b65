"""The public entry point: `select_tokens`, static-shape and exact-R, for any registered method."""

from __future__ import annotations

import torch

from .config import PrunerConfig
from .methods import Grid, Signals, get_method
from .primitives import placement_lattice
from .selection import Selection
from .validation import check_inputs


def select_tokens(
    hidden: torch.Tensor,
    keys: torch.Tensor | None,
    grid: tuple[int, int],
    config: PrunerConfig | None = None,
    *,
    text_attention: torch.Tensor | None = None,
    cls_attention: torch.Tensor | None = None,
    merge: int = 1,
) -> Selection:
    """Keep exactly R of the N image tokens of each batch item with `config.method` (default VLM-Pruner).

    hidden [B, N, D], keys [B, N, Dk], grid = (rows, cols) with rows * cols == N. merge: patches per image token
    along each side (the vision tower's spatial merge: Qwen2-VL 2, LLaVA-1.5 1), read for ``config.authors_grid``,
    which raises ValueError when merge is 1 (``primitives.placement_lattice``).
    """
    config = config or PrunerConfig()
    method = get_method(config.method)
    rows, cols = check_inputs(
        hidden, keys, grid, text_attention=text_attention, cls_attention=cls_attention,
        needs=method.needs, method=method.name,
    )
    budget = config.budget(hidden.shape[1])
    placement_lattice(rows, cols, merge, config.authors_grid)  # authors_grid on unmerged tokens: refused here
    signals = Signals(hidden=hidden, keys=keys, text_attention=text_attention, cls_attention=cls_attention)
    indices, states, order = method.select(signals, Grid(rows, cols, merge), budget, config)
    return Selection(indices=indices, states=states, order=order)
