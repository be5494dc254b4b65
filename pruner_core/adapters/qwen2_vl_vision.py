"""Qwen2-VL's vision tower pieces for export: the Conv3d patch embedding as the matmul it equals.

Used by ``qwen2_vl.StaticVisionEncoder(..., patch_embedding="matmul")``. Shapes: P patches, C channels, t frames
per patch (2), p patch side (14), E the tower width.
"""

from __future__ import annotations

import torch
from torch import nn


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
