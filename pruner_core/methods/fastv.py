"""FastV: keep the image tokens the last text token attends to most."""

from __future__ import annotations

import torch

from ..config import PrunerConfig
from .base import Grid, SelectionMethod, Signals, register_method
from .common import keep_gathered, top_order


def select_fastv(
    signals: Signals, grid: Grid, budget: int, config: PrunerConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-R image tokens by `text_attention` (attention of the last text token at layer K-1).

    hidden [B, N, D], text_attention [B, N] -> indices [B, R] ascending, states [B, R, D] (unchanged hidden
    states of the kept tokens), order [B, R] (descending attention).

    Deviation from the paper: none in the selection itself; the caller supplies the head-averaged attention
    row, and the budget is an exact count R rather than FastV's ratio of dropped tokens.
    """
    scores = signals.text_attention.float()  # [B, N]
    order = top_order(scores, budget)  # [B, R]
    return keep_gathered(signals.hidden, order)


FASTV = register_method(
    SelectionMethod(
        name="fastv",
        needs=frozenset({"hidden", "text_attention"}),
        paper="Chen et al., An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration "
        "for Large Vision-Language Models, ECCV 2024 (arXiv 2403.06764)",
        select=select_fastv,
    )
)
