"""The eager reference: VLM-Pruner as plain Python loops over sets, the readable statement of the algorithm
(the VLM-Pruner paper, Sec. 3, with the quirks of the authors' code, github.com/Casey-bit/VLMPruner).

Slow and data-dependent on purpose; `select_tokens` (the static form) must pick the same tokens.
"""

from __future__ import annotations

import torch

from .config import PrunerConfig, round_threshold
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
)
from .selection import Selection
from .validation import check_inputs


def reference_pivots(keys: torch.Tensor, count: int) -> list[int]:
    """Stage 1 for one image: p1 = argmax ||K||_1, then farthest points in key space.  keys [1, N, Dk]."""
    sq_norm = key_sq_norm(keys)

    def distance_to(token: int) -> torch.Tensor:
        return key_distance(keys, sq_norm, torch.tensor([token]))[0]  # [N]

    pivots = [int(key_l1_norm(keys)[0].argmax())]
    nearest = distance_to(pivots[0])  # [N] distance to the closest pivot
    while len(pivots) < count:
        candidates = nearest.clone()
        candidates[pivots] = -1.0  # a pivot is never chosen twice, even when every key is equal
        pivots.append(int(candidates.argmax()))
        nearest = torch.minimum(nearest, distance_to(pivots[-1]))
    return pivots


def reference_redundancy(
    similarity: torch.Tensor, distance: torch.Tensor, selected: list[int], strength: float
) -> torch.Tensor:
    """m_i(S) for every token against the selected list.  similarity/distance [N, N] -> [N]"""
    max_similarity = similarity[selected].amax(0)  # max over j in S of M[j, i]
    min_distance = distance[selected].amin(0)
    return bss_redundancy(max_similarity, min_distance, strength)


def reference_centrifugal(
    similarity: torch.Tensor,
    distance: torch.Tensor,
    pivots: list[int],
    budget: int,
    config: PrunerConfig,
    authors_early_stop: bool = False,
) -> list[int]:
    """Stage 2 for one image: rounds of chunked, BSS-adjusted threshold acceptance until |S| = R.

    authors_early_stop: also stop when a whole round adds nothing, as the authors' code does (it can then return
    fewer than R tokens); this project never does, but tests use it to show the two agree up to that point.
    """
    selected = list(pivots)
    round_index = 0
    while len(selected) < budget:
        size_at_round_start = len(selected)
        tau = torch.tensor(round_threshold(config, round_index), dtype=torch.float32)
        redundancy = reference_redundancy(similarity, distance, selected, config.bss_lambda)
        taken = set(selected)
        # least redundant first; ties by token index
        candidates = sorted((i for i in range(similarity.shape[0]) if i not in taken), key=lambda i: (float(redundancy[i]), i))
        for start in range(0, len(candidates), config.chunk):
            chunk = candidates[start : start + config.chunk]
            redundancy = reference_redundancy(similarity, distance, selected, config.bss_lambda)  # against CURRENT S
            accepted = [i for i in chunk if bool(redundancy[i] < tau)]  # chunk order
            room = budget - len(selected)
            if len(accepted) > room:  # the cap: the `room` lowest m_i, lowest first (as the authors' top-k returns them)
                accepted = sorted(accepted, key=lambda i: (float(redundancy[i]), chunk.index(i)))[:room]
            selected.extend(accepted)
            if start == 0 and not accepted:
                break  # authors' quirk: a round whose first chunk accepts nothing ends there
            if len(selected) == budget:
                break
        if authors_early_stop and len(selected) == size_at_round_start:
            break
        round_index += 1
    return selected


def reference_fusion(
    hidden: torch.Tensor, similarity: torch.Tensor, kept: list[int], beta: float
) -> torch.Tensor:
    """Stage 3 for one image, as loops.  hidden [N, D], similarity [N, N], kept ascending -> [R, D]"""
    states = {j: hidden[j].clone() for j in kept}
    if beta >= 1.0:
        return torch.stack([states[j] for j in kept])
    groups: dict[int, list[tuple[float, int]]] = {j: [] for j in kept}
    kept_set = set(kept)
    for u in range(hidden.shape[0]):
        if u in kept_set:
            continue
        row = similarity[u, kept]
        best = kept[int(row.argmax())]
        groups[best].append((similarity[u, best], u))
    for j, members in groups.items():
        if not members:
            continue
        weights = torch.stack([w for w, _ in members])
        total = weights.sum()
        if total <= 1e-6:
            continue  # deviation from the authors' 1e-8 clamp: leave the token unchanged
        aggregate = (weights.unsqueeze(-1) * hidden[[u for _, u in members]]).sum(0) / total
        states[j] = beta * hidden[j] + (1.0 - beta) * aggregate
    return torch.stack([states[j] for j in kept])


def select_tokens_reference(
    hidden: torch.Tensor, keys: torch.Tensor, grid: tuple[int, int], config: PrunerConfig | None = None,
    merge: int = 1,
) -> Selection:
    """VLM-Pruner, eager.  hidden [B, N, D], keys [B, N, Dk] -> Selection of exactly R tokens per item.

    merge: patches per image token along each side, read for ``config.authors_grid`` (``placement_lattice``)."""
    config = config or PrunerConfig()
    rows, cols = check_inputs(hidden, keys, grid)
    batch, num_tokens, _ = hidden.shape
    budget = config.budget(num_tokens)
    hidden32, keys32 = hidden.float(), keys.float()
    similarity = similarity_for(hidden32, config.feature_channels)  # [B, N, N]
    lattice = placement_lattice(rows, cols, merge, config.authors_grid)
    positions = grid_positions(rows, cols, hidden.device, lattice[1])
    distance = grid_distance(positions, positions, grid_diameter(*lattice))  # [N, N]
    indices, states, orders = [], [], []
    for b in range(batch):
        pivots = reference_pivots(keys32[b : b + 1], min(config.pivots, budget))
        order = reference_centrifugal(similarity[b], distance, pivots, budget, config)
        kept = sorted(order)
        indices.append(torch.tensor(kept))
        orders.append(torch.tensor(order))
        states.append(reference_fusion(hidden32[b], similarity[b], kept, config.fusion_beta))
    return Selection(
        indices=torch.stack(indices).to(hidden.device),
        states=torch.stack(states).to(hidden.dtype),
        order=torch.stack(orders).to(hidden.device),
    )
