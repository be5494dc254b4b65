"""VisionZip: dominant tokens by [CLS] attention plus contextual tokens merged from the rest."""

from __future__ import annotations

import torch

from ..config import PrunerConfig
from ..primitives import take_rows
from .base import Grid, SelectionMethod, Signals, register_method
from .common import mask_of, one_hot, top_order, unit_rows

# The authors' LLaVA-1.5 split at a 64-token budget is 54 dominant + 10 contextual: keep that ratio.
DOMINANT_FRACTION = 54.0 / 64.0


def split_budget(budget: int) -> tuple[int, int]:
    """(dominant, contextual) counts for a budget R: round(R * 54/64) dominant, at least 1."""
    dominant = max(1, min(budget, round(budget * DOMINANT_FRACTION)))
    return dominant, budget - dominant


def remaining_ascending(dominant: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The N - Dn non-dominant positions, ascending.  dominant [B, Dn] -> [B, N - Dn]"""
    position = torch.arange(num_tokens, device=dominant.device, dtype=torch.float32)  # [N]
    key = position + num_tokens * mask_of(dominant, num_tokens).to(torch.float32)  # [B, N] dominant last
    rest = num_tokens - dominant.shape[1]
    return key.topk(rest, dim=-1, largest=False, sorted=True).indices  # [B, N - Dn]


def target_slots(remaining: int, contextual: int) -> list[int]:
    """Uniformly spaced positions in the remaining list (the authors' step = max(1, remaining // C))."""
    step = max(1, remaining // contextual)
    return list(range(0, remaining, step))[:contextual]


def contextual_states(
    hidden: torch.Tensor, features: torch.Tensor, merged: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Each target's state = mean of itself and the merged tokens most similar to it.

    hidden [B, N, D], features [B, N, C] (unit rows), merged [B, N] bool, targets [B, T] -> [B, T, D] float32
    """
    num_targets = targets.shape[1]
    similarity = features @ take_rows(features, targets).transpose(1, 2)  # [B, N, T]
    assign = one_hot(similarity.argmax(-1), num_targets, torch.float32)  # [B, N, T]
    assign = assign * merged.unsqueeze(-1).to(torch.float32)  # only merged tokens join a group
    hidden32 = hidden.float()
    total = take_rows(hidden32, targets) + assign.transpose(1, 2) @ hidden32  # [B, T, D]
    count = 1.0 + assign.sum(1)  # [B, T]
    return total / count.unsqueeze(-1)


def select_visionzip(
    signals: Signals, grid: Grid, budget: int, config: PrunerConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dominant + contextual tokens, exact R.

    hidden [B, N, D], cls_attention [B, N], keys [B, N, Dk] optional -> indices [B, R] ascending,
    states [B, R, D], order [B, R] (dominant by descending [CLS] attention, then contextual targets).

    Dominant: the Dn = round(R * 54/64) (>= 1) tokens of highest [CLS] attention, states unchanged.
    Contextual: of the remaining tokens (ascending position), C = R - Dn uniformly spaced targets; every other
    remaining token joins its most cosine-similar target (on keys when given, else on hidden states); a
    target's state is the mean of its group (itself included), its position is the target's.

    Deviations: the authors' released code emits target + mean(merged tokens) (not a mean of the whole group,
    and twice the scale when a group is non-empty); here the group mean keeps states on the scale of the
    inputs.  The authors also keep the [CLS] token among the dominant ones; here only the N image tokens exist.
    """
    hidden = signals.hidden
    num_tokens = hidden.shape[1]
    dominant_count, contextual_count = split_budget(budget)
    dominant = top_order(signals.cls_attention.float(), dominant_count)  # [B, Dn]
    if contextual_count == 0:
        order, states = dominant, take_rows(hidden, dominant)
    else:
        remaining = remaining_ascending(dominant, num_tokens)  # [B, N - Dn]
        slots = torch.tensor(target_slots(remaining.shape[1], contextual_count), device=hidden.device)  # [C]
        targets = remaining.index_select(1, slots)  # [B, C]
        merged = ~(mask_of(dominant, num_tokens) | mask_of(targets, num_tokens))  # [B, N]
        source = signals.keys if signals.keys is not None else hidden
        context = contextual_states(hidden, unit_rows(source), merged, targets)  # [B, C, D]
        order = torch.cat([dominant, targets], dim=1)  # [B, R]
        states = torch.cat([take_rows(hidden, dominant), context.to(hidden.dtype)], dim=1)  # [B, R, D]
    indices, position = order.topk(budget, dim=-1, largest=False, sorted=True)  # [B, R] each, ascending
    return indices, take_rows(states, position), order


VISIONZIP = register_method(
    SelectionMethod(
        name="visionzip",
        needs=frozenset({"hidden", "cls_attention"}),
        paper="Yang et al., VisionZip: Longer is Better but Not Necessary in Vision Language Models, CVPR 2025 "
        "(arXiv 2412.04467)",
        select=select_visionzip,
    )
)
