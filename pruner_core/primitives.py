"""Small tensor functions shared by the eager reference and the static form.

Both forms call these so that every float they compare is computed by the same operations in the same order:
a 1e-7 difference in a cosine is enough to flip a near-tied decision.
"""

from __future__ import annotations

import math

import torch


def grid_positions(rows: int, cols: int, device: torch.device | None = None, lattice_cols: int | None = None
                   ) -> torch.Tensor:
    """(x, y) of every one of the N = rows * cols image tokens, row-major on a lattice ``lattice_cols`` wide
    (default: the grid's own cols): token i sits at (i mod lattice_cols, i div lattice_cols).  -> [N, 2] float32"""
    width = lattice_cols or cols
    index = torch.arange(rows * cols, device=device)
    return torch.stack([index % width, index // width], dim=-1).to(torch.float32)


def placement_lattice(rows: int, cols: int, merge: int = 1, authors_grid: bool = False) -> tuple[int, int]:
    """(rows, cols) of the lattice image tokens are placed on for the spatial distance: its cols are the row width
    of ``grid_positions`` and its diagonal is ``grid_diameter``.

    Default: the image-token grid (rows, cols) itself. ``authors_grid``: the authors' Qwen2-VL placement
    (``Qwen2-VL/Qwen2VL_VLMPruner/modeling_qwen2_vl_self.py``, github.com/Casey-bit/VLMPruner), whose height and
    width come from ``image_grid_thw``, the patch grid BEFORE the vision tower's merge x merge patch merge:
    (rows * merge, cols * merge); merged token i then sits at (i mod cols * merge, i div cols * merge) and distances
    are divided by that grid's diagonal. Raises ValueError for ``authors_grid`` with merge = 1 (image tokens that
    are not merged patches, e.g. LLaVA-1.5: there is no unmerged grid to reproduce).
    """
    if not authors_grid:
        return rows, cols
    if merge < 2:
        raise ValueError(
            "authors_grid reproduces the authors' Qwen2-VL placement on the patch grid before the vision tower's "
            "patch merge; these image tokens are not merged patches (merge=1, e.g. LLaVA-1.5): drop authors_grid (--authors-grid)"
        )
    return rows * merge, cols * merge


def grid_diameter(rows: int, cols: int) -> float:
    """D_max = sqrt(W^2 + H^2), the distance normaliser (the authors' 24*sqrt(2) on a 24x24 grid)."""
    return math.sqrt(rows * rows + cols * cols)


def grid_distance(anchor_xy: torch.Tensor, all_xy: torch.Tensor, diameter: float) -> torch.Tensor:
    """Normalised Euclidean grid distance.  anchor_xy [..., A, 2], all_xy [N, 2] -> [..., A, N]"""
    dx = anchor_xy[..., 0:1] - all_xy[:, 0]  # [..., A, N]
    dy = anchor_xy[..., 1:2] - all_xy[:, 1]
    return (dx * dx + dy * dy).sqrt() / diameter


def sum_last(values: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim as a batched matmul with ones (XNNPACK runs it; a portable reduction is ~10x slower,
    and a 2-D matmul would make XNNPACK copy the operand into a reshaped buffer first).  [B, N, C] -> [B, N]"""
    ones = torch.ones(values.shape[0], values.shape[-1], 1, dtype=values.dtype, device=values.device)
    return torch.bmm(values, ones).squeeze(-1)


def sum_tokens(values: torch.Tensor) -> torch.Tensor:
    """Sum over the token dim as a batched matmul with ones.  [B, N, C] -> [B, C]"""
    ones = torch.ones(values.shape[0], 1, values.shape[1], dtype=values.dtype, device=values.device)
    return torch.bmm(ones, values).squeeze(1)


def take_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[b, index[b, a], :] for every batch item.  values [B, N, C], index [B, A] -> [B, A, C]

    `index_select` copies whole rows.  A `gather` would need an expanded index as large as the result (~5x slower
    in ExecuTorch's portable kernels), and a reshape of `values` would become a full copy inside an XNNPACK
    partition, so batch 1 (what exported models run) selects on `values` as it is; larger batches select once over
    the flattened batch.
    """
    batch, num_tokens, width = values.shape
    if batch == 1:  # static: the batch size is part of the exported shape
        return values.index_select(1, index.reshape(-1))
    flat = index + torch.arange(batch, device=index.device).unsqueeze(1) * num_tokens  # [B, A] rows of [B*N, C]
    return values.reshape(batch * num_tokens, width).index_select(0, flat.reshape(-1)).reshape(batch, -1, width)


def take_columns(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[b, :, index[b, a]] for every batch item.  values [B, N, C], index [B, A] -> [B, N, A]"""
    if values.shape[0] == 1:
        return values.index_select(2, index.reshape(-1))
    return torch.stack([values[b].index_select(1, index[b]) for b in range(values.shape[0])])


def key_l1_norm(keys: torch.Tensor) -> torch.Tensor:
    """||K_i||_1.  [B, N, Dk] -> [B, N]"""
    return sum_last(keys.abs())


def key_sq_norm(keys: torch.Tensor) -> torch.Tensor:
    """||K_i||_2^2.  [B, N, Dk] -> [B, N]"""
    return sum_last(keys * keys)


def key_distance(keys: torch.Tensor, sq_norm: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """||K_i - K_a||_2 = sqrt(|K_i|^2 + |K_a|^2 - 2 K_i.K_a): one pass over the keys per anchor.

    keys [B, N, Dk], sq_norm [B, N] (key_sq_norm), anchor [B] token index -> [B, N]
    """
    anchor_key = take_rows(keys, anchor.view(-1, 1))  # [B, 1, Dk]
    anchor_sq = sq_norm.gather(1, anchor.view(-1, 1))  # [B, 1]
    dot = torch.bmm(keys, anchor_key.transpose(1, 2)).squeeze(-1)  # [B, N]
    return (sq_norm + anchor_sq - 2.0 * dot).clamp_min(0.0).sqrt()


def channel_variance(hidden: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of each channel across the N tokens (two-pass, matmul reductions).  [B, N, D] -> [B, D]"""
    num_tokens = hidden.shape[1]
    centred = hidden - (sum_tokens(hidden) / num_tokens).unsqueeze(1)  # [B, N, D]
    return sum_tokens(centred * centred) / max(num_tokens - 1, 1)


def select_feature_channels(hidden: torch.Tensor, channels: int) -> torch.Tensor:
    """F: the `channels` channels of largest (unbiased) variance across the N tokens.  [B, N, D] -> [B, N, q]"""
    if channels >= hidden.shape[-1]:
        return hidden
    variance = channel_variance(hidden)  # [B, D]
    top = variance.topk(channels, dim=-1).indices  # [B, q]
    return take_columns(hidden, top)


def cosine_matrix(features: torch.Tensor) -> torch.Tensor:
    """M_ij = cos(F_i, F_j).  [B, N, q] -> [B, N, N]"""
    norm = sum_last(features * features).unsqueeze(-1).sqrt().clamp_min(1e-12)  # [B, N, 1]
    unit = features / norm
    return torch.bmm(unit, unit.transpose(1, 2))


def similarity_for(hidden: torch.Tensor, channels: int) -> torch.Tensor:
    """The similarity matrix Stage 2 and Stage 3 use.  [B, N, D] -> [B, N, N]"""
    return cosine_matrix(select_feature_channels(hidden, channels))


def bss_redundancy(max_similarity: torch.Tensor, min_distance: torch.Tensor, strength: float) -> torch.Tensor:
    """m_i(S) = s_i * (1 + lambda * d_i): similarity to the selected set, inflated with distance from it."""
    return max_similarity * (1.0 + strength * min_distance)


def stable_rank(values: torch.Tensor) -> torch.Tensor:
    """Position of each entry in an ascending stable sort (ties broken by index), without aten::sort.

    [..., N] -> [..., N] int64, a permutation of 0..N-1.
    """
    size = values.shape[-1]
    index = torch.arange(size, device=values.device)
    other = values.unsqueeze(-2)  # [..., 1, N]   (j)
    mine = values.unsqueeze(-1)  # [..., N, 1]   (i)
    before = (other < mine) | ((other == mine) & (index < index.unsqueeze(-1)))  # [..., N(i), N(j)]
    return before.sum(-1)


def stable_argsort(values: torch.Tensor) -> torch.Tensor:
    """Indices that sort `values` ascending, ties by index, without aten::sort.  [B, N] -> [B, N] int64

    topk orders distinct values exactly but may break ties either way.  A second topk on the integer key
    (tie group, index) puts each group of equal values in index order: O(N log N), no data-dependent branch.
    """
    size = values.shape[-1]
    ordered, order = values.topk(size, dim=-1, largest=False, sorted=True)  # [B, N]
    new_group = torch.ones_like(order)
    new_group[..., 1:] = (ordered[..., 1:] != ordered[..., :-1]).long()
    group = new_group.cumsum(-1)  # [B, N] tie-group id, ascending with the value
    composite = (group * size + order).to(torch.float64)  # distinct integers, exact in float64
    regroup = composite.topk(size, dim=-1, largest=False, sorted=True).indices
    return order.gather(-1, regroup)


def similarity_weighted_fusion(
    hidden: torch.Tensor,
    similarity: torch.Tensor,
    kept: torch.Tensor,
    kept_mask: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Stage 3 (SWA): fold each discarded token into its most similar kept token.

    hidden [B, N, D], similarity [B, N, N], kept [B, R] ascending, kept_mask [B, N] -> states [B, R, D].
    A kept token whose weight sum is <= 1e-6 is left unchanged (the authors would divide by 1e-8).
    """
    budget = kept.shape[1]
    kept_h = take_rows(hidden, kept)  # [B, R, D]
    if beta >= 1.0:
        return kept_h
    to_kept = take_columns(similarity, kept)  # [B, N, R]  M[u, j]
    target = to_kept.argmax(-1)  # [B, N]  first max in ascending kept order
    weight = to_kept.amax(-1)  # [B, N]  M[u, target]
    weight = torch.where(kept_mask, torch.zeros_like(weight), weight)  # kept tokens are not fused
    one_hot = (target.unsqueeze(-1) == torch.arange(budget, device=hidden.device)).to(hidden.dtype)  # [B, N, R]
    assign = one_hot * weight.unsqueeze(-1)  # [B, N, R]
    weight_sum = assign.sum(1)  # [B, R]
    aggregate = torch.bmm(assign.transpose(1, 2), hidden) / weight_sum.clamp_min(1e-6).unsqueeze(-1)  # [B, R, D]
    # beta where the weights are usable, 1 (keep unchanged) elsewhere: a small [B, R, 1] select instead of a
    # [B, R, D] one; 1 * kept + 0 * aggregate is exactly kept since the aggregate is finite
    keep_weight = torch.where(weight_sum > 1e-6, beta, 1.0).unsqueeze(-1)  # [B, R, 1]
    return keep_weight * kept_h + (1.0 - keep_weight) * aggregate
