"""Static KV caches in ExecuTorch mutable buffers, and the cache views the stock decoder layers write through.

What every ExecuTorch method with a decoder shares: ``StaticKVCache`` (per-layer keys / values, non-persistent
buffers that ``torch.export`` lifts as mutated buffers and ExecuTorch keeps between calls; one allocation for every
method of a program with ``share_mutable_buffers``), ``SlotWriter`` (a cache object the stock attention layers
write through), ``slot_mask`` and ``run_cached_layers``.

Shapes: S tokens in the call, L_i slots of layer i, Hkv key/value heads, d head width, D width. A token's cache slot
(where its K/V go, what the causal mask compares) and its RoPE position are separate: equal for 1-D positions
without pruning, different for the compact caches of the layer-K placement and for M-RoPE's (t, h, w) positions.
"""

from __future__ import annotations

import torch
from torch import nn

from pruner_core.adapters.decoder import rotary


class StaticKVCache(nn.Module):
    """Per-layer keys and values [1, Hkv, L_i, d], written in place; L_i = ``lengths[i]``.

    Registered as non-persistent buffers: ``torch.export`` lifts them as mutated buffers and ExecuTorch keeps them
    between calls (with ``share_mutable_buffers``, one copy shared by every method of the program).
    """

    def __init__(self, lengths: list[int], kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.lengths = list(lengths)
        for index, length in enumerate(lengths):
            self.register_buffer(f"k{index}", torch.zeros(1, kv_heads, length, head_dim, dtype=dtype), persistent=False)
            self.register_buffer(f"v{index}", torch.zeros(1, kv_heads, length, head_dim, dtype=dtype), persistent=False)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"k{index}"), getattr(self, f"v{index}")

    def write(self, index: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        """keys/values [1, Hkv, S, d] into slots [S] of layer ``index`` -> the layer's whole buffers."""
        cache_keys, cache_values = self.layer(index)
        cache_keys[:, :, slots] = keys
        cache_values[:, :, slots] = values
        return cache_keys, cache_values


class SlotWriter:
    """A cache for the stock attention layers: new K/V go to ``slots`` [S]; attention reads the whole buffers (the
    caller's mask hides slots after each query)."""

    def __init__(self, cache: StaticKVCache, slots: torch.Tensor) -> None:
        self.cache, self.slots = cache, slots

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.cache.write(layer_idx, self.slots, keys, values)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class PrefillWriter:
    """A cache for ``prune_and_prefill`` from an empty cache: each layer's S new K/V go to slots 0..S-1 and attention
    reads just them (S = T for layers < K, T' for layers >= K), as with an empty dynamic cache."""

    def __init__(self, cache: StaticKVCache) -> None:
        self.cache = cache

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        slots = torch.arange(keys.shape[2], device=keys.device)  # [S]
        self.cache.write(layer_idx, slots, keys, values)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def slot_mask(query_slots: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """query_slots [S] -> additive mask [1, 1, S, L]: query s sees cache slots <= its own (causal over the cache)."""
    allowed = torch.arange(length, device=query_slots.device)[None, :] <= query_slots[:, None]  # [S, L]
    zero = torch.zeros((), dtype=dtype, device=query_slots.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[None, None]


def run_cached_layers(
    language_model: nn.Module,
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    writer: SlotWriter,
    mask: torch.Tensor,
    layers: range,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The stock decoder layers ``layers`` on hidden [1, S, D] at RoPE position_ids [1, S] (M-RoPE: [3, 1, S])
    over a static cache -> [1, S, D]. The cache slots are the writer's; RoPE positions need not equal them.
    position_embeddings: the rotary (cos, sin) [1, S, d] of ``position_ids`` when the caller already has them (a
    method that runs its layers in two calls at the same positions computes them once: fewer graph nodes to lower);
    None: computed here."""
    if position_embeddings is None:
        position_embeddings = rotary(language_model, hidden, position_ids)  # (cos, sin) [1, S, d]
    for index in layers:
        hidden = language_model.layers[index](
            hidden, attention_mask=mask, position_ids=position_ids, past_key_values=writer, use_cache=True,
            position_embeddings=position_embeddings,
        )
    return hidden


def last_logits(lm_head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden [1, S, D] -> float32 logits of the last position [1, V] (lm_head: the adapter's)."""
    return lm_head(hidden[:, -1]).float()
