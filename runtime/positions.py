"""RoPE position ids of a prompt [text before] + [image] + [text after], for the exported decoders.

Two schemes, as ``export_config.json["decoder"]["position_scheme"]`` names them:

- ``"1d"`` (LLaVA-1.5, Llama decoders): one position per token, [1, T].
- ``"mrope"`` (Qwen2-VL / Qwen2.5-VL): three (t, h, w) per token, [3, 1, T]. Text before the image at
  t = h = w = its index; the image token at merged-grid cell (r, c) at (s, s + r, s + c), s = tokens before it; text
  after continues at s + max(rows, cols). This is transformers' ``Qwen2VLModel.get_rope_index`` for one image as a
  closed form (no model, no loop over tokens).

Pruning keeps each kept image token's original position in the ``mrope`` scheme at every placement; in the ``1d``
scheme the before-the-LLM placement gives the shorter prompt consecutive positions (what stock runners do).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

POSITION_SCHEMES = ("1d", "mrope")


def mrope_positions(before: int, grid: Sequence[int], after: int) -> np.ndarray:
    """before text tokens, the image's merged grid (rows, cols), after text tokens -> int64 [3, 1, T]."""
    rows, cols = int(grid[0]), int(grid[1])
    head = np.broadcast_to(np.arange(before), (3, before))
    row, col = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    image = np.stack([np.zeros(rows * cols, dtype=np.int64), row.reshape(-1), col.reshape(-1)]) + before
    tail = np.broadcast_to(np.arange(after) + before + max(rows, cols), (3, after))
    # reshape, not [:, None]: a stride-0 axis would become a program constant ExecuTorch refuses
    return np.concatenate([head, image, tail], axis=1).astype(np.int64).reshape(3, 1, -1)


def prompt_positions(scheme: str, before: int, grid: Sequence[int], after: int,
                     kept: Sequence[int] | None = None) -> tuple[np.ndarray, int]:
    """The decoder's position_ids for a prompt -> (positions, the first generated token's position).

    kept: the kept image tokens' indices in the image span, ascending (before-the-LLM placement: the prompt then holds
    R image tokens), or None (all N). Returns [1, T'] (``1d``) or [3, 1, T'] (``mrope``) int64. Raises ValueError for
    an unknown scheme."""
    n_image = int(grid[0]) * int(grid[1])
    if scheme == "1d":
        length = before + (n_image if kept is None else len(kept)) + after
        return np.arange(length, dtype=np.int64)[None], length
    if scheme != "mrope":
        raise ValueError(f"unknown position scheme {scheme!r}; known: {POSITION_SCHEMES} (re-export the model)")
    full = mrope_positions(before, grid, after)  # [3, 1, T]
    next_position = before + max(int(grid[0]), int(grid[1])) + after
    if kept is None:
        return full, next_position
    index = np.concatenate([np.arange(before), before + np.asarray(kept, dtype=np.int64),
                            np.arange(before + n_image, before + n_image + after)])
    return np.ascontiguousarray(full[:, :, index]), next_position
