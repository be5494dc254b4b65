"""DART: keep pivots and the tokens that duplicate them least."""

from __future__ import annotations

import torch

from ..config import PrunerConfig
from ..primitives import key_l1_norm, take_rows
from .base import Grid, SelectionMethod, Signals, register_method
from .common import keep_gathered, mask_of, top_order, unit_rows


def pivot_similarity(hidden: torch.Tensor, pivots: torch.Tensor) -> torch.Tensor:
    """max over pivots p of cos(h_i, h_p), float32.  hidden [B, N, D], pivots [B, P] -> [B, N]"""
    unit = unit_rows(hidden)  # [B, N, D]
    pivot_unit = take_rows(unit, pivots)  # [B, P, D]
    return (unit @ pivot_unit.transpose(1, 2)).amax(-1)  # [B, N]


def dart_order(hidden: torch.Tensor, keys: torch.Tensor, budget: int, pivot_count: int) -> torch.Tensor:
    """Pivots (top-P key L1 norm, highest first), then the R - P non-pivots of lowest max cosine similarity to
    any pivot (least similar first).  hidden [B, N, D], keys [B, N, Dk] -> order [B, R]"""
    num_tokens = hidden.shape[1]
    pivots = top_order(key_l1_norm(keys.float()), pivot_count)  # [B, P]
    if budget == pivot_count:
        return pivots
    similarity = pivot_similarity(hidden, pivots)  # [B, N]
    is_pivot = mask_of(pivots, num_tokens)  # [B, N]
    # pivots score above every cosine (<= 1) so they are never picked twice
    similarity = torch.where(is_pivot, torch.full_like(similarity, 3.0), similarity)
    rest = similarity.topk(budget - pivot_count, dim=-1, largest=False, sorted=True).indices  # [B, R - P]
    return torch.cat([pivots, rest], dim=1)  # [B, R]


def select_dart(
    signals: Signals, grid: Grid, budget: int, config: PrunerConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Duplication-aware selection, exact R.

    hidden [B, N, D], keys [B, N, Dk] -> indices [B, R] ascending, states [B, R, D] (unchanged),
    order [B, R] (pivots by descending key L1 norm, then non-pivots by ascending max similarity).

    P = min(config.pivots, R) pivots are the image tokens of largest key L1 norm; the other R - P kept tokens
    are those whose maximum cosine similarity (on hidden states) to any pivot is lowest.

    Deviations from the authors' code: (1) only image tokens are available, so there are no text pivots;
    (2) the authors take, pivot by pivot, a fixed share of the budget (about R / #pivots) of the tokens least
    similar to that pivot among those not yet taken, and keep the union with the pivots (the count need not be
    R); here the non-pivots are ranked once by their
    maximum similarity to any pivot and exactly R tokens are kept; (3) the authors compare hidden states after
    the LLM's final norm; here the hidden states are compared as given (cosine ignores the per-token RMS scale
    but not the norm's per-channel weight).
    """
    pivot_count = min(config.pivots, budget)
    order = dart_order(signals.hidden, signals.keys, budget, pivot_count)  # [B, R]
    return keep_gathered(signals.hidden, order)


DART = register_method(
    SelectionMethod(
        name="dart",
        needs=frozenset({"hidden", "keys"}),
        paper="Wen et al., Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters "
        "More, arXiv 2502.11494 (2025)",
        select=select_dart,
    )
)
