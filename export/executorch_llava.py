"""ExecuTorch target: one pruned LLaVA-1.5 as one multi-method `model.pte`, its tokenizer and `export_config.json`.

Both placements (``PrunerConfig.layer``) in the stock ExecuTorch LLM runner's method contract (``vision_encoder``,
``token_embedding``, ``text_decoder(embeddings, input_pos [1] = start position)``; export/README.md has the tables):

* layer 0 (``before_llm``): ``vision_encoder`` prunes inside (projector outputs + layer-0 keys) and returns R tokens;
  ``text_decoder`` (static KV cache) gives them consecutive positions, so the file runs as is in
  ``executorch.extension.llm.runner.MultimodalRunner`` and Android's ``LlmModule``.
* layer K >= 1 (``in_llm``, the paper's placement): ``vision_encoder`` runs layers < K on the image and prunes;
  ``text_decoder`` runs layers >= K on the kept tokens at their original positions (export/executorch_layer_k.py).
  The two share state in mutable buffers: ExecuTorch's Python runtime runs it; the 1.5.1 stock runner does not share
  them (export/README.md says why and what one-argument change would).

The decoder layers, the rotary embedding, the projector and the vision tower are the model's own modules
(transformers), over static caches in ExecuTorch mutable buffers (export/static_cache.py). Sizes (layers, widths,
grid, N, R, the image's place in the prompt) are read from the checkpoint.

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
from pruner_core.adapters import (
    check_split_layer,
    encode_image,
    image_grid,
    load_llava,
    prompt_image_start,
    select_before_llm,
    tokenizer_info,
)
from pruner_core.adapters.hub import random_weights

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
from .executorch_layer_k import PruningVisionEncoder, RunnerState, SplitCacheTextDecoder
from .static_cache import SlotWriter, StaticKVCache, last_logits, run_cached_layers, slot_mask
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
# The exported methods
# ================================================================================================================


class VisionEncoder(nn.Module):
    """Layer 0 placement: pixel_values float32 [1, 3, H, W] (normalised) -> image embeddings [1, R, D].

    The selection runs inside: hidden = projector outputs, keys = decoder layer 0's post-RoPE keys for them at their
    prompt positions image_start .. image_start + N - 1; returns the R kept tokens (fused states) in image order.
    """

    def __init__(self, model: nn.Module, geometry: LlavaGeometry, config: PrunerConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.geometry, self.config, self.dtype = model, geometry, config, dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = encode_image(self.model, pixel_values.to(self.dtype))  # [1, N, D]
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
    return torch.export.Dim("T", min=minimum, max=geometry.runner_max_seq_len)


@dataclass(frozen=True)
class _Examples:
    """Example inputs for tracing (values only steer tracing; shapes are fixed by the geometry)."""

    pixel_values: torch.Tensor  # [1, 3, H, W] float32
    tokens: torch.Tensor  # [1, 4] int64
    chunk: torch.Tensor  # [1, 5, D]: a text_decoder chunk


def _examples(geometry: LlavaGeometry, dtype: torch.dtype) -> _Examples:
    generator = torch.Generator().manual_seed(0)
    height, width = geometry.image_size
    return _Examples(
        pixel_values=torch.randn(1, 3, height, width, generator=generator),
        tokens=torch.ones(1, 4, dtype=torch.long),
        chunk=torch.randn(1, 5, geometry.width, generator=generator).to(dtype),
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
    if geometry.split_layer == 0:
        encoder, decoder = VisionEncoder(model, geometry, config, dtype), TextDecoder(model, cache)
    else:  # the paper's placement, in the same three methods (export/executorch_layer_k.py)
        state = RunnerState(geometry.kept_tokens)
        encoder = PruningVisionEncoder(model, cache, state, geometry.grid, config, dtype)
        decoder = SplitCacheTextDecoder(model, cache, state, geometry.split_layer, geometry.max_seq_len)
    vision = MethodPlan(
        "vision_encoder", encoder, (examples.pixel_values,), None,
        [tensor_spec("pixel_values", [1, 3, height, width], "float32")],
        [tensor_spec("image_embeddings", [1, geometry.kept_tokens, d], name)],
    )
    embed = MethodPlan(
        "token_embedding", TokenEmbedding(model), (examples.tokens,), ({1: _token_dim(geometry, 1)},),
        [tensor_spec("tokens", [1, "T"], "int64")], [tensor_spec("embeddings", [1, "T", d], name)],
    )
    text = MethodPlan(
        "text_decoder", decoder, (examples.chunk, _position(0)), ({1: _token_dim(geometry, 1)}, None),
        [tensor_spec("embeddings", [1, "T", d], name), tensor_spec("input_pos", [1], "int64")],
        [_logits_spec(geometry)],
    )
    return [vision, embed, text]


def _logits_spec(geometry: LlavaGeometry) -> dict[str, Any]:
    return tensor_spec("logits", [1, geometry.vocab_size], "float32")


def constant_methods(geometry: LlavaGeometry, bos_id: int, eos_ids: list[int]) -> dict[str, Any]:
    """Metadata methods the ExecuTorch LLM runner reads, plus this project's."""
    return {
        "get_max_seq_len": geometry.runner_max_seq_len,  # in the runner's positions (the image counts R)
        "get_max_context_len": geometry.runner_max_seq_len,
        "get_bos_id": bos_id,
        "get_eos_ids": eos_ids,
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
        "get_num_image_tokens": geometry.kept_tokens,  # what vision_encoder returns: R, at both placements
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
    return {
        "program": PROGRAM_FILE,
        "image_input_layout": IMAGE_INPUT_LAYOUT,
        "text_width": geometry.width,
        "vocab_size": geometry.vocab_size,
        "num_layers": geometry.num_layers,
        "dynamic_dims": {"T": [1, geometry.runner_max_seq_len]},  # tokens per text_decoder call
        "runner_max_seq_len": geometry.runner_max_seq_len,  # positions the runner counts (the image counts R)
        "constant_methods": constants,
        "kv_cache": {
            "layout": "[1, kv_heads, slots, head_dim] per layer, keys post-RoPE",
            "kv_heads": geometry.kv_heads,
            "head_dim": geometry.head_dim,
            "slots": geometry.cache_lengths,
        },
        "runner": "executorch.extension.llm.runner.MultimodalRunner",
    }


# ================================================================================================================
# Entry point
# ================================================================================================================


def _load(model_dir: Path, options: ExportOptions):
    # The vision tower with eager attention (XNNPACK lowers its matmuls; sdpa there does not lower cleanly);
    # the language model with sdpa (the adapter's pruned prefill supports sdpa and eager).
    attention = {"": "sdpa", "text_config": "sdpa", "vision_config": "eager"}
    model, processor = load_llava(model_dir, TORCH_DTYPES[options.dtype], attn_implementation=attention,
                                  image_size=options.image_size)
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
        random_weights=random_weights(model_dir),
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
