"""The interface every selection method implements, and the registry of methods by name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import PrunerConfig

SIGNALS = ("hidden", "keys", "text_attention", "cls_attention")


@dataclass(frozen=True)
class Signals:
    """What a method may look at, for the N image tokens of each batch item.

    hidden:         [B, N, D]  states at the pruning point (layer K-1 output, or projector output for layer 0)
    keys:           [B, N, Dk] post-RoPE keys of layer K-1 (all heads concatenated)
    text_attention: [B, N]     attention of the last text token to each image token at layer K-1 (FastV)
    cls_attention:  [B, N]     [CLS] attention of the vision tower's penultimate layer (VisionZip)
    """

    hidden: torch.Tensor
    keys: torch.Tensor | None = None
    text_attention: torch.Tensor | None = None
    cls_attention: torch.Tensor | None = None


@dataclass(frozen=True)
class Grid:
    """The (rows, cols) image-token grid; merge: patches per token along each side (Qwen2-VL 2, LLaVA 1), which
    ``PrunerConfig.authors_grid`` reads."""

    rows: int
    cols: int
    merge: int = 1

    @property
    def size(self) -> int:
        return self.rows * self.cols


# (signals, grid, budget R, config) -> (indices [B, R] ascending, states [B, R, D], order [B, R])
SelectFn = Callable[[Signals, Grid, int, PrunerConfig], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class SelectionMethod:
    """A static-shape, exact-R token selection method."""

    name: str
    needs: frozenset[str]  # subset of SIGNALS; "hidden" is always provided
    paper: str
    select: SelectFn


_REGISTRY: dict[str, SelectionMethod] = {}


def register_method(method: SelectionMethod) -> SelectionMethod:
    unknown = method.needs - set(SIGNALS)
    if unknown:
        raise ValueError(f"method {method.name!r} declares unknown signals {sorted(unknown)}; known: {SIGNALS}")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> SelectionMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered methods: {sorted(_REGISTRY)}") from None


def method_names() -> list[str]:
    return sorted(_REGISTRY)
