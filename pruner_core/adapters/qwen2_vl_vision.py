"""Qwen2-VL / Qwen2.5-VL's vision tower at one fixed resolution, in an export-friendly form.

``StaticVisionEncoder`` runs the stock tower with its grid-dependent inputs computed once; two of its submodules
may be replaced by modules computing the same numbers in a form backends take better:
- ``FlatPatchEmbedding``: the Conv3d patch embedding as the matmul it equals (XNNPACK delegates no Conv3d);
- ``BatchedWindowAttention``: Qwen2.5-VL's window attention as one batched attention per window size, where the
  stock eager path runs one attention per window (at 896 x 896: 64 windows in each of 28 window blocks, thousands
  of graph nodes and hundreds of XNNPACK partitions to lower).

Shapes: P patches, C channels, t frames per patch (2), p patch side (14), E the tower width, H heads, d = E / H.
"""

from __future__ import annotations

import copy
import importlib
from typing import Any

import numpy as np
import torch
from torch import nn

from .qwen2_vl_inputs import check_image_size

PATCH_EMBEDDINGS = ("conv3d", "matmul")


class FlatPatchEmbedding(nn.Module):
    """Qwen2-VL's patch embedding as the matmul it equals: pixel_values [P, C * t * p * p] -> [P, E].

    The stock ``PatchEmbed`` is a Conv3d whose kernel equals its stride ((t, p, p) over a [P, C, t, p, p] view of the
    flattened patches), so each output is one dot product of a flattened patch with a flattened kernel: the same
    numbers as ``x @ proj.weight.reshape(E, -1).T``. For backends without 5-D convolution (ExecuTorch's XNNPACK
    delegates no Conv3d). The weight is a view of the conv's (no copy)."""

    def __init__(self, patch_embed: nn.Module) -> None:
        super().__init__()
        conv = patch_embed.proj
        if tuple(conv.kernel_size) != tuple(conv.stride) or conv.bias is not None or any(conv.padding):
            raise ValueError(f"{type(patch_embed).__name__}: a Conv3d with kernel {conv.kernel_size}, stride "
                             f"{conv.stride}, padding {conv.padding} is not a matmul over flattened patches")
        self.weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1), requires_grad=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        flat = pixel_values.reshape(-1, self.weight.shape[1]).to(self.weight.dtype)  # [P, C * t * p * p]
        return torch.nn.functional.linear(flat, self.weight)  # [P, E]


def window_groups(cu_seqlens: np.ndarray) -> list[np.ndarray]:
    """Attention segments [cu_seqlens[i], cu_seqlens[i + 1]) of a sequence grouped by length: one int64 array
    [n, L] per distinct length L > 0 (in order of first appearance), row j holding the positions of the j-th segment
    of that length. Empty segments are dropped. cu_seqlens: [S + 1] non-decreasing, starting at 0."""
    bounds = np.asarray(cu_seqlens, dtype=np.int64)
    if bounds.ndim != 1 or bounds.size < 2 or bounds[0] != 0 or np.any(np.diff(bounds) < 0):
        raise ValueError(f"cu_seqlens must be non-decreasing from 0 with at least one segment, got {bounds.tolist()}")
    rows: dict[int, list[np.ndarray]] = {}
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if stop > start:
            rows.setdefault(int(stop - start), []).append(np.arange(start, stop))
    return [np.stack(segments) for segments in rows.values()]


class BatchedWindowAttention(nn.Module):
    """A Qwen2.5-VL vision attention over fixed windows as one batched attention per window size:
    hidden_states [P, E] -> [P, E], the numbers of the stock module (``Qwen2_5_VLVisionAttention``, transformers
    5.23 ``models/qwen2_5_vl/modeling_qwen2_5_vl.py``), whose non-flash path splits q, k, v at ``cu_seqlens`` and
    runs one attention per segment.

    The segments (the window layout the static grid fixes, from ``get_vision_window_index``) are grouped by length
    (``window_groups``: at most four sizes, one when the merged grid divides into whole windows); each group's
    tokens are gathered into a batch [n, H, L, d] and go through the model's own attention function
    (``ALL_ATTENTION_FUNCTIONS`` at the config's implementation, eager for export) at once. The projections, the
    rotary embedding (the modeling module's ``apply_rotary_pos_emb_vision``) and every weight are the wrapped
    module's; ``cu_seqlens`` passed at call time is ignored (the layout is the one given at construction)."""

    def __init__(self, attention: nn.Module, cu_seqlens: np.ndarray) -> None:
        super().__init__()
        self.attention = attention
        groups = window_groups(cu_seqlens)
        order = np.concatenate([group.reshape(-1) for group in groups])  # [P] position of each batched row
        self.in_order = bool(np.array_equal(order, np.arange(order.size)))  # then no gather, no restore
        self.groups = [(group.size, group.shape[1]) for group in groups]  # (rows n * L, window length L)
        self.register_buffer("order", torch.from_numpy(order), persistent=False)  # [P]
        self.register_buffer("restore", torch.from_numpy(np.argsort(order, kind="stable")), persistent=False)  # [P]
        modeling = importlib.import_module(type(attention).__module__)
        self._rotary, self._eager = modeling.apply_rotary_pos_emb_vision, modeling.eager_attention_forward

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: Any = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs: Any) -> torch.Tensor:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        attn = self.attention
        length = hidden_states.shape[0]
        q, k, v = attn.qkv(hidden_states).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = self._rotary(q, k, *position_embeddings)  # each [P, H, d]
        if not self.in_order:  # rows in batched order: the groups one after another
            q, k, v = (x.index_select(0, self.order) for x in (q, k, v))
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, self._eager)
        sizes = [rows for rows, _ in self.groups]
        outputs = []
        for (_, window), *batch in zip(self.groups, *(x.split(sizes) for x in (q, k, v))):
            batch = [x.reshape(-1, window, *x.shape[1:]).transpose(1, 2) for x in batch]  # each [n, H, L, d]
            out = attention(attn, *batch, attention_mask=None, scaling=attn.scaling, dropout=0.0,
                            is_causal=False, **kwargs)[0]  # [n, L, H, d]
            outputs.append(out.reshape(-1, out.shape[-2] * out.shape[-1]))  # [n * L, E]
        out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]  # [P, E] in batched order
        if not self.in_order:
            out = out.index_select(0, self.restore)
        return attn.proj(out)


class StaticVisionEncoder(nn.Module):
    """The vision tower and 2x2 merger at one fixed resolution, exportable: pixel_values [P, 1176] -> [1, N, D].

    The grid-dependent tensors (rotary position ids, attention segments and, for Qwen2.5-VL, the window order and
    window segments) are computed once here with transformers' ``vision_utils`` and handed to the stock tower as its
    precomputed inputs, so the traced graph holds no ``.tolist()``, loop over the grid or other data-dependent op.
    Segment boundaries go over as NumPy arrays: the stock attention splits by ``lengths.tolist()``, which on a tensor
    traces to one ``item`` per segment; on NumPy it gives Python ints at trace time (static slices).

    visual: the model's vision tower (``Qwen2VisionTransformerPretrainedModel`` / ``Qwen2_5_VisionTransformer...``).
    patch_embedding: ``"conv3d"`` (the stock Conv3d) or ``"matmul"`` (``FlatPatchEmbedding``, the same numbers for
    backends without 5-D convolution). batched_windows: Qwen2.5-VL's window blocks run ``BatchedWindowAttention``
    (one attention per window size) instead of one attention per window. Replacing a submodule works on shallow
    copies (tower, block list, blocks): the model itself is not changed and every weight is shared.
    """

    def __init__(self, visual: nn.Module, image_size: tuple[int, int], patch_embedding: str = "conv3d",
                 batched_windows: bool = True) -> None:
        from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

        super().__init__()
        if patch_embedding not in PATCH_EMBEDDINGS:
            raise ValueError(f"patch_embedding must be one of {PATCH_EMBEDDINGS}, got {patch_embedding!r}")
        config = visual.config
        height, width = check_image_size(image_size)
        self.grid_thw = torch.tensor([[1, height // 14, width // 14]])  # [1, 3]
        self.precomputed = {"position_ids": get_vision_position_ids(self.grid_thw, config.spatial_merge_size),
                            "cu_seqlens": get_vision_cu_seqlens(self.grid_thw).numpy()}
        replaced: dict[str, nn.Module] = {}
        if getattr(config, "window_size", None):  # Qwen2.5-VL: window attention, full at fullatt_block_indexes
            window_index, window_seqlens = get_vision_window_index(
                self.grid_thw, config.spatial_merge_size, config.window_size, config.patch_size)
            self.precomputed.update(window_index=window_index, cu_window_seqlens=window_seqlens.numpy())
            if batched_windows:
                replaced["blocks"] = _batched_window_blocks(visual, window_seqlens.numpy())
        if patch_embedding == "matmul":
            replaced["patch_embed"] = FlatPatchEmbedding(visual.patch_embed)
        if replaced:
            tower = copy.copy(visual)  # the same submodules and weights, its own module table
            tower._modules = dict(visual._modules, **replaced)
            visual = tower
        self.visual = visual

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.visual(pixel_values.to(self.visual.dtype), self.grid_thw, **dict(self.precomputed))
        return out.pooler_output[None]  # [1, N, D]


def _batched_window_blocks(visual: nn.Module, cu_window_seqlens: np.ndarray) -> nn.ModuleList:
    """The tower's block list with every window block's attention as ``BatchedWindowAttention`` (shallow copies;
    full-attention blocks, ``fullatt_block_indexes``, are the model's own)."""
    blocks = []
    for index, block in enumerate(visual.blocks):
        if index not in visual.fullatt_block_indexes:
            block = copy.copy(block)
            block._modules = dict(block._modules, attn=BatchedWindowAttention(block.attn, cu_window_seqlens))
        blocks.append(block)
    return nn.ModuleList(blocks)
