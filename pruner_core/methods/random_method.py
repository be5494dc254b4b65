"""Random: R image tokens drawn uniformly at random, fixed by `config.seed` (a baseline)."""

from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

from ..config import PrunerConfig
from .base import Grid, SelectionMethod, Signals, register_method
from .common import keep_gathered, top_order


def random_scores(seed: int, num_tokens: int) -> torch.Tensor:
    """One uniform score per token from a `torch.Generator` seeded with `seed`.  -> [N] float32 (CPU)

    Drawn eagerly even while torch.export traces the caller: the result is a constant of the graph, fixed by
    (seed, N), so the exported program has no random op and is deterministic.
    """
    generator = torch.Generator().manual_seed(seed)
    with contextlib.ExitStack() as stack:
        # outside any fake / proxy tracing mode the draw is an ordinary eager tensor (no-ops in eager)
        stack.enter_context(unset_fake_temporarily())
        stack.enter_context(disable_proxy_modes_tracing())
        return torch.rand(num_tokens, generator=generator)


def select_random(
    signals: Signals, grid: Grid, budget: int, config: PrunerConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The R tokens of highest seeded random score: a uniformly random R-subset, the same for every item.

    hidden [B, N, D] -> indices [B, R] ascending, states [B, R, D] (unchanged), order [B, R] (descending score).
    """
    hidden = signals.hidden
    batch, num_tokens, _ = hidden.shape
    scores = random_scores(config.seed, num_tokens).to(hidden.device)  # [N]
    order = top_order(scores.unsqueeze(0), budget).expand(batch, budget)  # [B, R]
    return keep_gathered(hidden, order.contiguous())


RANDOM = register_method(
    SelectionMethod(
        name="random",
        needs=frozenset({"hidden"}),
        paper="baseline: uniformly random token subset (seeded)",
        select=select_random,
    )
)
