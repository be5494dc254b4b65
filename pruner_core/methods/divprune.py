"""DivPrune: max-min diversity (greedy farthest-point selection) in cosine distance."""

from __future__ import annotations

import torch
from torch._higher_order_ops.scan import scan

from ..config import PrunerConfig
from ..primitives import take_rows
from .base import Grid, SelectionMethod, Signals, register_method
from .common import keep_gathered, one_hot, unit_rows


def cosine_distance(hidden: torch.Tensor) -> torch.Tensor:
    """1 - cos(h_i, h_j) in float32.  [B, N, D] -> [B, N, N]"""
    unit = unit_rows(hidden)  # [B, N, D]
    return 1.0 - unit @ unit.transpose(1, 2)


def first_point(distance: torch.Tensor) -> torch.Tensor:
    """The token whose nearest other token is farthest (the authors' first pick).  [B, N, N] -> [B]

    The authors take the second-smallest entry of each column (the smallest being the token itself); here the
    diagonal is pushed above every real distance (which lie in [0, 2]) instead: the same nearest-neighbour
    distance, without relying on the self-distance being the column's minimum.  With N = 1 the only token wins.
    """
    num_tokens = distance.shape[-1]
    position = torch.arange(num_tokens, device=distance.device)  # [N]
    # (not torch.eye: its ExecuTorch decomposition uses a uint16 arange that the edge verifier rejects)
    eye = (position.unsqueeze(0) == position.unsqueeze(1)).to(distance.dtype)  # [N, N]
    nearest = (distance + 4.0 * eye).amin(-1)  # [B, N] distance to the nearest other token
    return nearest.argmax(-1)  # [B]


def farthest_point_step(
    distance: torch.Tensor, taken: torch.Tensor, nearest: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One max-min step: the unselected token farthest from the selected set (argmax, first index on ties).

    distance [B, N, N], taken [B, N] bool, nearest [B, N] (distance to the selected set)
    -> (choice [B], taken [B, N], nearest [B, N]) after adding the choice.
    """
    num_tokens = distance.shape[-1]
    score = torch.where(taken, torch.full_like(nearest, -1.0), nearest)  # [B, N] distances lie in [0, 2]
    choice = score.argmax(-1)  # [B]
    taken = taken | one_hot(choice.unsqueeze(1), num_tokens, torch.bool).squeeze(1)
    nearest = torch.minimum(nearest, take_rows(distance, choice.unsqueeze(1)).squeeze(1))
    return choice, taken, nearest


def farthest_point_order(distance: torch.Tensor, budget: int, use_scan: bool | None = None) -> torch.Tensor:
    """Greedy max-min selection in R - 1 fixed steps.  distance [B, N, N] -> order [B, R] (pick order)

    use_scan: run the steps as one `scan` (default while tracing for export: a small graph that lowers fast) or
    as a Python loop of fixed trip count (default in eager).  Both run the same step, so they pick the same tokens.
    """
    num_tokens = distance.shape[-1]
    first = first_point(distance)  # [B]
    if budget == 1:
        return first.unsqueeze(1)
    taken = one_hot(first.unsqueeze(1), num_tokens, torch.bool).squeeze(1)  # [B, N]
    nearest = take_rows(distance, first.unsqueeze(1)).squeeze(1)  # [B, N] distance to the selected set
    if use_scan is None:
        use_scan = torch.compiler.is_compiling()
    if use_scan:

        def body(carry: tuple[torch.Tensor, torch.Tensor], step: torch.Tensor):
            choice, taken, nearest = farthest_point_step(distance, *carry)
            # scan bodies must not return aliases of their inputs
            return (taken.clone(), nearest.clone()), choice.clone()

        steps = torch.arange(budget - 1, device=distance.device)
        _, picks = scan(body, (taken, nearest), steps)  # picks [R - 1, B]
        rest = picks.transpose(0, 1)  # [B, R - 1]
    else:
        chosen = []
        for _ in range(budget - 1):
            choice, taken, nearest = farthest_point_step(distance, taken, nearest)
            chosen.append(choice)
        rest = torch.stack(chosen, dim=1)  # [B, R - 1]
    return torch.cat([first.unsqueeze(1), rest], dim=1)  # [B, R]


def select_divprune(
    signals: Signals, grid: Grid, budget: int, config: PrunerConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Max-min diverse subset of the hidden states (projector outputs in the paper) under cosine distance.

    hidden [B, N, D] -> indices [B, R] ascending, states [B, R, D] (unchanged), order [B, R] (pick order).

    Deviations: the authors' loop lets an already-selected token win a step when every remaining token is at
    distance 0 (duplicates); here selected tokens are masked, so the R tokens are always distinct.  The authors
    keep round(ratio * N) tokens; here R comes from `config.keep`.
    """
    distance = cosine_distance(signals.hidden)  # [B, N, N]
    order = farthest_point_order(distance, budget)  # [B, R]
    return keep_gathered(signals.hidden, order)


DIVPRUNE = register_method(
    SelectionMethod(
        name="divprune",
        needs=frozenset({"hidden"}),
        paper="Alvar et al., DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models, "
        "CVPR 2025 (arXiv 2503.02175)",
        select=select_divprune,
    )
)
