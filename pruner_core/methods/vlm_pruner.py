"""VLM-Pruner (the default): pivots, centrifugal selection under BSS, similarity-weighted fusion."""

from __future__ import annotations

import torch

from ..config import PrunerConfig
from ..static import StaticPlan, vlm_pruner_static
from .base import Grid, SelectionMethod, Signals, register_method


def select_vlm_pruner(
    signals: Signals, grid: Grid, budget: int, config: PrunerConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = StaticPlan.build(config, grid.rows, grid.cols, budget, grid.merge)
    return vlm_pruner_static(signals.hidden, signals.keys, config, plan)


VLM_PRUNER = register_method(
    SelectionMethod(
        name="vlm_pruner",
        needs=frozenset({"hidden", "keys"}),
        paper="Wu et al., VLM-Pruner: Buffering for Spatial Sparsity in an Efficient VLM Centrifugal Token "
        "Pruning Paradigm, arXiv 2512.02700",
        select=select_vlm_pruner,
    )
)
