"""Small static-shape helpers shared by the peer methods (no `.item()`, no data-dependent Python, no sort)."""

from __future__ import annotations

import torch

from ..primitives import take_rows


def top_order(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` highest-scoring positions, highest first.  scores [B, N] -> [B, count] int64"""
    return scores.topk(count, dim=-1, largest=True, sorted=True).indices


def ascending(order: torch.Tensor) -> torch.Tensor:
    """Distinct positions in pick order -> the same positions ascending (topk, not aten::sort).  [B, R] -> [B, R]"""
    return order.topk(order.shape[-1], dim=-1, largest=False, sorted=True).values


def unit_rows(features: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit L2 norm, in float32 (zero rows stay zero).  [B, N, C] -> [B, N, C]"""
    features = features.float()
    norm = (features * features).sum(-1, keepdim=True).sqrt().clamp_min(1e-12)  # [B, N, 1]
    return features / norm


def one_hot(index: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """index [B, A] int64 -> [B, A, size] with a 1 at each index."""
    return (index.unsqueeze(-1) == torch.arange(size, device=index.device)).to(dtype)


def mask_of(index: torch.Tensor, size: int) -> torch.Tensor:
    """Boolean [B, size], True at every position listed in index [B, A]."""
    return (index.unsqueeze(-1) == torch.arange(size, device=index.device)).any(1)


def keep_gathered(hidden: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output for methods that keep states unchanged.  hidden [B, N, D], order [B, R] ->
    (indices [B, R] ascending, states [B, R, D] in hidden's dtype, order [B, R])."""
    indices = ascending(order)
    return indices, take_rows(hidden, indices), order
