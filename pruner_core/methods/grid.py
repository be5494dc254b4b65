"""Grid: uniform spatial pooling over the image-token grid (a baseline, no signal but the hidden states)."""

from __future__ import annotations

import functools
import math

import torch

from ..config import PrunerConfig
from .base import Grid, SelectionMethod, Signals, register_method
from .common import one_hot


def lattice_rows(rows: int, cols: int, budget: int) -> list[int]:
    """How many kept tokens each lattice row holds: as close to square cells as possible, summing to R.

    The number of lattice rows is about sqrt(R * rows / cols) (cells of the grid's aspect), at least
    ceil(R / cols) (no row holds more than `cols`) and at most min(rows, R); R is spread over them with
    counts differing by at most one.
    """
    bands = round(math.sqrt(budget * rows / cols))
    bands = max(math.ceil(budget / cols), min(bands, rows, budget), 1)
    return [(k + 1) * budget // bands - k * budget // bands for k in range(bands)]


def band(index: int, parts: int, length: int) -> tuple[int, int]:
    """[start, end) of the index-th of `parts` near-equal bands of 0..length-1 (non-empty when parts <= length)."""
    return index * length // parts, (index + 1) * length // parts


def lattice_cells(rows: int, cols: int, budget: int) -> list[tuple[int, int, int, int]]:
    """The R lattice cells (row_start, row_end, col_start, col_end), row-major."""
    counts = lattice_rows(rows, cols, budget)
    cells = []
    for k, count in enumerate(counts):
        top, bottom = band(k, len(counts), rows)
        for j in range(count):
            left, right = band(j, count, cols)
            cells.append((top, bottom, left, right))
    return cells


def lattice_points(rows: int, cols: int, budget: int) -> list[int]:
    """The kept token of every cell: its centre (rounded down), row-major, hence ascending.  -> R ints"""
    return [((top + bottom - 1) // 2) * cols + (left + right - 1) // 2 for top, bottom, left, right in
            lattice_cells(rows, cols, budget)]


def cell_owners(rows: int, cols: int, points: list[int]) -> list[int]:
    """For every token, the slot (0..R-1) of its nearest kept token by Euclidean grid distance, lowest slot on
    ties.  Plain integer arithmetic at build time, so ties break the same way in every runtime.  -> N ints"""
    anchors = [(p % cols, p // cols) for p in points]
    owners = []
    for index in range(rows * cols):
        x, y = index % cols, index // cols
        squared = [(x - ax) * (x - ax) + (y - ay) * (y - ay) for ax, ay in anchors]
        owners.append(squared.index(min(squared)))
    return owners


@functools.lru_cache(maxsize=64)
def grid_plan(rows: int, cols: int, budget: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(kept positions [R], owner slot of every token [N]), fixed by the grid and R; cached."""
    points = lattice_points(rows, cols, budget)
    return tuple(points), tuple(cell_owners(rows, cols, points))


def select_grid(
    signals: Signals, grid: Grid, budget: int, config: PrunerConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """R tokens on an even lattice over the (rows, cols) grid, each holding the mean of its cell.

    hidden [B, N, D] -> indices [B, R] ascending, states [B, R, D], order [B, R] (= indices, row-major).

    The picks depend only on (rows, cols, R); a kept token's cell is the set of tokens whose nearest kept token
    (Euclidean grid distance, lowest index on ties) it is, and its state is the mean hidden state of that cell.
    """
    hidden = signals.hidden
    batch = hidden.shape[0]
    picks, owner_slots = grid_plan(grid.rows, grid.cols, budget)
    points = torch.tensor(picks, device=hidden.device)  # [R]
    owners = torch.tensor(owner_slots, device=hidden.device)  # [N]
    assign = one_hot(owners.unsqueeze(0), budget, torch.float32).squeeze(0)  # [N, R]
    weights = assign / assign.sum(0, keepdim=True)  # [N, R] columns sum to 1 (every point owns itself)
    states = weights.transpose(0, 1) @ hidden.float()  # [R, N] @ [B, N, D] -> [B, R, D]
    indices = points.unsqueeze(0).expand(batch, budget).contiguous()  # [B, R]
    return indices, states.to(hidden.dtype), indices.clone()


GRID = register_method(
    SelectionMethod(
        name="grid",
        needs=frozenset({"hidden"}),
        paper="baseline: uniform spatial pooling on the image-token grid",
        select=select_grid,
    )
)
