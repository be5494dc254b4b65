"""VLM-Pruner in static-shape form: fixed-size tensors and a fixed number of masked steps.

Export-friendly: no `.item()`, no Python branching on data, no `aten::sort`, tensor indexing only through
gather-style ops.  The data-dependent walk over chunks becomes one `scan` of *events*: each step either accepts the
first chunk (of the current round, at or after the walk's position) that accepts anything, or ends the round.  Chunks
the walk skips accept nothing against the current S, so skipping them changes nothing; every event adds a token or
ends a round, hence at most (R - pivots) + (rounds - 1) steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch._higher_order_ops.scan import scan

from .config import PrunerConfig, num_rounds, round_threshold
from .primitives import (
    bss_redundancy,
    grid_diameter,
    grid_distance,
    grid_positions,
    key_distance,
    key_l1_norm,
    key_sq_norm,
    placement_lattice,
    similarity_for,
    similarity_weighted_fusion,
    stable_argsort,
    stable_rank,
    take_rows,
)


@dataclass(frozen=True)
class StaticPlan:
    """Everything about the run that is fixed by shapes and config (Python ints and floats only)."""

    rows: int
    cols: int
    budget: int  # R
    pivots: int  # min(kappa, R)
    chunk: int  # B
    strength: float  # lambda
    thresholds: tuple[float, ...]  # tau_r for every round
    beta: float
    lattice: tuple[int, int] | None = None  # (rows, cols) the tokens are placed on (placement_lattice); None: grid

    @property
    def lattice_cols(self) -> int:
        return (self.lattice or (self.rows, self.cols))[1]

    @property
    def diameter(self) -> float:
        return grid_diameter(*(self.lattice or (self.rows, self.cols)))

    @property
    def steps(self) -> int:
        return self.budget - self.pivots + len(self.thresholds) - 1

    @classmethod
    def build(cls, config: PrunerConfig, rows: int, cols: int, budget: int, merge: int = 1) -> "StaticPlan":
        """merge: patches per image token along each side (Qwen2-VL 2, LLaVA 1); read for config.authors_grid."""
        rounds = num_rounds(config)
        return cls(
            rows=rows,
            cols=cols,
            budget=budget,
            pivots=min(config.pivots, budget),
            chunk=config.chunk,
            strength=config.bss_lambda,
            thresholds=tuple(round_threshold(config, r) for r in range(rounds)),
            beta=config.fusion_beta,
            lattice=placement_lattice(rows, cols, merge, config.authors_grid),
        )


def one_hot_any(index: torch.Tensor, mask: torch.Tensor, size: int) -> torch.Tensor:
    """Boolean [B, size] marking index[b, a] wherever mask[b, a].  index/mask [B, A]"""
    hits = index.unsqueeze(-1) == torch.arange(size, device=index.device)  # [B, A, size]
    return (hits & mask.unsqueeze(-1)).any(1)


def static_pivots(keys: torch.Tensor, count: int) -> torch.Tensor:
    """Stage 1: p1 = argmax ||K||_1, then `count - 1` farthest-point steps.  keys [B, N, Dk] -> [B, count]"""
    batch, num_tokens, _ = keys.shape
    sq_norm = key_sq_norm(keys)  # [B, N]
    first = key_l1_norm(keys).argmax(-1)  # [B]
    pivots = [first]
    taken = one_hot_any(first.unsqueeze(1), torch.ones_like(first.unsqueeze(1), dtype=torch.bool), num_tokens)
    nearest = key_distance(keys, sq_norm, first)  # [B, N]
    for _ in range(count - 1):
        choice = torch.where(taken, torch.full_like(nearest, -1.0), nearest).argmax(-1)  # [B]
        pivots.append(choice)
        taken = taken | one_hot_any(choice.unsqueeze(1), torch.ones_like(taken[:, :1]), num_tokens)
        nearest = torch.minimum(nearest, key_distance(keys, sq_norm, choice))
    return torch.stack(pivots, dim=1)


def _first_true(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dim, or its size when none.  [B, N] -> [B]"""
    size = mask.shape[-1]
    position = torch.arange(size, device=mask.device)
    return torch.where(mask, position, torch.full_like(position, size)).amin(-1)


def centrifugal_step(
    carry: tuple[torch.Tensor, ...],
    similarity: torch.Tensor,
    positions: torch.Tensor,
    thresholds: torch.Tensor,
    plan: StaticPlan,
) -> tuple[torch.Tensor, ...]:
    """One event of Stage 2 (accept the next accepting chunk, or end the round), masked per batch item.

    carry: selected [B, N] bool, count [B], max_sim [B, N], min_dist [B, N], order [B, N] (round order: token at
    each position), candidates [B], cursor [B] (next position of the walk), first [B] bool (the round's first chunk
    is pending), round [B], new_round [B] bool, picked [B, R] (tokens in the order selected).
    """
    selected, count, max_sim, min_dist, order, candidates, cursor, first, round_, new_round, picked = carry
    batch, num_tokens = selected.shape
    budget, chunk = plan.budget, plan.chunk
    device = selected.device
    position = torch.arange(num_tokens, device=device)
    active = count < budget  # [B]
    redundancy = bss_redundancy(max_sim, min_dist, plan.strength)  # [B, N]

    # Round start: re-sort the unselected candidates, least redundant first (stable, no aten::sort).
    start = new_round & active
    fresh_order = stable_argsort(torch.where(selected, torch.full_like(redundancy, float("inf")), redundancy))
    order = torch.where(start.unsqueeze(1), fresh_order, order)
    candidates = torch.where(start, num_tokens - count, candidates)
    cursor = torch.where(start, torch.zeros_like(cursor), cursor)
    first = first | start
    round_ = round_ + start.long()
    tau = thresholds.gather(0, round_.clamp(0, thresholds.shape[0] - 1))  # [B]

    # Every remaining position of the round, judged against the current S.
    ordered = redundancy.gather(1, order)  # [B, N] redundancy in round order
    limit = torch.where(first, cursor + chunk, candidates)  # the first chunk alone, or the rest of the round
    passes = (ordered < tau.unsqueeze(1)) & (position >= cursor.unsqueeze(1)) & (position < limit.unsqueeze(1))
    hit = _first_true(passes)  # [B]
    accepts = (hit < num_tokens) & active
    chunk_start = torch.div(hit, chunk, rounding_mode="floor") * chunk  # chunks are aligned to the round start

    # That chunk's members: accept those passing, capped at the room left by lowest redundancy.
    slots = chunk_start.unsqueeze(1) + torch.arange(chunk, device=device)  # [B, C]
    in_chunk = (slots < candidates.unsqueeze(1)) & accepts.unsqueeze(1)
    slots = slots.clamp(max=num_tokens - 1)
    members = order.gather(1, slots)  # [B, C] token indices
    ok = passes.gather(1, slots) & in_chunk
    slot_key = torch.where(ok, ordered.gather(1, slots), torch.full_like(ordered[:, :chunk], float("inf")))
    room = (budget - count).unsqueeze(1)
    rank = stable_rank(slot_key)  # [B, C] position by (m_i, chunk position); passing members first
    accepted = ok & (rank < room)  # [B, C]
    capped = ok.long().sum(1, keepdim=True) > room  # [B, 1] the chunk would overflow the budget

    # Record the accepted tokens after the ones already picked: in chunk order, or, when the budget caps the chunk,
    # lowest redundancy first (the order the authors' top-k returns them).
    write_at = count.unsqueeze(1) + torch.where(capped, rank, accepted.long().cumsum(1) - 1)  # [B, C]
    targets = (write_at.unsqueeze(-1) == torch.arange(budget, device=device)) & accepted.unsqueeze(-1)  # [B, C, R]
    written = targets.any(1)  # [B, R]
    picked = torch.where(written, (targets.long() * members.unsqueeze(-1)).sum(1), picked)
    selected = selected | one_hot_any(members, accepted, num_tokens)
    count = count + accepted.long().sum(1)

    # Incremental s_i = max_j M[j, i] and d_i = min_j dist(i, j) over the newly accepted j.
    new_sim = torch.where(accepted.unsqueeze(-1), take_rows(similarity, members), float("-inf"))  # [B, C, N]
    max_sim = torch.maximum(max_sim, new_sim.amax(1))
    member_xy = positions.index_select(0, members.reshape(-1)).reshape(batch, -1, 2)  # [B, C, 2]
    new_dist = grid_distance(member_xy, positions, plan.diameter)  # [B, C, N]
    new_dist = torch.where(accepted.unsqueeze(-1), new_dist, float("inf"))
    min_dist = torch.minimum(min_dist, new_dist.amin(1))

    # Advance the walk, or end the round (nothing accepted: the first chunk failed, or no chunk is left that passes).
    cursor = torch.where(accepts, chunk_start + chunk, cursor)
    new_round = active & ~accepts
    first = first & ~active
    return selected, count, max_sim, min_dist, order, candidates, cursor, first, round_, new_round, picked


def centrifugal_select(
    keys: torch.Tensor, similarity: torch.Tensor, plan: StaticPlan, use_scan: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stages 1 and 2.  keys [B, N, Dk], similarity [B, N, N] -> (order [B, R], selected mask [B, N])."""
    batch, num_tokens, _ = keys.shape
    device = keys.device
    pivots = static_pivots(keys, plan.pivots)  # [B, P]
    selected = one_hot_any(pivots, torch.ones_like(pivots, dtype=torch.bool), num_tokens)
    positions = grid_positions(plan.rows, plan.cols, device, plan.lattice_cols)  # [N, 2]
    max_sim = take_rows(similarity, pivots).amax(1)  # [B, N]
    pivot_xy = positions.index_select(0, pivots.reshape(-1)).reshape(batch, -1, 2)
    min_dist = grid_distance(pivot_xy, positions, plan.diameter).amin(1)  # [B, N]
    picked = torch.cat([pivots, pivots.new_zeros(batch, plan.budget - plan.pivots)], dim=1)  # [B, R]
    if plan.steps <= 0 or plan.budget == plan.pivots:
        return picked, selected
    # built from `full`, not `torch.tensor`: a lifted tensor constant inside a `cond` branch that feeds a `scan`
    # breaks torch 2.13's decompositions (the exporter's layer-K decoder runs the selection inside a `cond`)
    thresholds = torch.stack([torch.full((), t, dtype=torch.float32, device=device) for t in plan.thresholds])
    zeros = torch.zeros(batch, dtype=torch.long, device=device)
    carry = (
        selected,
        torch.full_like(zeros, plan.pivots),  # count
        max_sim,
        min_dist,
        torch.zeros(batch, num_tokens, dtype=torch.long, device=device),  # round order
        zeros.clone(),  # candidates
        zeros.clone(),  # cursor
        torch.zeros(batch, dtype=torch.bool, device=device),  # first
        torch.full_like(zeros, -1),  # round index
        torch.ones(batch, dtype=torch.bool, device=device),  # new round pending
        picked,
    )

    def work(*state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.clone() for t in centrifugal_step(state, similarity, positions, thresholds, plan))

    def idle(*state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.clone() for t in state)

    def body(state: tuple[torch.Tensor, ...], step: torch.Tensor):
        # Most of the fixed steps are idle (typically far fewer events than the worst-case bound): skip their work.
        # Scan bodies must not return aliases of their inputs, hence the clones.
        running = (state[1] < plan.budget).any()
        return tuple(torch.cond(running, work, idle, state)), step.clone()

    if use_scan is None:
        use_scan = torch.compiler.is_compiling()
    if use_scan:  # one graph node for all steps: what export needs
        final, _ = scan(body, carry, torch.arange(plan.steps, device=device))
    else:  # the same fixed number of steps, as a plain loop (scan's eager path is slower)
        final = carry
        for _ in range(plan.steps):
            final = centrifugal_step(final, similarity, positions, thresholds, plan)
    return final[-1], final[0]


def vlm_pruner_static(
    hidden: torch.Tensor,
    keys: torch.Tensor,
    config: PrunerConfig,
    plan: StaticPlan,
    use_scan: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All three stages, no validation (callers check inputs).  -> indices [B, R], states [B, R, D], order [B, R]

    use_scan: run the steps as one `scan` (default while tracing for export) or as a loop (default in eager).
    """
    hidden32, keys32 = hidden.float(), keys.float()
    similarity = similarity_for(hidden32, config.feature_channels)  # [B, N, N]
    order, selected = centrifugal_select(keys32, similarity, plan, use_scan)
    # ascending indices without aten::sort: order values are distinct, so topk on them is exact
    indices = order.topk(plan.budget, dim=1, largest=False, sorted=True).values
    states = similarity_weighted_fusion(hidden32, similarity, indices, selected, plan.beta)
    return indices, states.to(hidden.dtype), order
