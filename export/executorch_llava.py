"""ExecuTorch target: one pruned LLaVA-1.5 as one multi-method `model.pte`, its tokenizer and `export_config.json`.

Two placements (``PrunerConfig.layer``), two method contracts (export/README.md has the full table):

* layer 0 (``before_llm``): ``vision_encoder`` prunes inside (projector outputs + layer-0 keys) and returns R tokens;
  ``token_embedding`` and ``text_decoder`` (static KV cache, ``input_pos`` [1] = start position) are what the stock
  ExecuTorch LLM runner calls, so the file runs as is in ``executorch.extension.llm.runner.MultimodalRunner``.
* layer K >= 1 (``in_llm``, the paper's placement): ``vision_encoder`` returns all N tokens; ``prefill`` runs the
  whole prompt, prunes the image span between decoder layers K-1 and K and fills two static caches (full-length for
  layers < K, pruned for layers >= K); ``decode`` continues one token at a time. ``runtime/executorch_backend.py``
  drives it.

The decoder layers, the rotary embedding, the projector and the vision tower are the model's own modules
(transformers); the pruned prefill is the adapter's ``prune_and_prefill`` with a cache that writes into ExecuTorch
mutable buffers. Sizes (layers, widths, grid, N, R, the image's place in the prompt) are read from the checkpoint.

Shapes: T prompt (or chunk) length, N image tokens, R kept, D text width, V vocabulary, Hkv key/value heads,
d head width, L cache slots, K the pruning layer.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from pruner_core import PrunerConfig
from pruner_core.adapters.llava import (
    check_split_layer,
    encode_image,
    image_grid,
    load_llava,
    prompt_image_start,
    select_before_llm,
    prune_and_prefill,
    rotary,
    tokenizer_info,
)

from .common import (
    ExportOptions,
    TokenEmbedding,
    build_export_config,
    check_method_exportable,
    copy_model_files,
    image_preprocessing,
    tensor_spec,
    write_json,
)
from .lowering import SharedNamedData, layer_passes, slice_partitioner
from .memory import CheckpointPages, checkpoint_files, return_freed_memory_promptly

PROGRAM_FILE = "model.pte"
RUNNER_TOKENIZER = "tokenizer.json"  # what MultimodalRunner(model_path, tokenizer_path) is given
IMAGE_INPUT_LAYOUT = "float_nchw"  # vision_encoder takes the processor's normalised pixel_values, float32 [1, 3, H, W]
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int64: "int64"}
QUANT_GROUP_SIZE = 128  # torchao 8da4w group size, as ExecuTorch's LLaVA / Llama exports


class BackendUnavailableError(ImportError):
    """The chosen ExecuTorch backend's lowering toolchain is not usable on this machine."""


# ================================================================================================================
# Backends: a recipe per name (availability check before any work, partitioners per method)
# ================================================================================================================


@dataclass(frozen=True)
class BackendRecipe:
    """How one ExecuTorch backend lowers a method: ``check`` raises before any work; ``partitioners(options,
    method, program, shared)`` is called per method with its traced program and the program's ``SharedNamedData``,
    and returns the lowering passes, each a list of partitioners applied in order (partitioner objects keep state;
    see ``lower``)."""

    name: str
    check: Callable[[ExportOptions], None]
    partitioners: Callable[[ExportOptions, str, torch.export.ExportedProgram, SharedNamedData], list[list]]


def _check_nothing(options: ExportOptions) -> None:
    return None


DECODER_METHODS = frozenset({"text_decoder", "prefill", "decode"})  # the methods holding the decoder's linears


def _xnnpack_partitioners(options: ExportOptions, method: str, program: torch.export.ExportedProgram,
                          shared: SharedNamedData) -> list[list]:
    """One pass per slice of layers (export/lowering.py: bounds the backend's working copy of the weights)."""
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType

    passes = layer_passes(program, options.lowering_slice_bytes)
    if options.quantize == "8da4w" or options.quantize_vision == "int8":
        # dynamically quantised linears first, one per partition (keeps one unpacked weight in memory at a time),
        # then everything else, as ExecuTorch's LLaVA export does
        return [[slice_partitioner(p, i == 0, shared, config_precisions=ConfigPrecisionType.DYNAMIC_QUANT,
                                   per_op_mode=True),
                 slice_partitioner(p, i == 0, shared)] for i, p in enumerate(passes)]
    return [[slice_partitioner(p, i == 0, shared)] for i, p in enumerate(passes)]


def _check_portable(options: ExportOptions) -> None:
    if options.quantize != "none":
        raise ValueError(
            f"--quantize {options.quantize} runs through XNNPACK's dynamically quantised linear kernels; the portable "
            "backend has none: use --backend xnnpack or --quantize none"
        )


def _check_coreml(options: ExportOptions) -> None:
    try:
        import coremltools  # noqa: F401
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner  # noqa: F401
    except ImportError as error:
        raise BackendUnavailableError(
            f"CoreML lowering needs coremltools and ExecuTorch's CoreML backend ({error}): pip install coremltools, "
            "on macOS"
        ) from None
    if sys.platform != "darwin":
        raise BackendUnavailableError(
            f"CoreML lowering needs coremltools on macOS (this is {sys.platform}): export with --backend coreml on a "
            "Mac (pip install coremltools), or use --backend xnnpack here"
        )


def _coreml_partitioners(options: ExportOptions, method: str, program: torch.export.ExportedProgram,
                          shared: SharedNamedData) -> list[list]:
    from executorch.backends.apple.coreml.partition import CoreMLPartitioner

    return [[CoreMLPartitioner()]]


def _qnn_sdk_root() -> Path | None:
    """The Qualcomm AI Engine Direct SDK the QNN toolchain itself is pointed at (its own QNN_SDK_ROOT convention)."""
    root = os.environ.get("QNN_SDK_ROOT")
    if not root:
        return None
    root_path = Path(root)
    return root_path if any(root_path.glob("lib/*/libQnnHtp.so")) else None


def _check_qnn(options: ExportOptions) -> None:
    try:
        from executorch.backends.qualcomm.partition.qnn_partitioner import QnnPartitioner  # noqa: F401
    except ImportError as error:
        raise BackendUnavailableError(
            f"QNN lowering needs ExecuTorch's Qualcomm backend ({error}): install an executorch build with it"
        ) from None
    if _qnn_sdk_root() is None:
        raise BackendUnavailableError(
            "QNN lowering needs the Qualcomm AI Engine Direct (QNN) SDK, and none was found (no libQnnHtp.so under "
            "$QNN_SDK_ROOT/lib/): install the SDK and `source $QNN_SDK_ROOT/bin/envsetup.sh` before exporting, or "
            "use --backend xnnpack"
        )


def _qnn_partitioners(options: ExportOptions, method: str, program: torch.export.ExportedProgram,
                          shared: SharedNamedData) -> list[list]:
    # Untested here (needs the SDK): HTP in fp16 for a Snapdragon 8 Gen 3 (SM8650), ExecuTorch's documented default.
    from executorch.backends.qualcomm.partition.qnn_partitioner import QnnPartitioner
    from executorch.backends.qualcomm.serialization.qc_schema import QcomChipset
    from executorch.backends.qualcomm.utils.utils import (
        generate_htp_compiler_spec,
        generate_qnn_executorch_compiler_spec,
    )

    spec = generate_qnn_executorch_compiler_spec(
        soc_model=QcomChipset.SM8650, backend_options=generate_htp_compiler_spec(use_fp16=True)
    )
    return [[QnnPartitioner(spec)]]


BACKENDS: dict[str, BackendRecipe] = {
    "xnnpack": BackendRecipe("xnnpack", _check_nothing, _xnnpack_partitioners),
    "portable": BackendRecipe("portable", _check_portable, lambda options, method, program, shared: [[]]),
    "coreml": BackendRecipe("coreml", _check_coreml, _coreml_partitioners),
    "qnn": BackendRecipe("qnn", _check_qnn, _qnn_partitioners),
}


def backend_recipe(options: ExportOptions) -> BackendRecipe:
    """The recipe for ``options.backend``, after checking that it can lower on this machine."""
    recipe = BACKENDS.get(options.backend)
    if recipe is None:
        raise ValueError(f"backend {options.backend!r} is not supported; choose one of {sorted(BACKENDS)}")
    recipe.check(options)
    return recipe


# ================================================================================================================
# What the graphs need to know about one checkpoint
# ================================================================================================================


@dataclass(frozen=True)
class LlavaGeometry:
    """Sizes of one LLaVA checkpoint and one pruning setup, all read from the model, its processor and the options."""

    num_layers: int
    width: int  # D
    vocab_size: int  # V
    kv_heads: int  # Hkv
    head_dim: int  # d
    grid: tuple[int, int]  # (rows, cols)
    image_size: tuple[int, int]  # (H, W) of pixel_values
    num_image_tokens: int  # N
    kept_tokens: int  # R
    split_layer: int  # K
    image_start: int  # where the image span starts in the LLaVA-1.5 prompt (BOS + "USER: ")
    max_seq_len: int

    @property
    def placement(self) -> str:
        return "before_llm" if self.split_layer == 0 else "in_llm"

    @property
    def removed(self) -> int:
        """N - R: how many fewer cache slots the pruned layers use than the full prompt."""
        return self.num_image_tokens - self.kept_tokens

    @property
    def cache_lengths(self) -> list[int]:
        """Slots per layer: layer 0 placement: max_seq_len everywhere (the decoder only sees the pruned sequence);
        layer K: max_seq_len for layers < K, max_seq_len - (N - R) for layers >= K."""
        pruned = self.max_seq_len - (self.removed if self.split_layer > 0 else 0)
        return [self.max_seq_len if i < self.split_layer else pruned for i in range(self.num_layers)]

    @property
    def min_prompt(self) -> int:
        """Shortest sequence the first decoder method takes: 1 token (layer 0), N + 1 (BOS + image) for layer K."""
        return 1 if self.split_layer == 0 else self.num_image_tokens + 1


def read_geometry(model: nn.Module, processor: Any, options: ExportOptions) -> LlavaGeometry:
    """Geometry from the loaded model and processor; raises when the options cannot fit the model."""
    text = model.config.text_config
    language_model = model.model.language_model
    rows, cols = image_grid(model.config)
    num_image = rows * cols
    patch = model.config.vision_config.patch_size
    check_split_layer(options.pruner, len(language_model.layers))
    budget = options.pruner.budget(num_image)
    attention = language_model.layers[0].self_attn
    geometry = LlavaGeometry(
        num_layers=len(language_model.layers),
        width=text.hidden_size,
        vocab_size=model.lm_head.out_features,
        kv_heads=text.num_key_value_heads,
        head_dim=attention.head_dim,
        grid=(rows, cols),
        image_size=(rows * patch, cols * patch),
        num_image_tokens=num_image,
        kept_tokens=budget,
        split_layer=options.pruner.layer,
        image_start=prompt_image_start(processor.tokenizer, model.config.image_token_id),
        max_seq_len=options.max_seq_len,
    )
    _check_lengths(geometry, text)
    return geometry


def _check_lengths(geometry: LlavaGeometry, text_config: Any) -> None:
    image_tokens = geometry.num_image_tokens if geometry.split_layer > 0 else geometry.kept_tokens
    needed = geometry.image_start + image_tokens + 2
    if geometry.max_seq_len < needed:
        raise ValueError(
            f"max_seq_len={geometry.max_seq_len} cannot hold the prompt: the decoder sees {image_tokens} image tokens "
            f"plus the text; use --max-seq-len >= {needed}, more to leave room for the question and the answer"
        )
    limit = getattr(text_config, "max_position_embeddings", None)
    if limit is not None and geometry.max_seq_len > limit:
        raise ValueError(
            f"max_seq_len={geometry.max_seq_len} exceeds the model's max_position_embeddings={limit}; "
            f"use --max-seq-len <= {limit}"
        )


# ================================================================================================================
# Static KV cache (ExecuTorch mutable buffers) and the cache views the stock decoder layers write through
# ================================================================================================================


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
    positions: torch.Tensor,
    writer: SlotWriter,
    mask: torch.Tensor,
    layers: range,
) -> torch.Tensor:
    """The stock decoder layers ``layers`` on hidden [1, S, D] at RoPE positions [S] over a static cache
    -> [1, S, D]."""
    position_ids = positions[None]  # [1, S]
    position_embeddings = rotary(language_model, hidden, position_ids)  # (cos, sin) [1, S, d]
    for index in layers:
        hidden = language_model.layers[index](
            hidden, attention_mask=mask, position_ids=position_ids, past_key_values=writer, use_cache=True,
            position_embeddings=position_embeddings,
        )
    return hidden


def last_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden [1, S, D] -> float32 logits of the last position [1, V]."""
    return model.lm_head(hidden[:, -1]).float()


# ================================================================================================================
# The exported methods
# ================================================================================================================


class VisionEncoder(nn.Module):
    """pixel_values float32 [1, 3, H, W] (normalised) -> image embeddings [1, N or R, D].

    With ``config`` (layer 0 placement) the selection runs inside: hidden = projector outputs, keys = decoder layer
    0's post-RoPE keys for them at their prompt positions image_start .. image_start + N - 1; returns the R kept
    tokens (fused states) in image order. Without it, all N projector outputs.
    """

    def __init__(
        self, model: nn.Module, geometry: LlavaGeometry, config: PrunerConfig | None, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.model, self.geometry, self.config, self.dtype = model, geometry, config, dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = encode_image(self.model, pixel_values.to(self.dtype))  # [1, N, D]
        if self.config is None:
            return features
        selection = select_before_llm(self.model, features, self.geometry.image_start, self.geometry.grid, self.config)
        return selection.states  # [1, R, D]


class TextDecoder(nn.Module):
    """Layer 0 placement: embeddings [1, T, D] at start position input_pos [1] -> logits [1, V] of the last token.

    Every layer writes slots input_pos .. input_pos + T - 1 of its static cache (slot = RoPE position: the pruned
    image tokens take consecutive positions, as the stock runner gives them).
    """

    def __init__(self, model: nn.Module, cache: StaticKVCache) -> None:
        super().__init__()
        self.model, self.cache = model, cache

    def forward(self, embeddings: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        language_model = self.model.model.language_model
        positions = input_pos + torch.arange(embeddings.shape[1], device=embeddings.device)  # [T]
        mask = slot_mask(positions, self.cache.lengths[0], embeddings.dtype)  # [1, 1, T, L]
        writer = SlotWriter(self.cache, positions)
        layers = range(len(language_model.layers))
        hidden = run_cached_layers(language_model, embeddings, positions, writer, mask, layers)
        return last_logits(self.model, language_model.norm(hidden))


class PrunedPrefill(nn.Module):
    """Layer K placement: the whole prompt's embeddings [1, T, D] with the N image embeddings at image_start [1]
    -> logits [1, V] after the prompt.

    Layers < K run on all T tokens (cache slots 0..T-1), the image span is pruned to R tokens with layer K-1's output
    and post-RoPE keys, layers >= K run on the T' = T - N + R kept tokens at their ORIGINAL positions (slots
    0..T'-1 of their caches). The adapter's ``prune_and_prefill``, unchanged.
    """

    def __init__(self, model: nn.Module, cache: StaticKVCache, geometry: LlavaGeometry, config: PrunerConfig) -> None:
        super().__init__()
        self.model, self.cache, self.geometry, self.config = model, cache, geometry, config

    def forward(self, embeddings: torch.Tensor, image_start: torch.Tensor) -> torch.Tensor:
        geometry = self.geometry
        result = prune_and_prefill(
            self.model.model.language_model, embeddings, image_start, geometry.num_image_tokens, geometry.grid,
            self.config, cache=PrefillWriter(self.cache),
        )
        return last_logits(self.model, result.hidden)


class PrunedDecode(nn.Module):
    """Layer K placement: one token's embedding [1, 1, D] at position input_pos [1] (= T + step) -> logits [1, V].

    Layers < K write/read their full cache at slot input_pos; layers >= K at slot input_pos - (N - R), since their
    cache holds the pruned prompt. RoPE position input_pos in both.
    """

    def __init__(self, model: nn.Module, cache: StaticKVCache, geometry: LlavaGeometry) -> None:
        super().__init__()
        self.model, self.cache, self.geometry = model, cache, geometry

    def forward(self, embedding: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        language_model = self.model.model.language_model
        split, lengths = self.geometry.split_layer, self.cache.lengths
        pruned_slot = input_pos - self.geometry.removed  # [1]
        full = SlotWriter(self.cache, input_pos)
        pruned = SlotWriter(self.cache, pruned_slot)
        hidden = run_cached_layers(
            language_model, embedding, input_pos, full, slot_mask(input_pos, lengths[0], embedding.dtype),
            range(split),
        )
        hidden = run_cached_layers(
            language_model, hidden, input_pos, pruned, slot_mask(pruned_slot, lengths[-1], embedding.dtype),
            range(split, len(language_model.layers)),
        )
        return last_logits(self.model, language_model.norm(hidden))


# ================================================================================================================
# Method table: modules, example inputs, dynamic shapes, and the contract written to export_config.json
# ================================================================================================================


@dataclass
class MethodPlan:
    """One exported method: the module, its example inputs and dynamic dims, and its documented contract."""

    name: str
    module: nn.Module
    example: tuple[torch.Tensor, ...]
    dynamic_shapes: tuple | None
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]


def _token_dim(geometry: LlavaGeometry, minimum: int) -> torch.export.Dim:
    return torch.export.Dim("T", min=minimum, max=geometry.max_seq_len)


@dataclass(frozen=True)
class _Examples:
    """Example inputs for tracing (values only steer tracing; shapes are fixed by the geometry)."""

    pixel_values: torch.Tensor  # [1, 3, H, W] float32
    tokens: torch.Tensor  # [1, 4] int64
    chunk: torch.Tensor  # [1, 5, D]: a text_decoder chunk
    prompt: torch.Tensor  # [1, image_start + N + 8, D]: a whole prompt for prefill
    token: torch.Tensor  # [1, 1, D]: one decode step


def _examples(geometry: LlavaGeometry, dtype: torch.dtype) -> _Examples:
    generator = torch.Generator().manual_seed(0)
    height, width = geometry.image_size
    length = geometry.image_start + geometry.num_image_tokens + 8
    return _Examples(
        pixel_values=torch.randn(1, 3, height, width, generator=generator),
        tokens=torch.ones(1, 4, dtype=torch.long),
        chunk=torch.randn(1, 5, geometry.width, generator=generator).to(dtype),
        prompt=torch.randn(1, length, geometry.width, generator=generator).to(dtype),
        token=torch.randn(1, 1, geometry.width, generator=generator).to(dtype),
    )


def _position(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.long)  # [1]


def plan_methods(
    model: nn.Module, geometry: LlavaGeometry, config: PrunerConfig, dtype: torch.dtype
) -> list[MethodPlan]:
    """The methods of the placement, sharing one StaticKVCache (same buffer names in every method)."""
    cache = StaticKVCache(geometry.cache_lengths, geometry.kv_heads, geometry.head_dim, dtype)
    examples = _examples(geometry, dtype)
    name, d = DTYPE_NAMES[dtype], geometry.width
    height, width = geometry.image_size
    image_tokens = geometry.kept_tokens if geometry.split_layer == 0 else geometry.num_image_tokens
    vision = MethodPlan(
        "vision_encoder", VisionEncoder(model, geometry, config if geometry.split_layer == 0 else None, dtype),
        (examples.pixel_values,), None, [tensor_spec("pixel_values", [1, 3, height, width], "float32")],
        [tensor_spec("image_embeddings", [1, image_tokens, d], name)],
    )
    embed = MethodPlan(
        "token_embedding", TokenEmbedding(model), (examples.tokens,), ({1: _token_dim(geometry, 1)},),
        [tensor_spec("tokens", [1, "T"], "int64")], [tensor_spec("embeddings", [1, "T", d], name)],
    )
    if geometry.split_layer == 0:
        return [vision, embed, _text_decoder_plan(model, cache, geometry, examples, name)]
    return [vision, embed, *_pruned_decoder_plans(model, cache, geometry, config, examples, name)]


def _logits_spec(geometry: LlavaGeometry) -> dict[str, Any]:
    return tensor_spec("logits", [1, geometry.vocab_size], "float32")


def _text_decoder_plan(model, cache, geometry: LlavaGeometry, examples: _Examples, name: str) -> MethodPlan:
    d = geometry.width
    return MethodPlan(
        "text_decoder", TextDecoder(model, cache), (examples.chunk, _position(0)), ({1: _token_dim(geometry, 1)}, None),
        [tensor_spec("embeddings", [1, "T", d], name), tensor_spec("input_pos", [1], "int64")],
        [_logits_spec(geometry)],
    )


def _pruned_decoder_plans(
    model, cache, geometry: LlavaGeometry, config: PrunerConfig, examples: _Examples, name: str
) -> list[MethodPlan]:
    d = geometry.width
    prefill = MethodPlan(
        "prefill", PrunedPrefill(model, cache, geometry, config), (examples.prompt, _position(geometry.image_start)),
        ({1: _token_dim(geometry, geometry.min_prompt)}, None),
        [tensor_spec("embeddings", [1, "T", d], name), tensor_spec("image_start", [1], "int64")],
        [_logits_spec(geometry)],
    )
    decode = MethodPlan(
        "decode", PrunedDecode(model, cache, geometry), (examples.token, _position(examples.prompt.shape[1])), None,
        [tensor_spec("embedding", [1, 1, d], name), tensor_spec("input_pos", [1], "int64")],
        [_logits_spec(geometry)],
    )
    return [prefill, decode]


def constant_methods(geometry: LlavaGeometry, bos_id: int, eos_ids: list[int]) -> dict[str, Any]:
    """Metadata methods the ExecuTorch LLM runner reads, plus this project's."""
    image_tokens = geometry.kept_tokens if geometry.split_layer == 0 else geometry.num_image_tokens
    return {
        "get_max_seq_len": geometry.max_seq_len,
        "get_max_context_len": geometry.max_seq_len,
        "get_bos_id": bos_id,
        "get_eos_ids": eos_ids,
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
        "get_num_image_tokens": image_tokens,  # what vision_encoder returns (R at layer 0, N at layer K)
        "get_kept_image_tokens": geometry.kept_tokens,
        "get_prune_layer": geometry.split_layer,
        "get_image_start": geometry.image_start,
    }


# ================================================================================================================
# Quantisation, tracing, lowering
# ================================================================================================================


def quant_group_size(in_features: int, preferred: int = QUANT_GROUP_SIZE) -> int:
    """``preferred`` when it divides the width, else the largest divisor below it (tiny widths)."""
    return max(g for g in range(1, min(preferred, in_features) + 1) if in_features % g == 0)


def quantize_decoder_8da4w(model: nn.Module) -> None:
    """torchao int8 dynamic activations + int4 grouped weights on the decoder's linear layers and the LM head."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    def in_decoder(fqn: str) -> bool:
        return fqn.startswith("model.language_model.") or fqn == "lm_head"

    widths = sorted({m.in_features for fqn, m in model.named_modules() if isinstance(m, nn.Linear) and in_decoder(fqn)})
    for width in widths:  # one quantize_ per group size: the group must divide the layer's input width
        config = Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(quant_group_size(width))
        )

        def selected(module: nn.Module, fqn: str, width: int = width) -> bool:
            return isinstance(module, nn.Linear) and module.in_features == width and in_decoder(fqn)

        quantize_(model, config, filter_fn=selected)


def quantize_vision_int8(model: nn.Module) -> None:
    """torchao int8 dynamic activations + per-channel int8 weights on the vision tower's and the projector's linear
    layers (XNNPACK's dynamically quantised linears run them)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis

    def selected(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and fqn.startswith(("model.vision_tower.", "model.multi_modal_projector."))

    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    quantize_(model, config, filter_fn=selected)


def trace(plans: list[MethodPlan]) -> dict[str, torch.export.ExportedProgram]:
    """torch.export every method (non-strict, under no_grad: the selection's scan / cond need both)."""
    programs = {}
    with torch.no_grad():
        for plan in plans:
            programs[plan.name] = torch.export.export(
                plan.module, plan.example, dynamic_shapes=plan.dynamic_shapes, strict=False
            )
    return programs


def lower(programs: dict, recipe: BackendRecipe, options: ExportOptions, constants: dict[str, Any]):
    """Edge programs with the backend's delegates: every method's passes, in order, as one list of partitioners."""
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    shared = SharedNamedData()  # methods that share weights share the backend's copy of them
    partitioners = {name: [p for step in recipe.partitioners(options, name, program, shared) for p in step]
                    for name, program in programs.items()}
    with torch.no_grad():
        edge = to_edge_transform_and_lower(
            programs, partitioner=partitioners, constant_methods=constants,
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
        )
    for name in edge.methods:
        shared.adopt(edge.exported_program(name).graph_module)  # the last pass's duplicates
    return edge


def write_program(edge, path: Path) -> None:
    """Edge program -> the `.pte` at ``path``; the caches are shared by every method (one allocation, by buffer
    name). Written piece by piece (``write_to_file``): the program is never assembled as one bytes object, which
    would be a second copy of every weight."""
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass

    program = edge.to_executorch(
        ExecutorchBackendConfig(
            memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True),
            emit_mutable_buffer_names=True,
        )
    )
    with open(path, "wb") as handle:
        program.write_to_file(handle)


# ================================================================================================================
# export_config.json pieces
# ================================================================================================================


def copy_tokenizer_files(model_dir: Path, processor: Any, out_dir: Path) -> list[str]:
    """Copy the tokenizer and processor files; the runner needs tokenizer.json."""
    _, copied = copy_model_files(model_dir, processor, out_dir)
    if RUNNER_TOKENIZER not in copied:
        raise ValueError(
            f"{model_dir} has no {RUNNER_TOKENIZER}; the ExecuTorch runner reads the Hugging Face tokenizer.json: "
            "save the tokenizer with a fast (tokenizers) backend"
        )
    return copied


def executorch_extra(geometry: LlavaGeometry, constants: dict[str, Any]) -> dict[str, Any]:
    pruned = geometry.split_layer > 0
    return {
        "program": PROGRAM_FILE,
        "image_input_layout": IMAGE_INPUT_LAYOUT,
        "text_width": geometry.width,
        "vocab_size": geometry.vocab_size,
        "num_layers": geometry.num_layers,
        "dynamic_dims": {"T": [1, geometry.max_seq_len]},  # tokens per call; `prefill` takes >= N + 1
        "min_prefill_tokens": geometry.min_prompt,
        "constant_methods": constants,
        "kv_cache": {
            "layout": "[1, kv_heads, slots, head_dim] per layer, keys post-RoPE",
            "kv_heads": geometry.kv_heads,
            "head_dim": geometry.head_dim,
            "slots": geometry.cache_lengths,
            "decode_slot_offset": {"layers_before_K": 0, "layers_from_K": geometry.removed if pruned else 0},
        },
        "runner": "executorch.extension.llm.runner.MultimodalRunner" if not pruned
        else "runtime.executorch_backend.ExecuTorchModel",
    }


# ================================================================================================================
# Entry point
# ================================================================================================================


def _load(model_dir: Path, options: ExportOptions):
    # The vision tower with eager attention (XNNPACK lowers its matmuls; sdpa there does not lower cleanly);
    # the language model with sdpa (the adapter's pruned prefill supports sdpa and eager).
    attention = {"": "sdpa", "text_config": "sdpa", "vision_config": "eager"}
    model, processor = load_llava(model_dir, TORCH_DTYPES[options.dtype], attn_implementation=attention)
    # inference only: with trainable weights, lowering would trace the selection's scan for autograd (and fail)
    return model.requires_grad_(False), processor


def export_executorch(
    model_dir: Path,
    out_dir: Path,
    options: ExportOptions,
    *,
    model_id: str,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Export a LLaVA-1.5 checkpoint with its image tokens pruned as ``options.pruner`` says, into ``out_dir``.

    out_dir: an existing, empty staging folder (the CLI renames it into place). Writes ``model.pte``, the
    tokenizer files and ``export_config.json``; returns the config payload. Backend availability, the method's
    signals and the lengths are checked before anything heavy runs.
    """
    progress = progress or (lambda stage: None)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if options.target != "executorch":
        raise ValueError(
            f"export_executorch got options for target {options.target!r}; use the {options.target} exporter"
        )
    recipe = backend_recipe(options)
    check_method_exportable(options)
    return_freed_memory_promptly()
    with CheckpointPages(checkpoint_files(model_dir)):  # mapped weights are not kept resident once read
        model, processor = _load(model_dir, options)
        geometry = read_geometry(model, processor, options)
        dtype = TORCH_DTYPES[options.dtype]
        if options.quantize == "8da4w":
            quantize_decoder_8da4w(model)
        if options.quantize_vision == "int8":
            quantize_vision_int8(model)
        files = copy_tokenizer_files(model_dir, processor, out_dir)
        tokenizer = {**tokenizer_info(model, processor, files), "runner_file": RUNNER_TOKENIZER}
        constants = constant_methods(geometry, tokenizer["bos_id"], tokenizer["eos_ids"])
        plans = plan_methods(model, geometry, options.pruner, dtype)
        contracts = {plan.name: {"inputs": plan.inputs, "outputs": plan.outputs} for plan in plans}

        progress("trace")
        programs = trace(plans)
        del plans, model  # from here on only the traced programs reference the weights
        progress("lower")
        edge = lower(programs, recipe, options, constants)
        del programs
        progress("serialise")
        write_program(edge, out_dir / PROGRAM_FILE)
        del edge
    payload = build_export_config(
        options,
        model_id=model_id,
        num_image_tokens=geometry.num_image_tokens,
        grid=geometry.grid,
        methods=contracts,
        image_preprocessing=image_preprocessing(processor, IMAGE_INPUT_LAYOUT),
        tokenizer=tokenizer,
        files=[PROGRAM_FILE, "export_config.json", *files],
        extra={
            "prompt_image_start": geometry.image_start,  # where the layer-0 selection assumes the image (RoPE keys)
            "executorch": executorch_extra(geometry, constants),
        },
    )
    write_json(out_dir / "export_config.json", payload)
    return payload
