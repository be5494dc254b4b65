"""ExecuTorch target: one pruned VLM (any adapter's family) as one multi-method `model.pte`, its tokenizer and
`export_config.json`.

Both placements (``PrunerConfig.layer``) in the stock ExecuTorch LLM runner's method contract (``vision_encoder``,
``token_embedding``, ``text_decoder(embeddings, input_pos [1] = start position)``; export/README.md has the tables):

* layer 0 (``before_llm``): ``vision_encoder`` prunes inside (image tokens + layer-0 keys) and returns R tokens;
  ``text_decoder`` (static KV cache) gives them consecutive positions, so the file runs as is in
  ``executorch.extension.llm.runner.MultimodalRunner`` and Android's ``LlmModule``.
* layer K >= 1 (``in_llm``, the paper's placement): ``vision_encoder`` runs layers < K on the image and prunes;
  ``text_decoder`` runs layers >= K on the kept tokens at their original positions (export/executorch_layer_k.py).
  The two share state in mutable buffers: ExecuTorch's Python runtime runs it; the 1.5.1 stock runner does not share
  them (export/README.md says why and what one-argument change would).

A family whose adapter reports M-RoPE positions (``position_scheme`` "mrope": Qwen2-VL / Qwen2.5-VL) keeps the method
names and cache layout with two differences at both placements: ``text_decoder`` takes a third input,
``position_ids`` [3, 1, T] (the rows' (t, h, w) RoPE positions; ``input_pos`` stays the cache slot), and
``vision_encoder`` also returns ``kept_image_indices`` [1, R]. Kept tokens then keep their original positions at
layer 0 too, and the runtime computes every position (runtime/positions.py); the stock runner cannot feed them.

Only the model's adapter knows its family: the vision module (``vision_encoder``, with the patch embedding as a
matmul where a backend lacks 5-D convolution), the decoder stack and LM head, the geometry, the prompt format, the
image preprocessing. The decoder layers, the rotary embedding and the vision tower are the model's own modules
(transformers), over static caches in ExecuTorch mutable buffers (export/static_cache.py). Backends, quantisation
and lowering: export/executorch_backends.py.

Shapes: T prompt (or chunk) length, N image tokens, R kept, D text width, V vocabulary, Hkv key/value heads,
d head width, L cache slots, K the pruning layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from pruner_core import PrunerConfig
from pruner_core.adapters import adapter_for, check_split_layer
from pruner_core.adapters.hub import random_weights

from .common import (
    ExportOptions,
    TokenEmbedding,
    build_export_config,
    check_method_exportable,
    copy_model_files,
    tensor_spec,
    write_json,
)
from .executorch_backends import (  # noqa: F401 - re-exported: the ExecuTorch target's public names
    BACKENDS,
    BackendRecipe,
    BackendUnavailableError,
    backend_recipe,
    lower,
    quant_group_size,
    quantize_decoder_8da4w,
    quantize_vision_int8,
    trace,
    trace_and_lower,
    write_program,
)
from .executorch_layer_k import (
    PositionedSplitCacheTextDecoder,
    PruningVisionEncoder,
    RunnerState,
    SplitCacheTextDecoder,
)
from .memory import CheckpointPages, checkpoint_files, release_tracing_caches, return_freed_memory_promptly
from .static_cache import SlotWriter, StaticKVCache, last_logits, run_cached_layers, slot_mask

PROGRAM_FILE = "model.pte"
RUNNER_TOKENIZER = "tokenizer.json"  # what MultimodalRunner(model_path, tokenizer_path) is given
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int64: "int64"}

# ================================================================================================================
# What the graphs need to know about one checkpoint
# ================================================================================================================


@dataclass(frozen=True)
class PteGeometry:
    """Sizes of one checkpoint and one pruning setup, all read from its adapter, its processor and the options."""

    num_layers: int
    width: int  # D
    vocab_size: int  # V
    kv_heads: int  # Hkv
    head_dim: int  # d
    grid: tuple[int, int]  # (rows, cols)
    pixel_input: tuple[int, ...]  # vision_encoder's pixel_values shape (the adapter's pixel_input_shape)
    num_image_tokens: int  # N
    kept_tokens: int  # R
    split_layer: int  # K
    image_start: int  # where the image span starts in the model's prompt format
    max_seq_len: int
    position_scheme: str = "1d"  # "1d": RoPE position = cache slot; "mrope": text_decoder takes position_ids

    @property
    def placement(self) -> str:
        return "before_llm" if self.split_layer == 0 else "in_llm"

    @property
    def explicit_positions(self) -> bool:
        """Whether text_decoder takes position_ids [3, 1, T] and vision_encoder returns kept_image_indices."""
        return self.position_scheme != "1d"

    @property
    def removed(self) -> int:
        """N - R: how many fewer cache slots the pruned layers use than the full prompt."""
        return self.num_image_tokens - self.kept_tokens

    @property
    def runner_max_seq_len(self) -> int:
        """Positions the runner counts (get_max_seq_len): layer 0: max_seq_len; layer K: the image counts R, not N,
        in the runner's positions, so max_seq_len - (N - R)."""
        return self.max_seq_len - (self.removed if self.split_layer > 0 else 0)

    @property
    def cache_lengths(self) -> list[int]:
        """Slots per layer: layer 0 placement: max_seq_len everywhere (the decoder only sees the pruned sequence);
        layer K: max_seq_len + R for layers < K (full positions, plus R spare slots the image rows of a text_decoder
        call write to), max_seq_len - (N - R) for layers >= K (the compact caches)."""
        if self.split_layer == 0:
            return [self.max_seq_len] * self.num_layers
        full = self.max_seq_len + self.kept_tokens
        return [full if i < self.split_layer else self.runner_max_seq_len for i in range(self.num_layers)]


def read_geometry(model: nn.Module, processor: Any, options: ExportOptions) -> PteGeometry:
    """Geometry from the loaded model (through its adapter) and processor; raises when the options cannot fit it."""
    adapter = adapter_for(model)
    shape = adapter.geometry(model)
    check_split_layer(options.pruner, shape.num_layers)
    geometry = PteGeometry(
        num_layers=shape.num_layers,
        width=shape.hidden_size,
        vocab_size=adapter.lm_head(model).out_features,
        kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        grid=shape.grid,
        pixel_input=tuple(adapter.pixel_input_shape(shape)),
        num_image_tokens=shape.num_image_tokens,
        kept_tokens=options.pruner.budget(shape.num_image_tokens),
        split_layer=options.pruner.layer,
        image_start=adapter.prompt_image_start(processor.tokenizer, shape.image_token_id),
        max_seq_len=options.max_seq_len,
        position_scheme=shape.position_scheme,
    )
    _check_lengths(geometry, model.config.text_config)
    return geometry


def _check_lengths(geometry: PteGeometry, text_config: Any) -> None:
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
# The exported methods
# ================================================================================================================


class VisionEncoder(nn.Module):
    """Layer 0 placement: pixel_values (the adapter's pixel input, float32) -> image embeddings [1, R, D], and with
    explicit positions (M-RoPE) also kept_image_indices [1, R] int64.

    The selection runs inside (the adapter's ``select_before_llm``): hidden = the image tokens, keys = decoder layer
    0's post-RoPE keys for them at their prompt positions (the image at ``image_start``); returns the R kept tokens
    (fused states) in image order.
    """

    def __init__(self, model: nn.Module, vision: nn.Module, geometry: PteGeometry, config: PrunerConfig,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.vision, self.geometry, self.config, self.dtype = model, vision, geometry, config, dtype
        self.adapter = adapter_for(model)

    def forward(self, pixel_values: torch.Tensor):
        features = self.vision(pixel_values.to(self.dtype)).to(self.dtype)  # [1, N, D]
        selection = self.adapter.select_before_llm(self.model, features, self.geometry.image_start,
                                                   self.geometry.grid, self.config)
        if self.geometry.explicit_positions:
            return selection.states, selection.indices  # [1, R, D], [1, R]
        return selection.states  # [1, R, D]


class TextDecoder(nn.Module):
    """Layer 0 placement: embeddings [1, T, D] at start slot input_pos [1] -> logits [1, V] of the last token.

    Every layer writes slots input_pos .. input_pos + T - 1 of its static cache. 1-D: slot = RoPE position (the
    pruned image tokens take consecutive positions, as the stock runner gives them). ``PositionedTextDecoder``: the
    RoPE positions are an input.
    """

    def __init__(self, language_model: nn.Module, lm_head: nn.Module, cache: StaticKVCache) -> None:
        super().__init__()
        self.language_model, self.lm_head, self.cache = language_model, lm_head, cache

    def forward(self, embeddings: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.run(embeddings, input_pos, None)

    def run(self, embeddings: torch.Tensor, input_pos: torch.Tensor,
            position_ids: torch.Tensor | None) -> torch.Tensor:
        language_model = self.language_model
        slots = input_pos + torch.arange(embeddings.shape[1], device=embeddings.device)  # [T]
        mask = slot_mask(slots, self.cache.lengths[0], embeddings.dtype)  # [1, 1, T, L]
        writer = SlotWriter(self.cache, slots)
        layers = range(len(language_model.layers))
        rope = slots[None] if position_ids is None else position_ids  # [1, T] or [3, 1, T]
        hidden = run_cached_layers(language_model, embeddings, rope, writer, mask, layers)
        return last_logits(self.lm_head, language_model.norm(hidden))


class PositionedTextDecoder(TextDecoder):
    """M-RoPE, layer 0: (embeddings [1, T, D], input_pos [1] = first slot, position_ids [3, 1, T] int64) -> logits
    [1, V]: the kept image tokens at their original (t, h, w), text after the image and decoding at the unpruned
    positions (runtime/positions.py)."""

    def forward(self, embeddings: torch.Tensor, input_pos: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.run(embeddings, input_pos, position_ids)


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
    control_flow: bool = False  # holds a higher-order op (the selection's scan): traced and lowered in the main
    # process (export/parallel_lowering.py)


def _position(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.long)  # [1]


def plan_methods(model: nn.Module, geometry: PteGeometry, config: PrunerConfig, dtype: torch.dtype,
                 patch_matmul: bool = False) -> list[MethodPlan]:
    """The methods of the placement, sharing one StaticKVCache (same buffer names in every method). patch_matmul:
    the adapter's vision module with a 5-D convolution patch embedding as the equal matmul."""
    adapter = adapter_for(model)
    language_model, lm_head = adapter.language_model(model), adapter.lm_head(model)
    vision_module = adapter.vision_encoder(model, adapter.geometry(model).image_size, patch_matmul=patch_matmul)
    cache = StaticKVCache(geometry.cache_lengths, geometry.kv_heads, geometry.head_dim, dtype)
    generator = torch.Generator().manual_seed(0)
    name, d, budget = DTYPE_NAMES[dtype], geometry.width, geometry.kept_tokens
    explicit = geometry.explicit_positions
    if geometry.split_layer == 0:
        encoder = VisionEncoder(model, vision_module, geometry, config, dtype)
        decoder = (PositionedTextDecoder if explicit else TextDecoder)(language_model, lm_head, cache)
    else:  # the paper's placement, in the same three methods (export/executorch_layer_k.py)
        state = RunnerState(budget)
        image_positions = adapter.prompt_positions(0, geometry.grid, 0)  # [1, N] or [3, 1, N]
        encoder = PruningVisionEncoder(vision_module, language_model, cache, state, image_positions, geometry.grid,
                                       config, dtype, returns_indices=explicit,
                                       merge=adapter.geometry(model).merge)
        decoder = (PositionedSplitCacheTextDecoder if explicit else SplitCacheTextDecoder)(
            language_model, lm_head, cache, state, geometry.split_layer, geometry.max_seq_len)
    kept_spec = [tensor_spec("kept_image_indices", [1, budget], "int64")] if explicit else []
    vision = MethodPlan(
        "vision_encoder", encoder, (torch.randn(*geometry.pixel_input, generator=generator),), None,
        [tensor_spec("pixel_values", list(geometry.pixel_input), "float32")],
        [tensor_spec("image_embeddings", [1, budget, d], name), *kept_spec], control_flow=True,
    )
    tokens = torch.export.Dim("T", min=1, max=geometry.runner_max_seq_len)
    embed = MethodPlan(
        "token_embedding", TokenEmbedding(model), (torch.ones(1, 4, dtype=torch.long),), ({1: tokens},),
        [tensor_spec("tokens", [1, "T"], "int64")], [tensor_spec("embeddings", [1, "T", d], name)],
    )
    chunk = torch.randn(1, 5, d, generator=generator).to(dtype)  # a text_decoder chunk
    example, dims = (chunk, _position(0)), ({1: tokens}, None)
    inputs = [tensor_spec("embeddings", [1, "T", d], name), tensor_spec("input_pos", [1], "int64")]
    if explicit:  # M-RoPE: every row's (t, h, w)
        example, dims = (*example, torch.arange(5).expand(3, 1, 5).contiguous()), (*dims, {2: tokens})
        inputs.append(tensor_spec("position_ids", [3, 1, "T"], "int64"))
    text = MethodPlan("text_decoder", decoder, example, dims, inputs,
                      [tensor_spec("logits", [1, geometry.vocab_size], "float32")])
    return [vision, embed, text]


def constant_methods(geometry: PteGeometry, bos_id: int | None, eos_ids: list[int]) -> dict[str, Any]:
    """Metadata methods the ExecuTorch LLM runner reads, plus this project's (no get_bos_id for a tokenizer without
    BOS, as Qwen's)."""
    return {
        "get_max_seq_len": geometry.runner_max_seq_len,  # in the runner's positions (the image counts R)
        "get_max_context_len": geometry.runner_max_seq_len,
        **({"get_bos_id": bos_id} if bos_id is not None else {}),
        "get_eos_ids": eos_ids,
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
        "get_num_image_tokens": geometry.kept_tokens,  # what vision_encoder returns: R, at both placements
        "get_kept_image_tokens": geometry.kept_tokens,
        "get_prune_layer": geometry.split_layer,
        "get_image_start": geometry.image_start,
    }


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


def executorch_extra(geometry: PteGeometry, constants: dict[str, Any], image_layout: str) -> dict[str, Any]:
    return {
        "program": PROGRAM_FILE,
        "image_input_layout": image_layout,
        "text_width": geometry.width,
        "vocab_size": geometry.vocab_size,
        "num_layers": geometry.num_layers,
        "dynamic_dims": {"T": [1, geometry.runner_max_seq_len]},  # tokens per text_decoder call
        "runner_max_seq_len": geometry.runner_max_seq_len,  # positions the runner counts (the image counts R)
        # "1d": text_decoder(embeddings, input_pos); "mrope": also position_ids [3, 1, T] (runtime/positions.py)
        "position_scheme": geometry.position_scheme,
        "constant_methods": constants,
        "kv_cache": {
            "layout": "[1, kv_heads, slots, head_dim] per layer, keys post-RoPE",
            "kv_heads": geometry.kv_heads,
            "head_dim": geometry.head_dim,
            "slots": geometry.cache_lengths,
        },
        # the stock runner feeds 1-D positions only: an M-RoPE program runs in this project's runtime
        "runner": ("runtime.executorch_backend.ExecuTorchModel" if geometry.explicit_positions
                   else "executorch.extension.llm.runner.MultimodalRunner"),
    }


# ================================================================================================================
# Entry point
# ================================================================================================================


def _load(model_dir: Path, options: ExportOptions):
    """The model through its adapter: the vision tower with eager attention (XNNPACK lowers its matmuls; sdpa there
    does not lower cleanly), the language model with sdpa (the pruned decoder supports sdpa and eager)."""
    adapter = adapter_for(model_dir)
    model, processor = adapter.load(model_dir, TORCH_DTYPES[options.dtype], attn_implementation="sdpa",
                                    image_size=options.image_size)
    model.set_attn_implementation({"vision_config": "eager", "text_config": "sdpa"})
    # inference only: with trainable weights, lowering would trace the selection's scan for autograd (and fail)
    return model.requires_grad_(False), processor


def export_executorch(
    model_dir: Path,
    out_dir: Path,
    options: ExportOptions,
    *,
    model_id: str,
    progress: Callable[[str], None] | None = None,
    recipe: BackendRecipe | None = None,
) -> dict:
    """Export a checkpoint of any registered family with its image tokens pruned as ``options.pruner`` says, into
    ``out_dir``.

    recipe: how to lower (export/executorch_backends.py ``BackendRecipe``); default: the recipe ``options.backend``
    names, checked usable here (``backend_recipe``). A benchmark passes a variant to compare, e.g. XNNPACK without
    its edge rewrites (benchmarks/edge_rewrites.py).

    out_dir: an existing, empty staging folder (the CLI renames it into place). Writes ``model.pte``, the
    tokenizer files and ``export_config.json``; returns the config payload. Backend availability, the method's
    signals and the lengths are checked before anything heavy runs; ValueError for a problem the options can fix.
    """
    progress = progress or (lambda stage: None)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if options.target != "executorch":
        raise ValueError(
            f"export_executorch got options for target {options.target!r}; use the {options.target} exporter"
        )
    recipe = recipe or backend_recipe(options)
    check_method_exportable(options)
    adapter = adapter_for(model_dir)
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
        tokenizer = {**adapter.tokenizer_info(model, processor, files), "runner_file": RUNNER_TOKENIZER}
        constants = constant_methods(geometry, tokenizer["bos_id"], tokenizer["eos_ids"])
        preprocessing = adapter.image_preprocessing(processor).to_dict()
        # a Conv3d patch embedding (Qwen2-VL) as the equal matmul: XNNPACK delegates no Conv3d and ExecuTorch's
        # portable convolution takes 3-D / 4-D inputs only (measured, 1.5.1)
        plans = plan_methods(model, geometry, options.pruner, dtype, patch_matmul=True)
        contracts = {plan.name: {"inputs": plan.inputs, "outputs": plan.outputs} for plan in plans}

        del model  # from here on the plans, then only the traced programs, reference the weights
        edge = trace_and_lower(plans, recipe, options, constants, progress)  # says "trace", "lower"
        progress("serialise")
        write_program(edge, out_dir / PROGRAM_FILE)
        del edge
        release_tracing_caches()  # its keys hold the lowered modules and, through them, every weight
    payload = build_export_config(
        options,
        random_weights=random_weights(model_dir),
        model_id=model_id,
        num_image_tokens=geometry.num_image_tokens,
        grid=geometry.grid,
        methods=contracts,
        image_preprocessing=preprocessing,
        tokenizer=tokenizer,
        files=[PROGRAM_FILE, "export_config.json", *files],
        extra={
            "prompt_image_start": geometry.image_start,  # where the layer-0 selection assumes the image (RoPE keys)
            # M-RoPE: the kept tokens keep their original positions at layer 0 too
            **({"positions": "original"} if geometry.explicit_positions else {}),
            "executorch": executorch_extra(geometry, constants, preprocessing["input_layout"]),
        },
    )
    write_json(out_dir / "export_config.json", payload)
    return payload
