"""How well a selection covers the image: pure functions of the kept token positions and the grid.

Token i of a (rows, cols) grid sits at (x = i mod cols, y = i div cols), as everywhere in this project.
Three figures, all computed from the R kept indices alone:

* ``region_fraction``: split the grid into a REGIONS x REGIONS arrangement of near-equal bands (fewer bands along
  a side shorter than REGIONS patches) and count the regions that hold at least one kept token;
* ``mean_gap``: mean Euclidean grid distance, in patches, from each discarded token to its nearest kept one;
* ``kept_groups``: connected groups the kept tokens form (4-neighbourhood: left, right, up, down).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

REGIONS = 4  # regions per side: a 4 x 4 arrangement


@dataclass(frozen=True)
class Coverage:
    """Coverage of one selection of ``kept`` of ``total`` tokens on a grid."""

    kept: int
    total: int
    regions_hit: int
    regions_total: int
    mean_gap: float  # patches
    kept_groups: int

    @property
    def region_fraction(self) -> float:
        return self.regions_hit / self.regions_total

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "region_fraction": self.region_fraction}

    def summary(self) -> str:
        """One short line for a plot title."""
        return (f"regions {self.regions_hit}/{self.regions_total} ({self.region_fraction:.0%}) | "
                f"mean gap {self.mean_gap:.2f} patches | groups {self.kept_groups}")


def kept_mask(indices: Iterable[int], grid: tuple[int, int]) -> np.ndarray:
    """R kept indices -> bool [rows, cols]; raises on an index outside the grid or a repeated one."""
    rows, cols = _check_grid(grid)
    picks = [int(i) for i in indices]
    if any(i < 0 or i >= rows * cols for i in picks):
        raise ValueError(f"kept indices must lie in 0..{rows * cols - 1} for a {rows}x{cols} grid, got {picks}")
    if len(set(picks)) != len(picks):
        raise ValueError(f"kept indices must be distinct, got {sorted(picks)}")
    mask = np.zeros(rows * cols, dtype=bool)
    mask[picks] = True
    return mask.reshape(rows, cols)


def _check_grid(grid: tuple[int, int]) -> tuple[int, int]:
    rows, cols = (int(v) for v in grid)
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must be (rows, cols) with both >= 1, got {grid}")
    return rows, cols


def region_bounds(length: int, parts: int = REGIONS) -> list[tuple[int, int]]:
    """[start, end) of min(parts, length) near-equal, non-empty bands of 0..length-1."""
    count = min(parts, length)
    return [(k * length // count, (k + 1) * length // count) for k in range(count)]


def regions_hit(mask: np.ndarray, parts: int = REGIONS) -> tuple[int, int]:
    """mask [rows, cols] -> (regions holding a kept token, regions in all)."""
    row_bands, col_bands = region_bounds(mask.shape[0], parts), region_bounds(mask.shape[1], parts)
    hit = sum(bool(mask[top:bottom, left:right].any()) for top, bottom in row_bands for left, right in col_bands)
    return hit, len(row_bands) * len(col_bands)


def mean_gap(mask: np.ndarray) -> float:
    """mask [rows, cols] -> mean distance (patches) from each discarded token to its nearest kept one (0 if none)."""
    kept = np.argwhere(mask).astype(np.float64)  # [R, 2] (y, x)
    dropped = np.argwhere(~mask).astype(np.float64)  # [N - R, 2]
    if len(dropped) == 0 or len(kept) == 0:
        return 0.0
    squared = ((dropped[:, None, :] - kept[None, :, :]) ** 2).sum(-1)  # [N - R, R]
    return float(np.sqrt(squared.min(1)).mean())


def kept_groups(mask: np.ndarray) -> int:
    """mask [rows, cols] -> number of 4-connected groups of kept tokens (flood fill)."""
    rows, cols = mask.shape
    seen = np.zeros_like(mask)
    groups = 0
    for y0, x0 in np.argwhere(mask):
        if seen[y0, x0]:
            continue
        groups += 1
        seen[y0, x0] = True
        stack = [(y0, x0)]
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < rows and 0 <= nx < cols and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return groups


def coverage(indices: Iterable[int], grid: tuple[int, int], parts: int = REGIONS) -> Coverage:
    """R kept indices on a (rows, cols) grid -> their Coverage."""
    mask = kept_mask(indices, grid)  # [rows, cols]
    hit, total_regions = regions_hit(mask, parts)
    return Coverage(
        kept=int(mask.sum()),
        total=mask.size,
        regions_hit=hit,
        regions_total=total_regions,
        mean_gap=mean_gap(mask),
        kept_groups=kept_groups(mask),
    )
