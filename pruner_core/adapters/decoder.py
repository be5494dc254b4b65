"""Shared decoder machinery for Llama-like decoder stacks (Llama, Qwen2): the pruned prefill and the decode steps.

Runs a loaded model's stock decoder layers over a prompt with a split KV cache (layers < K cache the full prompt,
layers >= K the pruned one), gathers the kept positions, probes the signals at layer K-1 (output states, post-RoPE
keys, the last token's attention) and continues decoding from those caches. Family-agnostic: an adapter hands in the
decoder stack (``layers``, ``norm``, ``rotary_emb``, its config's ``_attn_implementation``), the prompt's embeddings
and where the image span sits.

Shapes: B batch, T prompt length, N image tokens, R kept tokens, T' = T - N + R, D text width, H query heads,
Hkv key/value heads, d head width, L decoder layers, K the pruning layer. Positions are [B, T] ("1d") in everything
here; the small position helpers (``prompt_positions``, ``gather_positions``, ``next_positions``) also take the
leading axis of M-RoPE's [3, B, T].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from ..api import select_tokens
from ..config import PrunerConfig
from ..methods import get_method
from ..primitives import take_rows
from ..selection import Selection


class KVCache(Protocol):
    """What the stock attention layers need from a cache: ``update`` appends and returns the layer's K/V."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs): ...

    def get_seq_length(self, layer_idx: int = 0) -> int: ...


class KVRecorder:
    """The smallest cache the stock layers accept: per layer, keys and values [B, Hkv, L_i, d] grown by ``update``.

    Plain lists of tensors, no transformers types, so an exporter can read them as graph outputs.
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.keys[layer_idx] is not None:
            key_states = torch.cat([self.keys[layer_idx], key_states], dim=-2)
            value_states = torch.cat([self.values[layer_idx], value_states], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        keys = self.keys[layer_idx]
        return 0 if keys is None else keys.shape[-2]


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, S, n*d] -> [B, n, S, d]"""
    batch, length, _ = x.shape
    return x.view(batch, length, -1, head_dim).transpose(1, 2)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, n, S, d], cos/sin [B, S, d] -> x rotated (the Llama rotary embedding, half-split convention)."""
    from transformers.models.llama.modeling_llama import rotate_half

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def layer_keys(layer: nn.Module, hidden_in: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The post-RoPE keys one decoder layer computes for its input, all heads concatenated after the GQA repeat.

    hidden_in [B, S, D] (the layer's input, before its input_layernorm), cos/sin [B, S, d] -> keys [B, S, H*d].
    """
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden_in)
    keys = _rope(_heads(attn.k_proj(normed), attn.head_dim), cos, sin)  # [B, Hkv, S, d]
    keys = keys.repeat_interleave(attn.num_key_value_groups, dim=1)  # [B, H, S, d]
    batch, heads, length, head_dim = keys.shape
    return keys.transpose(1, 2).reshape(batch, length, heads * head_dim)


def last_token_attention(
    layer: nn.Module,
    hidden_in: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of the last token over the whole sequence in one decoder layer, averaged over heads (FastV's signal).

    hidden_in [B, T, D] (the layer's input), cos/sin [B, T, d], key_valid [B, T] bool or None -> [B, T].
    """
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden_in)
    query = _rope(_heads(attn.q_proj(normed[:, -1:]), attn.head_dim), cos[:, -1:], sin[:, -1:])  # [B, H, 1, d]
    keys = _rope(_heads(attn.k_proj(normed), attn.head_dim), cos, sin)  # [B, Hkv, T, d]
    keys = keys.repeat_interleave(attn.num_key_value_groups, dim=1)  # [B, H, T, d]
    scores = (query @ keys.transpose(-1, -2)).float() * attn.scaling  # [B, H, 1, T]
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid[:, None, None, :], torch.finfo(scores.dtype).min)
    return scores.softmax(-1).mean(1)[:, 0].to(hidden_in.dtype)  # [B, T]


SUPPORTED_ATTENTION = ("sdpa", "eager")


def attention_bias(
    key_valid: torch.Tensor | None,
    batch: int,
    q_len: int,
    kv_len: int,
    dtype: torch.dtype,
    device: torch.device,
    implementation: str,
) -> torch.Tensor | None:
    """Causal + padding mask for the stock attention layers -> additive [B, 1, q_len, kv_len], or None.

    The queries are the last ``q_len`` of the ``kv_len`` cached entries (order = causality, whatever the RoPE
    positions are). key_valid [B, kv_len] bool marks real (non-padding) entries; None = no padding. With ``sdpa``
    and no padding, a square (prefill) or single-query (decode) block needs no mask: None lets sdpa use its causal
    kernel, as stock transformers does.
    """
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"attention implementation {implementation!r} is not supported by the pruned decoder; load the model "
            f"with attn_implementation in {SUPPORTED_ATTENTION}"
        )
    if key_valid is None and implementation == "sdpa" and (q_len == 1 or q_len == kv_len):
        return None
    query_index = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]  # [q, 1]
    allowed = torch.arange(kv_len, device=device)[None, :] <= query_index  # [q, kv]
    allowed = allowed[None, None].expand(batch, 1, q_len, kv_len)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :].bool()
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)  # finfo.min, not -inf: all-padding rows stay finite


def rotary(language_model: nn.Module, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stock rotary embedding's (cos, sin) [B, S, d] for positions [B, S].

    Calls the module's forward beneath its ``torch.no_grad`` decorator (same values): a grad-mode switch inside a
    graph that also holds the selection's ``scan`` / ``cond`` breaks ``torch.export`` (torch 2.13).
    """
    module = language_model.rotary_emb
    undecorated = getattr(type(module).forward, "__wrapped__", None)
    return undecorated(module, x, positions) if undecorated is not None else module(x, positions)


def run_layers(
    language_model: nn.Module,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    key_valid: torch.Tensor | None,
    cache: KVCache,
    layers: range,
) -> torch.Tensor:
    """Run the stock decoder layers ``layers`` on hidden [B, S, D] at RoPE positions [B, S] -> [B, S, D].

    Every layer in ``layers`` must hold the same number of cached entries (it appends S more); key_valid
    [B, cached + S] marks the non-padding entries (None = none padded).
    """
    if len(layers) == 0:
        return hidden
    batch, length, _ = hidden.shape
    kv_len = cache.get_seq_length(layers[0]) + length
    mask = attention_bias(
        key_valid, batch, length, kv_len, hidden.dtype, hidden.device, language_model.config._attn_implementation
    )
    position_embeddings = rotary(language_model, hidden, positions)  # (cos, sin) [B, S, d]
    for index in layers:
        hidden = language_model.layers[index](
            hidden,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            position_embeddings=position_embeddings,
        )
    return hidden


def _as_starts(image_start: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    if isinstance(image_start, torch.Tensor):
        return image_start.to(device=device, dtype=torch.long).reshape(-1).expand(batch)
    return torch.full((batch,), int(image_start), dtype=torch.long, device=device)


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, T] or [B, T, D] gathered along T with index [B, S] -> [B, S] or [B, S, D]"""
    if x.dim() == 2:
        return x.gather(1, index)
    return take_rows(x, index)


def kept_sequence_index(image_start: torch.Tensor, kept: torch.Tensor, length: int, n_image: int) -> torch.Tensor:
    """Where each slot of the pruned sequence comes from in the full one.

    image_start [B], kept [B, R] ascending indices within the N image tokens, length T -> [B, T - N + R]:
    [text before] + [start + kept] + [text after]. Static shapes, no data-dependent control flow.
    """
    budget = kept.shape[1]
    slot = torch.arange(length - n_image + budget, device=kept.device)[None, :]  # [1, T']
    start = image_start[:, None]  # [B, 1]
    in_image = (slot >= start) & (slot < start + budget)
    rel = (slot - start).clamp(0, budget - 1)  # [B, T']
    image_source = start + kept.gather(1, rel)
    return torch.where(in_image, image_source, torch.where(slot >= start + budget, slot + (n_image - budget), slot))


def _consecutive_positions(
    valid: torch.Tensor | None, batch: int, length: int, device: torch.device
) -> torch.Tensor:
    """Positions 0, 1, ... over the real tokens (padding gets 0), as generate makes them -> [B, length]."""
    if valid is None:
        return torch.arange(length, device=device)[None].expand(batch, length)
    positions = valid.long().cumsum(-1) - 1
    return positions.masked_fill(~valid, 0)


def prompt_positions(
    position_ids: torch.Tensor | None, batch: int, length: int, device: torch.device
) -> torch.Tensor:
    """A prompt's RoPE positions: position_ids [B, T] or [1, T] (M-RoPE: [3, B, T]) broadcast over the batch, or
    0..T-1 when None -> [B, T] ([3, B, T])."""
    if position_ids is None:
        return _consecutive_positions(None, batch, length, device)
    return position_ids.to(device).long().expand(*position_ids.shape[:-2], batch, length)


def gather_positions(positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """positions [B, T] (M-RoPE: [3, B, T]) at the slots index [B, S] -> [B, S] ([3, B, S])."""
    if positions.dim() == 2:
        return positions.gather(1, index)
    return positions.gather(-1, index.expand(*positions.shape[:-2], *index.shape))


def next_positions(positions: torch.Tensor) -> torch.Tensor:
    """The RoPE position right after a sequence: positions [B, T] -> [B] (its last + 1; M-RoPE [3, B, T]: the
    largest of the last token's three + 1)."""
    last = positions[..., -1]
    return (last if last.dim() == 1 else last.amax(0)) + 1


def image_span_starts(input_ids: torch.Tensor, image_token_id: int, n_image: int) -> torch.Tensor:
    """input_ids [B, T] -> image_start [B]: where each row's single run of ``n_image`` placeholders begins.

    Raises when a row has no image, several images, or a span of another length (the processor and the model
    disagree on the image size).
    """
    is_image = input_ids == image_token_id  # [B, T]
    counts = is_image.sum(1)
    starts = is_image.int().argmax(1)
    for row in range(input_ids.shape[0]):
        count, start = int(counts[row]), int(starts[row])
        if count != n_image or not bool(is_image[row, start : start + n_image].all()):
            raise ValueError(
                f"prompt {row} holds {count} image placeholder tokens but the pruner needs exactly one image of "
                f"{n_image} tokens in one run; use one image placeholder per prompt and the model's own processor"
            )
    return starts


@dataclass(frozen=True)
class PrunedPrefill:
    """What ``prune_and_prefill`` leaves besides the cache it filled.

    hidden:        [B, T', D]  final-norm hidden states of the pruned sequence (feed the LM head with hidden[:, -1])
    positions:     [B, T']     RoPE positions layers >= K used (K >= 1: the kept tokens' original ones; K = 0: 0..T'-1)
    kept_index:    [B, T']     index in the full prompt of each slot of the pruned sequence
    kept_valid:    [B, T']     non-padding mask of the pruned sequence
    next_position: [B]         RoPE position of the first generated token (K >= 1: full length; K = 0: T')
    selection:     the Selection (indices [B, R] within the image span, fused states [B, R, D], order)
    split_layer:   K; layers < K cached T entries, layers >= K cached T'
    """

    hidden: torch.Tensor
    positions: torch.Tensor
    kept_index: torch.Tensor
    kept_valid: torch.Tensor
    next_position: torch.Tensor
    selection: Selection
    split_layer: int


class SplitLayerError(ValueError):
    """PrunerConfig.layer past the language model's last decoder layer (``layer``, ``num_layers`` kept so that a
    command line can word it with its own flag)."""

    def __init__(self, layer: int, num_layers: int) -> None:
        super().__init__(
            f"PrunerConfig.layer={layer} but the language model has {num_layers} decoder layers; "
            f"prune at a layer in 0..{num_layers - 1} (0 = before the LLM, 2 = the paper's default)"
        )
        self.layer, self.num_layers = layer, num_layers


def check_split_layer(config: PrunerConfig, num_layers: int) -> int:
    """K = config.layer, checked against the decoder's ``num_layers``; raises SplitLayerError (a ValueError)."""
    if config.layer >= num_layers:
        raise SplitLayerError(config.layer, num_layers)
    return config.layer


def prune_and_prefill(
    language_model: nn.Module,
    embeds: torch.Tensor,
    image_start: int | torch.Tensor,
    n_image: int,
    grid: tuple[int, int],
    config: PrunerConfig,
    *,
    cache: KVCache,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cls_attention: torch.Tensor | None = None,
    original_positions: bool = False,
    merge: int = 1,
) -> PrunedPrefill:
    """Prefill the stock decoder layers on a prompt, keeping R of its N image tokens from layer K on.

    embeds [B, T, D]: the prompt's input embeddings with the projector outputs already in the image span
    [image_start, image_start + N) (``image_start`` an int, or [B] for left-padded batches). ``cache`` receives
    every layer's post-RoPE K/V: layers < K the full T entries, layers >= K the T' = T - N + R kept ones.
    attention_mask [B, T] (1 = real token) and position_ids [B, T] default to no padding and 0..T-1.

    K = config.layer >= 1 (the paper): layers < K run on the full prompt; the selection sees layer K-1's output at
    the image positions (no final norm) and layer K-1's post-RoPE keys there; layers >= K run on [text before] +
    [R kept tokens in original order, fused states] + [text after] at the kept tokens' ORIGINAL positions.
    K = 0: the selection sees the projector outputs and layer 0's keys for them; the kept sequence is an ordinary
    shorter prompt at consecutive positions (what stock runners do with an encoder that returns R tokens), or, with
    ``original_positions`` (M-RoPE families, whose runners pass positions explicitly), at the kept tokens' original
    positions as for K >= 1. position_ids may be M-RoPE's [3, B, T]; every position output then has the 3 in front.
    Signals for FastV (last token's head-mean attention at layer K-1; layer 0 for K = 0) are computed when the
    method needs them; VisionZip's ``cls_attention`` [B, N] must be passed in (see ``clip_cls_attention``). merge:
    patches per image token along each side (Qwen2-VL 2), which ``config.authors_grid`` reads (``select_tokens``).

    All shapes are fixed by (B, T, N, R), the loops run over layers only: callable under ``torch.export`` with
    int ``image_start`` / ``n_image``.
    """
    batch, length, _ = embeds.shape
    num_layers = len(language_model.layers)
    split = check_split_layer(config, num_layers)
    device = embeds.device
    starts = _as_starts(image_start, batch, device)  # [B]
    valid = None if attention_mask is None else attention_mask.to(device).bool()  # [B, T]
    positions = prompt_positions(position_ids, batch, length, device)  # [B, T]

    # layers < K-1, then layer K-1 (whose input the signals probe) on the full prompt
    probe_in = run_layers(language_model, embeds, positions, valid, cache, range(max(split - 1, 0)))
    hidden = run_layers(language_model, probe_in, positions, valid, cache, range(max(split - 1, 0), split))

    pruned, kept_index, selection = prune_sequence(
        language_model, probe_in, hidden, positions, starts, n_image, grid, config, valid=valid,
        cls_attention=cls_attention, merge=merge,
    )  # [B, T', D], [B, T']
    kept_valid = torch.ones_like(kept_index, dtype=torch.bool) if valid is None else valid.gather(1, kept_index)
    if split == 0 and not original_positions:  # an ordinary shorter prompt
        kept_positions = _consecutive_positions(None if valid is None else kept_valid, *kept_index.shape, device)
    else:  # the kept tokens keep their original RoPE positions
        kept_positions = gather_positions(positions, kept_index)

    pruned = run_layers(
        language_model, pruned, kept_positions, None if valid is None else kept_valid, cache, range(split, num_layers)
    )
    return PrunedPrefill(
        hidden=language_model.norm(pruned),
        positions=kept_positions,
        kept_index=kept_index,
        kept_valid=kept_valid,
        next_position=next_positions(kept_positions if split == 0 and not original_positions else positions),
        selection=selection,
        split_layer=split,
    )


def prune_sequence(
    language_model: nn.Module,
    probe_in: torch.Tensor,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    starts: torch.Tensor,
    n_image: int,
    grid: tuple[int, int],
    config: PrunerConfig,
    *,
    valid: torch.Tensor | None = None,
    cls_attention: torch.Tensor | None = None,
    merge: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, Selection]:
    """The selection between layers K-1 and K (``prune_and_prefill``'s middle step, paper Sec. 3).

    probe_in [B, T, D]: layer K-1's input (layer 0's for K = 0: the embeddings); hidden [B, T, D]: layer K-1's output
    (K = 0: the embeddings again); positions [B, T] (M-RoPE [3, B, T]); starts [B] int64: where the N image tokens
    begin; valid [B, T] bool or None. -> (pruned [B, T - N + R, D]: text before + the R kept tokens' fused states +
    text after, kept_index [B, T - N + R] int64: where each slot comes from in the prompt, the Selection).
    """
    split = config.layer
    device = hidden.device
    image_index = starts[:, None] + torch.arange(n_image, device=device)[None]  # [B, N]
    text_attention, keys = _decoder_signals(
        language_model, get_method(config.method).needs, max(split - 1, 0), probe_in, positions, valid, image_index
    )
    selection = select_tokens(
        _gather_tokens(hidden, image_index), keys, grid, config,
        text_attention=text_attention, cls_attention=cls_attention, merge=merge,
    )
    pruned, kept_index = _pruned_sequence(hidden, starts, selection, n_image)
    return pruned, kept_index, selection


def _decoder_signals(
    language_model: nn.Module,
    needs: frozenset[str],
    probe_index: int,
    probe_in: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor | None,
    image_index: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The decoder-side signals a method needs, from layer ``probe_index`` and its input probe_in [B, T, D].

    -> (text_attention [B, N] or None, keys [B, N, H*d] or None), both at the image positions image_index [B, N].
    """
    probe = language_model.layers[probe_index]
    keys = text_attention = None
    if "keys" in needs:
        image_in = _gather_tokens(probe_in, image_index)  # [B, N, D]
        cos_sin = rotary(language_model, image_in, gather_positions(positions, image_index))
        keys = layer_keys(probe, image_in, *cos_sin)
    if "text_attention" in needs:
        cos_sin = rotary(language_model, probe_in, positions)
        text_attention = _gather_tokens(last_token_attention(probe, probe_in, *cos_sin, valid), image_index)
    return text_attention, keys


def _pruned_sequence(
    hidden: torch.Tensor, starts: torch.Tensor, selection: Selection, n_image: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B, T, D] -> (pruned [B, T', D], kept_index [B, T']).

    pruned = [text before] + [the kept tokens, their fused states] + [text after].
    """
    budget = selection.indices.shape[1]
    kept_index = kept_sequence_index(starts, selection.indices, hidden.shape[1], n_image)  # [B, T']
    slot = torch.arange(kept_index.shape[1], device=hidden.device)[None] - starts[:, None]  # [B, T'] rel. to span
    in_image = (slot >= 0) & (slot < budget)
    fused = _gather_tokens(selection.states.to(hidden.dtype), slot.clamp(0, budget - 1))  # [B, T', D]
    return torch.where(in_image[..., None], fused, _gather_tokens(hidden, kept_index)), kept_index


def decode_step(
    language_model: nn.Module,
    embeds: torch.Tensor,
    positions: torch.Tensor,
    cache: KVCache,
    split_layer: int,
    key_valid_full: torch.Tensor | None = None,
    key_valid_pruned: torch.Tensor | None = None,
) -> torch.Tensor:
    """Continue from a ``prune_and_prefill`` cache: embeds [B, S, D] at RoPE positions [B, S] -> final-norm [B, S, D].

    Layers < split_layer attend over their full-prompt cache, layers >= split_layer over the pruned one; both
    append the S new entries. key_valid_full [B, cached_full + S] / key_valid_pruned [B, cached_pruned + S] mark
    non-padding entries (None = no padding). Positions continue from ``PrunedPrefill.next_position``.
    """
    num_layers = len(language_model.layers)
    hidden = run_layers(language_model, embeds, positions, key_valid_full, cache, range(split_layer))
    hidden = run_layers(language_model, hidden, positions, key_valid_pruned, cache, range(split_layer, num_layers))
    return language_model.norm(hidden)


@dataclass(frozen=True)
class PrefillOutput:
    """The result of ``prefill_with_pruning`` / ``prefill_recorded``: everything a decoder needs to continue, as
    plain tensors.

    logits:        [B, V]  next-token logits after the prompt
    keys / values: L tensors [B, Hkv, L_i, d], post-RoPE; L_i = T for layers < K, T' = T - N + R for layers >= K
    positions:     [B, T'] RoPE positions of the pruned sequence in layers >= K
    next_position: [B]     RoPE position of the first generated token (T for K >= 1 without padding; T' for K = 0)
    kept_index:    [B, T'] index in the full prompt of each pruned-sequence slot
    selection:     the Selection (indices [B, R], fused states [B, R, D], order [B, R])
    split_layer:   K
    """

    logits: torch.Tensor
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    positions: torch.Tensor
    next_position: torch.Tensor
    kept_index: torch.Tensor
    selection: Selection
    split_layer: int


def prefill_recorded(
    language_model: nn.Module,
    lm_head: nn.Module,
    embeds: torch.Tensor,
    image_start: int | torch.Tensor,
    n_image: int,
    grid: tuple[int, int],
    config: PrunerConfig,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cls_attention: torch.Tensor | None = None,
    original_positions: bool = False,
    merge: int = 1,
) -> PrefillOutput:
    """``prune_and_prefill`` into a ``KVRecorder`` -> logits after the prompt and the per-layer K/V as plain tensors.

    language_model: the decoder stack; lm_head: final-norm hidden [B, 1, D] -> [B, 1, V]. Every output shape is
    static for Python ints image_start / n_image. Each family's ``prefill_with_pruning`` is this on its modules.
    """
    recorder = KVRecorder(len(language_model.layers))
    result = prune_and_prefill(
        language_model, embeds, image_start, n_image, grid, config,
        cache=recorder, attention_mask=attention_mask, position_ids=position_ids, cls_attention=cls_attention,
        original_positions=original_positions, merge=merge,
    )
    logits = lm_head(result.hidden[:, -1:])[:, 0]  # [B, V] (a 3-D matmul: ONNX keeps it a MatMul, not a Gemm)
    return PrefillOutput(
        logits=logits,
        keys=tuple(recorder.keys),
        values=tuple(recorder.values),
        positions=result.positions,
        next_position=result.next_position,
        kept_index=result.kept_index,
        selection=result.selection,
        split_layer=result.split_layer,
    )
