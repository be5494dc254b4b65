"""The ONNX target's graphs as modules and their plans, for every model family (LLaVA-1.5, Qwen2-VL /
Qwen2.5-VL).

``OnnxShapes`` holds every static dim of every graph, read from the model's adapter (its geometry at the export
size) and the pruner config: nothing here knows a grid, a layer count or a width. The modules wrap the stock modules
of one loaded model (nothing is copied); a ``GraphPlan`` gives each one its example inputs, dynamic dims and contract
(input / output names, shapes, dtypes), which export/onnx_contract.py checks the written graph against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pruner_core import PrunerConfig
from pruner_core.adapters import KVRecorder, adapter_for, check_split_layer, decode_step
from pruner_core.adapters.decoder import gather_positions, prune_sequence, run_layers

from .common import TokenEmbedding, tensor_spec

# Dynamic dimensions, as export_config.json and the ONNX files name them.
SEQUENCE = "sequence_length"  # tokens fed in this call
PAST = "past_sequence_length"  # cached entries of the layers that keep the full prompt (all layers at layer 0)
PRUNED_PAST = "pruned_past_sequence_length"  # cached entries of layers >= K (layer >= 1 only)
# layers >= K's present length at layer >= 1: sequence_length - (N - R) at the prompt, pruned_past + sequence_length
# at a decoding step (data-dependent: the graph's If decides); export_config.json records both
PRUNED_PRESENT = "pruned_present_sequence_length"

SPEC_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int64: "int64"}


# ================================================================================================================
# What the graphs need to know about the model
# ================================================================================================================


@dataclass(frozen=True)
class OnnxShapes:
    """Sizes read from a loaded model (any family) and the pruner config; every static dim of every graph comes
    from here."""

    num_layers: int  # L decoder layers
    kv_heads: int  # Hkv
    head_dim: int  # d
    hidden: int  # D
    vocab: int  # V
    grid: tuple[int, int]  # (rows, cols) of the image tokens
    budget: int  # R kept image tokens
    split_layer: int  # K
    pixel_input: tuple[int, ...]  # pixel_values' shape: LLaVA [1, C, H, W]; Qwen2-VL [P, 3 * 2 * 14 * 14]
    prompt_image_start: int  # where the model's prompt format puts the image span
    dtype: torch.dtype
    position_scheme: str = "1d"  # "1d": position_ids [1, S]; "mrope": [3, 1, S] (Qwen2-VL)
    merge: int = 1  # patches per image token along each side (Qwen2-VL 2): PrunerConfig.authors_grid reads it

    @property
    def n_image(self) -> int:  # N
        return self.grid[0] * self.grid[1]

    def position_shape(self, length: int | str) -> list[int | str]:
        """position_ids' shape for ``length`` tokens: [1, S] or M-RoPE's [3, 1, S]."""
        return [3, 1, length] if self.position_scheme == "mrope" else [1, length]

    @property
    def placeholders(self) -> int:
        """Image placeholder tokens the prompt must carry: R at layer 0 (the encoder returns R), else N."""
        return self.budget if self.split_layer == 0 else self.n_image


def read_shapes(model: nn.Module, processor: Any, config: PrunerConfig, dtype: torch.dtype) -> OnnxShapes:
    """Every static dim from the model's adapter (its geometry at the export size) and the pruner config."""
    adapter = adapter_for(model)
    geometry = adapter.geometry(model)
    grid = geometry.grid
    split = check_split_layer(config, geometry.num_layers)
    return OnnxShapes(
        num_layers=geometry.num_layers,
        kv_heads=geometry.num_kv_heads,
        head_dim=geometry.head_dim,
        hidden=geometry.hidden_size,
        vocab=adapter.lm_head(model).out_features,
        grid=grid,
        budget=config.budget(grid[0] * grid[1]),
        split_layer=split,
        pixel_input=tuple(adapter.pixel_input_shape(geometry)),
        prompt_image_start=adapter.prompt_image_start(processor.tokenizer, geometry.image_token_id),
        dtype=dtype,
        position_scheme=geometry.position_scheme,
        merge=geometry.merge,
    )


# ================================================================================================================
# The graphs as modules (each wraps the stock modules of one loaded model; nothing is copied)
# ================================================================================================================


def _language_model(model: nn.Module) -> nn.Module:
    return model.model.language_model


def _flatten_kv(keys, values) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(key, value) for key, value in zip(keys, values, strict=True)]


class PrunedVisionEncoder(nn.Module):
    """(pixel_values (the adapter's pixel input), image_start [1]) -> (image_features [1, R, D],
    kept_image_indices [1, R]).

    Layer 0: the selection sees the projector outputs and (for methods that read keys) decoder layer 0's post-RoPE
    keys of them at their positions in the full prompt, image_start .. image_start + N - 1, exactly as
    ``prune_and_prefill`` does at K = 0. The kept states are what the prompt's R placeholders receive.
    """

    def __init__(self, model: nn.Module, config: PrunerConfig, grid: tuple[int, int], image_size: tuple[int, int]):
        super().__init__()
        self.adapter = adapter_for(model)
        self.model = model
        self.encoder = self.adapter.vision_encoder(model, image_size)
        self.config = config
        self.grid = grid

    def forward(self, pixel_values: torch.Tensor, image_start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(pixel_values)  # [1, N, D]
        selection = self.adapter.select_before_llm(self.model, features, image_start, self.grid, self.config)
        return selection.states, selection.indices  # [1, R, D], [1, R]


class _Decoder(nn.Module):
    """The stock decoder layers, final norm and LM head over a cache given as plain per-layer tensors."""

    def __init__(self, model: nn.Module, split_layer: int):
        super().__init__()
        self.language_model = _language_model(model)
        self.lm_head = model.lm_head
        self.split_layer = split_layer

    def _run(self, embeds, positions, past, key_valid_full, key_valid_pruned):
        """embeds [1, S, D], positions [1, S] (M-RoPE [3, 1, S]), past: L pairs [1, Hkv, P_i, d] -> (logits
        [1, S, V], L pairs)."""
        cache = KVRecorder(len(past))
        cache.keys, cache.values = [k for k, _ in past], [v for _, v in past]
        hidden = decode_step(
            self.language_model, embeds, positions, cache, self.split_layer, key_valid_full, key_valid_pruned
        )  # [1, S, D], final norm applied
        return self.lm_head(hidden), _flatten_kv(cache.keys, cache.values)


class MergedDecoder(_Decoder):
    """Layer 0 (and an unpruned model): the conventional merged decoder.

    (inputs_embeds [1, S, D], attention_mask [1, P + S], position_ids [1, S], past L pairs [1, Hkv, P, d])
    -> (logits [1, S, V], present L pairs [1, Hkv, P + S, d]). P = 0 is the prefill.
    """

    def __init__(self, model: nn.Module):
        super().__init__(model, split_layer=0)

    def forward(self, inputs_embeds, attention_mask, position_ids, past):
        return self._run(inputs_embeds, position_ids, past, None, attention_mask.bool())


class PrunedDecoder(_Decoder):
    """Layer K >= 1 (the paper's placement): one graph for the prompt's pruned prefill and the decoding steps.

    (inputs_embeds [1, S, D], position_ids [1, S] (M-RoPE [3, 1, S]), image_start [1] int64, past: K pairs
    [1, Hkv, P, d] then L-K pairs [1, Hkv, P', d]) -> (logits [1, 1, V] of the last token, kept_image_indices [1, R]
    int64, present: [1, Hkv, P + S, d] for layers < K, [1, Hkv, P' + S', d] for layers >= K).

    image_start >= 0: the call is the prompt (empty caches), its N image tokens start there; layers < K run on all
    S tokens, R of the N are selected from layer K-1's output (``decoder.prune_sequence``) and layers >= K run on
    S' = S - N + R tokens at the kept tokens' original positions. image_start = -1: a decoding step (S' = S, the
    kept indices come back as -1). The two paths are a ``torch.cond`` (an ONNX ``If``) around the selection only, so
    every decoder weight has one consumer and is stored and loaded once (issue: weights held twice at layer K).
    The mask is causal over each cache (no padding at batch 1).
    """

    def __init__(self, model: nn.Module, config: PrunerConfig, grid: tuple[int, int], merge: int = 1):
        super().__init__(model, split_layer=config.layer)
        self.config = config
        self.grid, self.merge = grid, merge

    def forward(self, inputs_embeds, position_ids, image_start, past):
        language_model, split = self.language_model, self.split_layer
        cache = KVRecorder(len(past))
        cache.keys, cache.values = [k for k, _ in past], [v for _, v in past]
        full = torch.ones(1, past[0][0].shape[2] + inputs_embeds.shape[1], dtype=torch.bool)  # explicit: free shapes
        probe_in = run_layers(language_model, inputs_embeds, position_ids, full, cache, range(split - 1))
        hidden = run_layers(language_model, probe_in, position_ids, full, cache, range(split - 1, split))
        width, rank = hidden.shape[-1], position_ids.dim()
        n_image, budget = self.grid[0] * self.grid[1], self.config.budget(self.grid[0] * self.grid[1])

        # cond branches return flat tensors: their lengths differ (S - N + R or S), and flat ones have plain strides
        def prune(hidden, probe_in, positions, image_start):
            pruned, kept_index, selection = prune_sequence(
                language_model, probe_in, hidden, positions, image_start.reshape(1), n_image, self.grid, self.config,
                merge=self.merge,
            )
            return pruned.reshape(-1), gather_positions(positions, kept_index).reshape(-1), selection.indices.clone()

        def keep(hidden, probe_in, positions, image_start):
            kept = torch.full((1, budget), -1, dtype=torch.long, device=hidden.device)
            return hidden.reshape(-1).clone(), positions.reshape(-1).clone(), kept

        pruned, positions, kept = torch.cond(image_start[0] >= 0, prune, keep,
                                             (hidden, probe_in, position_ids, image_start))
        pruned = pruned.reshape(1, -1, width)  # [1, S', D]
        positions = positions.reshape(*position_ids.shape[: rank - 1], -1)  # [1, S'] or [3, 1, S']
        pruned_valid = torch.ones(1, past[-1][0].shape[2] + pruned.shape[1], dtype=torch.bool)
        hidden = run_layers(language_model, pruned, positions, pruned_valid, cache, range(split, len(past)))
        last = hidden[:, -1].unsqueeze(1)  # [1, 1, D]: a select, so the graph knows the 1 statically
        logits = self.lm_head(language_model.norm(last))  # [1, 1, V] (3-D: a MatMul in ONNX, as int4 needs)
        return logits, kept, _flatten_kv(cache.keys, cache.values)


# ================================================================================================================
# Graph plans: module, example inputs, dynamic dims and the contract (names, shapes, dtypes) of each graph
# ================================================================================================================


@dataclass
class GraphPlan:
    """One graph to export. ``inputs`` / ``outputs`` are tensor_spec dicts: the contract export_config.json records
    and the ONNX file is checked against; ``input_defaults`` become overridable initializers (inputs a
    transformers.js-style runtime may leave out)."""

    name: str
    module: nn.Module
    example: tuple[Any, ...]
    dynamic_shapes: tuple[Any, ...] | None
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    input_defaults: dict[str, np.ndarray] = field(default_factory=dict)
    data_dependent_dims: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {when: expression}


def _kv_specs(prefix: str, shapes: OnnxShapes, lengths: list[int | str], dtype: str) -> list[dict[str, Any]]:
    """past_key_values.{i}.key/value or present.{i}.key/value, [1, Hkv, lengths[i], d]."""
    return [
        tensor_spec(f"{prefix}.{i}.{kind}", [1, shapes.kv_heads, length, shapes.head_dim], dtype)
        for i, length in enumerate(lengths)
        for kind in ("key", "value")
    ]


def _example_kv(shapes: OnnxShapes, lengths: list[int], generator: torch.Generator) -> list[tuple]:
    def tensor(length: int) -> torch.Tensor:
        return torch.randn(1, shapes.kv_heads, length, shapes.head_dim, generator=generator).to(shapes.dtype)

    return [(tensor(length), tensor(length)) for length in lengths]


def _dyn() -> Any:
    return torch.export.Dim.DYNAMIC


def vision_plan(model: nn.Module, shapes: OnnxShapes, config: PrunerConfig, generator) -> GraphPlan:
    dtype = SPEC_DTYPES[shapes.dtype]
    pixels = torch.randn(*shapes.pixel_input, generator=generator).to(shapes.dtype)
    pixel_spec = tensor_spec("pixel_values", list(shapes.pixel_input), dtype)
    adapter = adapter_for(model)
    image_size = adapter.geometry(model).image_size
    if shapes.split_layer >= 1:
        return GraphPlan(
            name="vision_encoder", module=adapter.vision_encoder(model, image_size), example=(pixels,),
            dynamic_shapes=None,
            inputs=[pixel_spec], outputs=[tensor_spec("image_features", [1, shapes.n_image, shapes.hidden], dtype)],
        )
    start = np.array([shapes.prompt_image_start], dtype=np.int64)
    return GraphPlan(
        name="vision_encoder", module=PrunedVisionEncoder(model, config, shapes.grid, image_size),
        example=(pixels, torch.from_numpy(start)), dynamic_shapes=None,
        inputs=[pixel_spec, tensor_spec("image_start", [1], "int64")],
        outputs=[tensor_spec("image_features", [1, shapes.budget, shapes.hidden], dtype),
                 tensor_spec("kept_image_indices", [1, shapes.budget], "int64")],
        input_defaults={"image_start": start},
    )


def embed_plan(model: nn.Module, shapes: OnnxShapes, generator) -> GraphPlan:
    ids = torch.randint(0, shapes.vocab, (1, 5), generator=generator)
    return GraphPlan(
        name="embed_tokens", module=TokenEmbedding(model), example=(ids,), dynamic_shapes=({1: _dyn()},),
        inputs=[tensor_spec("input_ids", [1, SEQUENCE], "int64")],
        outputs=[tensor_spec("inputs_embeds", [1, SEQUENCE, shapes.hidden], SPEC_DTYPES[shapes.dtype])],
    )


def decoder_plan(model: nn.Module, shapes: OnnxShapes, config: PrunerConfig, generator) -> GraphPlan:
    """decoder_model_merged: the conventional one at layer 0; at layer >= 1 ``PrunedDecoder``, which also runs the
    prompt's pruned prefill."""
    dtype, split, layers = SPEC_DTYPES[shapes.dtype], shapes.split_layer, shapes.num_layers
    seq, past, pruned = 3, 7, 5  # distinct example sizes, so tracing cannot tie the dims together
    embeds = torch.randn(1, seq, shapes.hidden, generator=generator).to(shapes.dtype)
    head = [tensor_spec("inputs_embeds", [1, SEQUENCE, shapes.hidden], dtype)]
    logits = tensor_spec("logits", [1, SEQUENCE, shapes.vocab], dtype)
    positions = torch.arange(past, past + seq).expand(*shapes.position_shape(seq))  # [1, S] or [3, 1, S]
    position_dim = {positions.dim() - 1: _dyn()}
    position_spec = tensor_spec("position_ids", shapes.position_shape(SEQUENCE), "int64")
    if split == 0:
        total = f"{PAST} + {SEQUENCE}"
        example = (embeds, torch.ones(1, past + seq, dtype=torch.int64), positions,
                   _example_kv(shapes, [past] * layers, generator))
        return GraphPlan(
            name="decoder_model_merged", module=MergedDecoder(model), example=example,
            dynamic_shapes=({1: _dyn()}, {1: _dyn()}, position_dim, [({2: _dyn()}, {2: _dyn()})] * layers),
            inputs=head + [tensor_spec("attention_mask", [1, total], "int64"), position_spec]
            + _kv_specs("past_key_values", shapes, [PAST] * layers, dtype),
            outputs=[logits] + _kv_specs("present", shapes, [total] * layers, dtype),
        )
    # layer K: traced at the prompt's shapes (the selection needs S >= N), with non-empty caches (a size-0 example
    # would be specialised); the decoding steps take the other branch of the same graph
    dropped = shapes.n_image - shapes.budget
    length = shapes.prompt_image_start + shapes.n_image + 6  # an example prompt: text, image span, text
    embeds = torch.randn(1, length, shapes.hidden, generator=generator).to(shapes.dtype)
    if shapes.position_scheme == "mrope":
        from runtime.positions import mrope_positions

        after = length - shapes.prompt_image_start - shapes.n_image
        positions = torch.from_numpy(mrope_positions(shapes.prompt_image_start, shapes.grid, after)) + past
    else:
        positions = torch.arange(past, past + length)[None]
    start = torch.tensor([shapes.prompt_image_start], dtype=torch.int64)
    lengths = [past] * split + [pruned] * (layers - split)
    names = [PAST] * split + [PRUNED_PAST] * (layers - split)
    example = (embeds, positions, start, _example_kv(shapes, lengths, generator))
    return GraphPlan(
        name="decoder_model_merged", module=PrunedDecoder(model, config, shapes.grid, shapes.merge), example=example,
        dynamic_shapes=({1: _dyn()}, {positions.dim() - 1: _dyn()}, None, [({2: _dyn()}, {2: _dyn()})] * layers),
        inputs=head + [position_spec, tensor_spec("image_start", [1], "int64")]
        + _kv_specs("past_key_values", shapes, names, dtype),
        outputs=[tensor_spec("logits", [1, 1, shapes.vocab], dtype),
                 tensor_spec("kept_image_indices", [1, shapes.budget], "int64")]
        + _kv_specs("present", shapes, [f"{PAST} + {SEQUENCE}"] * split + [PRUNED_PRESENT] * (layers - split),
                    dtype),
        data_dependent_dims={PRUNED_PRESENT: {"prompt": f"{SEQUENCE} - {dropped}" if dropped else SEQUENCE,
                                              "decoding step": f"{PRUNED_PAST} + {SEQUENCE}"}},
    )


def graph_plans(model: nn.Module, shapes: OnnxShapes, config: PrunerConfig) -> list[GraphPlan]:
    generator = torch.Generator().manual_seed(0)
    plans = [vision_plan(model, shapes, config, generator), embed_plan(model, shapes, generator)]
    plans.append(decoder_plan(model, shapes, config, generator))
    return plans
