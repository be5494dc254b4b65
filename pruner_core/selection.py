"""What every selection method returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Selection:
    """Exactly R tokens per batch item.

    indices: [B, R] int64, ascending positions within the N image tokens.
    states:  [B, R, D] the kept hidden states (after fusion, for methods that fuse).
    order:   [B, R] int64, the same tokens in the order the method picked them (pivots first for VLM-Pruner).
    """

    indices: torch.Tensor
    states: torch.Tensor
    order: torch.Tensor

    @property
    def budget(self) -> int:
        return self.indices.shape[1]
