"""The paper's placement (prune between decoder layers K-1 and K, K >= 1) in ExecuTorch's stock LLM runner.

The runner (``extension/llm/runner``: ``MultimodalRunner``, Android's ``LlmModule``) calls, for a prompt
``[text before] [image] [text after]``: ``text_decoder(embeddings, input_pos)`` on the text before at its start
position, ``vision_encoder(pixel_values)`` and ``text_decoder`` on what it returns at the next position (it advances
its position by the number of rows returned), ``text_decoder`` on the text after, then one token at a time. No runner
change: the two methods share state in mutable buffers (``share_mutable_buffers``) and do the pruning between them.

* ``vision_encoder`` (``PruningVisionEncoder``): the N projector outputs go through decoder layers < K at their full
  positions ``s .. s + N - 1`` (s: where the text before ended, ``next_position``), attending to the text before in
  the full caches and writing theirs; VLM-Pruner selects R of them from layer K-1's output states and post-RoPE keys
  (the static form, ``select_tokens``); it returns the R fused states: layer K's input for the kept tokens. It
  records their full positions (``kept_positions``), that an image is pending, and that the runner's positions now
  lag the full ones by N - R (``position_offset``).
* ``text_decoder`` (``SplitCacheTextDecoder``): rows of a chunk are text, or (the first R rows of the first chunk
  after ``vision_encoder``) the pending image. Text rows run layers < K at full position ``input_pos +
  position_offset + t``, writing the full caches; image rows skip them (their layers < K ran in the vision encoder;
  their writes go to R spare slots). Every row then runs layers >= K at its RoPE position (text: full; image: the
  kept token's original one), writing the compact caches at the next free slot (``compact_length``). So layers < K
  see every token, layers >= K only the kept ones, at their original positions, and text after the image and every
  decode step continue from the unpruned positions: the eager ``prune_and_prefill`` + ``decode_step``, chunk by chunk.
  A call at ``input_pos`` 0 starts a new conversation (its state is reset), which also makes a second, image-free
  generation on the same runner an ordinary unpruned one.

M-RoPE families (Qwen2-VL: (t, h, w) positions that are not the cache slots) keep the same slots and state, with
two differences: ``vision_encoder`` also returns ``kept_image_indices`` [1, R], and ``text_decoder`` takes every
row's RoPE positions as a third input, position_ids [3, 1, T] (``PositionedSplitCacheTextDecoder``): the caller
(this project's runtime, runtime/positions.py) gives the image rows the kept tokens' original positions and the text
after and every decode step the unpruned ones. The image at slot s takes positions s + the adapter's
``prompt_positions(0, grid, 0)`` in ``vision_encoder``; the text before it sits at positions = slots.

Limits: one image per conversation, after some text (every chat template starts with text); batch 1. The runner's
positions count R image tokens, so ``get_max_seq_len`` is the compact caches' length, max_seq_len - (N - R).
"""

from __future__ import annotations

import torch
from torch import nn

from pruner_core import PrunerConfig, select_tokens
from pruner_core.adapters.decoder import rotary
from pruner_core.methods import get_method

from .static_cache import SlotWriter, StaticKVCache, last_logits, run_cached_layers, slot_mask


class RunnerState(nn.Module):
    """The state ``vision_encoder`` hands ``text_decoder`` through the runner (int64 mutable buffers, shared by
    name across the program's methods). Positions here are cache slots of the full caches (the 1-D RoPE positions).

    image_pending [1]: 1 between vision_encoder and the text_decoder call that consumes its rows.
    position_offset [1]: full slot minus the runner's position (N - R once the image is in).
    next_position [1]: the full slot after the last token written (where an image starts).
    compact_length [1]: filled slots of the compact caches (layers >= K).
    kept_positions [R]: full slots of the kept image tokens.
    """

    def __init__(self, kept_tokens: int) -> None:
        super().__init__()
        for name, size in (("image_pending", 1), ("position_offset", 1), ("next_position", 1),
                           ("compact_length", 1), ("kept_positions", kept_tokens)):
            self.register_buffer(name, torch.zeros(size, dtype=torch.long), persistent=False)


def cached_keys(cache: StaticKVCache, layer: int, slots: torch.Tensor, attention: nn.Module) -> torch.Tensor:
    """The post-RoPE keys a decoder layer just wrote at ``slots`` [S], all heads concatenated after the GQA repeat:
    the adapter's ``layer_keys`` for those tokens, read back instead of computed twice. -> [1, S, H * d]"""
    keys = cache.layer(layer)[0].index_select(2, slots)  # [1, Hkv, S, d]
    keys = keys.repeat_interleave(attention.num_key_value_groups, dim=1)  # [1, H, S, d]
    batch, heads, length, head_dim = keys.shape
    return keys.transpose(1, 2).reshape(batch, length, heads * head_dim)


class PruningVisionEncoder(nn.Module):
    """pixel_values (the adapter's pixel input) -> layer K's input for the R kept image tokens [1, R, D], and with
    ``returns_indices`` also kept_image_indices [1, R] int64 (see the module docstring).

    vision: the adapter's exportable vision module (pixel_values -> [1, N, D]); language_model / lm_head: the
    adapter's; image_positions: RoPE position ids of the N image tokens for an image starting at position 0, [1, N]
    or M-RoPE's [3, 1, N] (the adapter's ``prompt_positions(0, grid, 0)``): the image starting at slot s has
    positions s + image_positions (the text before it sits at positions = slots)."""

    def __init__(self, vision: nn.Module, language_model: nn.Module, cache: StaticKVCache, state: RunnerState,
                 image_positions: torch.Tensor, grid: tuple[int, int], config: PrunerConfig, dtype: torch.dtype,
                 returns_indices: bool = False, merge: int = 1) -> None:
        super().__init__()
        self.vision, self.language_model, self.cache, self.state = vision, language_model, cache, state
        self.register_buffer("image_positions", image_positions, persistent=False)
        self.grid, self.config, self.dtype, self.returns_indices = grid, config, dtype, returns_indices
        self.merge = merge  # vision patches per image token along a side (PrunerConfig.authors_grid reads it)

    def forward(self, pixel_values: torch.Tensor):
        language_model, split = self.language_model, self.config.layer
        features = self.vision(pixel_values.to(self.dtype)).to(self.dtype)  # [1, N, D]
        num_image = features.shape[1]
        start = self.state.next_position  # [1]
        slots = start + torch.arange(num_image, device=features.device)  # [N] full slots
        position_ids = self.image_positions + start  # [1, N] or [3, 1, N]
        writer = SlotWriter(self.cache, slots)
        mask = slot_mask(slots, self.cache.lengths[0], features.dtype)  # [1, 1, N, L + R]
        rope = rotary(language_model, features, position_ids)  # (cos, sin) [1, N, d], for both calls
        probe_in = run_cached_layers(language_model, features, position_ids, writer, mask, range(split - 1), rope)
        hidden = run_cached_layers(language_model, probe_in, position_ids, writer, mask, range(split - 1, split),
                                   rope)
        keys = None
        if "keys" in get_method(self.config.method).needs:  # layer K-1's post-RoPE keys of the image tokens
            keys = cached_keys(self.cache, split - 1, slots, language_model.layers[split - 1].self_attn)
        selection = select_tokens(hidden, keys, self.grid, self.config, merge=self.merge)  # [1, R], [1, R, D]
        self.state.kept_positions.copy_(start + selection.indices[0])
        self.state.image_pending.copy_(torch.ones_like(self.state.image_pending))
        self.state.position_offset.copy_(torch.full_like(start, num_image - selection.budget))
        self.state.next_position.copy_(start + num_image)
        if self.returns_indices:
            return selection.states, selection.indices  # [1, R, D], [1, R]
        return selection.states  # [1, R, D]


class SplitCacheTextDecoder(nn.Module):
    """embeddings [1, T, D] at the runner's position input_pos [1] -> float32 logits [1, V] of the last row (see the
    module docstring); 1-D RoPE positions, mapped from the runner's inside. ``full_length`` is max_seq_len: the full
    caches hold it plus R spare slots."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Module, cache: StaticKVCache, state: RunnerState,
                 split_layer: int, full_length: int) -> None:
        super().__init__()
        self.language_model, self.lm_head, self.cache, self.state = language_model, lm_head, cache, state
        self.split_layer, self.full_length = split_layer, full_length

    def forward(self, embeddings: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.run(embeddings, input_pos, None)

    def run(self, embeddings: torch.Tensor, input_pos: torch.Tensor,
            position_ids: torch.Tensor | None) -> torch.Tensor:
        """position_ids: the rows' RoPE positions [3, 1, T] (M-RoPE, given by the caller), or None (1-D: the full
        position of a text row, the kept token's original one for an image row)."""
        language_model, state, split = self.language_model, self.state, self.split_layer
        budget = state.kept_positions.shape[0]
        row = torch.arange(embeddings.shape[1], device=embeddings.device)  # [T]
        fresh = input_pos == 0  # [1]: a new conversation
        offset = torch.where(fresh, torch.zeros_like(input_pos), state.position_offset)  # [1]
        compact = torch.where(fresh, torch.zeros_like(input_pos), state.compact_length)  # [1]
        pending = (state.image_pending > 0) & ~fresh  # [1]
        image_rows = pending & (row < budget)  # [T]
        text_slots = input_pos + offset + row  # [T] full slots
        if position_ids is None:
            kept = state.kept_positions.index_select(0, row.clamp(max=budget - 1))  # [T]
            position_ids = torch.where(image_rows, kept, text_slots)[None]  # [1, T] RoPE positions

        full_slots = torch.where(image_rows, self.full_length + row.clamp(max=budget - 1), text_slots)  # [T]
        rope = rotary(language_model, embeddings, position_ids)  # (cos, sin) [1, T, d], for both calls
        below = run_cached_layers(
            language_model, embeddings, position_ids, SlotWriter(self.cache, full_slots),
            slot_mask(full_slots, self.cache.lengths[0], embeddings.dtype), range(split), rope,
        )
        hidden = torch.where(image_rows[None, :, None], embeddings, below)  # image rows arrive as layer K's input
        compact_slots = compact + row  # [T]
        hidden = run_cached_layers(
            language_model, hidden, position_ids, SlotWriter(self.cache, compact_slots),
            slot_mask(compact_slots, self.cache.lengths[-1], embeddings.dtype),
            range(split, len(language_model.layers)), rope,
        )
        state.compact_length.copy_(compact + embeddings.shape[1])
        state.next_position.copy_(input_pos + offset + embeddings.shape[1])
        state.position_offset.copy_(offset)
        state.image_pending.copy_(torch.zeros_like(state.image_pending))
        return last_logits(self.lm_head, language_model.norm(hidden))


class PositionedSplitCacheTextDecoder(SplitCacheTextDecoder):
    """M-RoPE: (embeddings [1, T, D], input_pos [1], position_ids [3, 1, T] int64) -> logits [1, V]. The caller
    gives every row's (t, h, w): text at the unpruned positions, the image rows at the kept tokens' original ones
    (from ``vision_encoder``'s kept_image_indices, runtime/positions.py); slots are mapped as for 1-D."""

    def forward(self, embeddings: torch.Tensor, input_pos: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.run(embeddings, input_pos, position_ids)
