"""ONNX target: a pruned LLaVA-1.5 as the graphs of the onnx-community / transformers.js folder layout.

What ``export_onnx`` writes into its output folder (graph contracts: export/README.md, "ONNX"):

    onnx/vision_encoder{sfx}.onnx        pixel_values -> image_features ([1, R, D] pruned at layer 0, else [1, N, D])
    onnx/embed_tokens{sfx}.onnx          input_ids -> inputs_embeds
    onnx/decoder_model_merged{sfx}.onnx  the prompt's prefill (pruned between layers K-1 and K at layer >= 1) and
                                         decoding steps over past_key_values
    tokenizer / processor / model config files copied from the checkpoint, export_config.json

``{sfx}`` is onnx-community's: "" (fp32), "_fp16", "_quantized" (onnxruntime dynamic int8 weights), "_q4" (4-bit
weight-only MatMulNBits in the decoder graphs, the format of transformers.js' q4 files).

Layer 0 ("before_llm") is the layout stock runtimes run: the vision encoder returns the R kept tokens, so a prompt
with exactly R image placeholders and the stock merged decoder reproduce the pruned model. Layer K >= 1 ("in_llm",
the paper's placement) prunes inside the decoder: called with ``image_start`` on the prompt, layers < K cache the
full prompt, layers >= K only the kept sequence, kept tokens keep their original RoPE positions; called with
``image_start = -1`` it decodes, continuing at the full prompt length. One graph for both (an ``If`` around the
selection), so each decoder weight is stored and loaded once.

Every graph is traced with ``torch.export`` (non-strict) and lowered with the dynamo ONNX exporter, which turns the
selection's ``scan`` into an ONNX ``Scan``; ``export/onnx_compat.py`` then rewrites it into an equivalent ``Loop``
whose body reads no outer value, which OpenVINO converts as well as onnxruntime runs it. Nothing here knows a grid, a layer count or a width: all come from the
model's config through the LLaVA adapter.
"""

from __future__ import annotations

import ast
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from pruner_core import PrunerConfig
from pruner_core.adapters import KVRecorder, adapter_for, check_split_layer, decode_step
from pruner_core.adapters.decoder import gather_positions, prune_sequence, run_layers
from pruner_core.adapters.hub import random_weights

from .onnx_compat import portable_loops
from .onnx_weights import share_duplicate_initializers
from .common import (
    ExportOptions,
    TokenEmbedding,
    build_export_config,
    check_method_exportable,
    copy_model_files,
    tensor_spec,
    write_json,
    write_processor_files,
)

# Dynamic dimensions, as export_config.json and the ONNX files name them.
SEQUENCE = "sequence_length"  # tokens fed in this call
PAST = "past_sequence_length"  # cached entries of the layers that keep the full prompt (all layers at layer 0)
PRUNED_PAST = "pruned_past_sequence_length"  # cached entries of layers >= K (layer >= 1 only)
# layers >= K's present length at layer >= 1: sequence_length - (N - R) at the prompt, pruned_past + sequence_length
# at a decoding step (data-dependent: the graph's If decides); export_config.json records both
PRUNED_PRESENT = "pruned_present_sequence_length"

GRAPH_DIR = "onnx"
DTYPE_SUFFIX = {"fp32": "", "fp16": "_fp16"}
QUANTIZED_SUFFIX = {"int8": "_quantized", "int4": "_q4"}
DECODER_GRAPHS = frozenset({"decoder_model_merged"})  # the graph holding the decoder's linears
Q4_BLOCK_SIZE = 32  # weights per 4-bit block (one fp scale each), as transformers.js' q4 files
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SPEC_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int64: "int64"}
EXTERNAL_DATA_BYTES = 1 << 30  # graphs with more weights than this keep them in "<graph>.onnx_data" (protobuf: 2 GiB)
EXTERNAL_DATA_SUFFIX = "_data"  # transformers.js looks for "<graph>.onnx_data"
INLINE_TENSOR_BYTES = 1024  # external tensors up to this size go back into the graph file

# Model files a transformers.js-style runtime reads besides the graphs, the tokenizer and the processor files.
MODEL_FILES = ("config.json", "generation_config.json")


Progress = Callable[[str], None]


# ================================================================================================================
# What the graphs need to know about the model
# ================================================================================================================


@dataclass(frozen=True)
class LlavaShapes:
    """Sizes read from a loaded LLaVA model and the pruner config; every static dim of every graph comes from here."""

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


def read_shapes(model: nn.Module, processor: Any, config: PrunerConfig, dtype: torch.dtype) -> LlavaShapes:
    """Every static dim from the model's adapter (its geometry at the export size) and the pruner config."""
    adapter = adapter_for(model)
    geometry = adapter.geometry(model)
    grid = geometry.grid
    split = check_split_layer(config, geometry.num_layers)
    return LlavaShapes(
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


def _kv_specs(prefix: str, shapes: LlavaShapes, lengths: list[int | str], dtype: str) -> list[dict[str, Any]]:
    """past_key_values.{i}.key/value or present.{i}.key/value, [1, Hkv, lengths[i], d]."""
    return [
        tensor_spec(f"{prefix}.{i}.{kind}", [1, shapes.kv_heads, length, shapes.head_dim], dtype)
        for i, length in enumerate(lengths)
        for kind in ("key", "value")
    ]


def _example_kv(shapes: LlavaShapes, lengths: list[int], generator: torch.Generator) -> list[tuple]:
    def tensor(length: int) -> torch.Tensor:
        return torch.randn(1, shapes.kv_heads, length, shapes.head_dim, generator=generator).to(shapes.dtype)

    return [(tensor(length), tensor(length)) for length in lengths]


def _dyn() -> Any:
    return torch.export.Dim.DYNAMIC


def vision_plan(model: nn.Module, shapes: LlavaShapes, config: PrunerConfig, generator) -> GraphPlan:
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


def embed_plan(model: nn.Module, shapes: LlavaShapes, generator) -> GraphPlan:
    ids = torch.randint(0, shapes.vocab, (1, 5), generator=generator)
    return GraphPlan(
        name="embed_tokens", module=TokenEmbedding(model), example=(ids,), dynamic_shapes=({1: _dyn()},),
        inputs=[tensor_spec("input_ids", [1, SEQUENCE], "int64")],
        outputs=[tensor_spec("inputs_embeds", [1, SEQUENCE, shapes.hidden], SPEC_DTYPES[shapes.dtype])],
    )


def decoder_plan(model: nn.Module, shapes: LlavaShapes, config: PrunerConfig, generator) -> GraphPlan:
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


def graph_plans(model: nn.Module, shapes: LlavaShapes, config: PrunerConfig) -> list[GraphPlan]:
    generator = torch.Generator().manual_seed(0)
    plans = [vision_plan(model, shapes, config, generator), embed_plan(model, shapes, generator)]
    plans.append(decoder_plan(model, shapes, config, generator))
    return plans


# ================================================================================================================
# trace -> lower -> serialise
# ================================================================================================================


def _input_names(plan: GraphPlan) -> list[str]:
    return [spec["name"] for spec in plan.inputs]


def _output_names(plan: GraphPlan) -> list[str]:
    return [spec["name"] for spec in plan.outputs]


def trace(plan: GraphPlan) -> torch.export.ExportedProgram:
    # no_grad: a grad-mode switch between the selection's scan and the layers breaks tracing (see adapter.rotary);
    # strict=False: the stock transformers layers trace only in non-strict mode
    with torch.no_grad():
        return torch.export.export(plan.module.eval(), plan.example, dynamic_shapes=plan.dynamic_shapes, strict=False)


def lower(plan: GraphPlan, program: torch.export.ExportedProgram):
    # no_grad again: the exporter re-runs the program, and a scan over weights that require grad would be
    # differentiated (torch 2.13 fails there)
    with torch.no_grad():
        return torch.onnx.export(
            program, (), dynamo=True, input_names=_input_names(plan), output_names=_output_names(plan),
            verbose=False,
        )


def weight_bytes(onnx_program) -> int:
    return sum(
        value.const_value.nbytes for value in onnx_program.model.graph.initializers.values()
        if value.const_value is not None
    )


def save_graph(plan: GraphPlan, onnx_program, path: Path, external_bytes: int = EXTERNAL_DATA_BYTES) -> list[Path]:
    """Write one lowered graph to ``path`` with the contract's dim names; returns the files written.

    Graphs with more than ``external_bytes`` of weights keep them in ``<name>.onnx_data`` (transformers.js' name).
    """
    import onnx

    external = weight_bytes(onnx_program) > external_bytes
    share_duplicate_initializers(onnx_program.model)  # one copy of each weight (layer K's If branch)
    onnx_program.save(str(path), external_data=external)
    model = onnx.load(str(path), load_external_data=False)
    apply_contract(model, plan)
    portable_loops(model)  # the selection's loop in a form OpenVINO converts too (export/onnx_compat.py)
    for name, default in plan.input_defaults.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(default, name))
    files = [path]
    if external:
        inline_small_external_tensors(model, path.parent)
        files.append(relocate_external_data(model, path.parent, path.name + EXTERNAL_DATA_SUFFIX))
    onnx.save(model, str(path))
    return files


def inline_small_external_tensors(model, folder: Path, max_bytes: int = INLINE_TENSOR_BYTES) -> int:
    """Move the data of external tensors of at most ``max_bytes`` (shapes, split sizes, scalars) from the data file
    in ``folder`` back into ``model`` (loaded without its data); returns how many moved. The torch exporter writes
    every initializer externally once a graph has external data, and ONNX shape inference (the checker's full
    check, onnxruntime's graph optimisers) cannot read a Split's or Reshape's sizes from an external file (measured:
    Qwen2.5-VL's window attention, a Split by window lengths, at 3B widths). onnx.save's own threshold is 1 KiB."""
    import onnx

    moved = 0
    for tensor in list(_external_tensors(model.graph)):
        info = {entry.key: entry.value for entry in tensor.external_data}
        length = int(info.get("length", -1))
        if not 0 <= length <= max_bytes:
            continue
        with open(folder / info["location"], "rb") as handle:
            handle.seek(int(info.get("offset", 0)))
            tensor.raw_data = handle.read(length)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
        moved += 1
    return moved


def relocate_external_data(model, folder: Path, location: str) -> Path:
    """Rename the external data file(s) of ``model`` (loaded without its data) to ``folder/location``."""
    tensors = list(_external_tensors(model.graph))
    old = {entry.value for tensor in tensors for entry in tensor.external_data if entry.key == "location"}
    if len(old) != 1:
        raise RuntimeError(f"expected one external data file, found {sorted(old)}; re-run the export")
    (folder / old.pop()).replace(folder / location)
    for tensor in tensors:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    return folder / location


def _external_tensors(graph):
    """Every tensor of ``graph`` and its subgraphs whose data lives in an external file."""
    import onnx

    for tensor in graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor
    for node in graph.node:
        for attribute in node.attribute:
            for tensor in [attribute.t, *attribute.tensors]:
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    yield tensor
            for subgraph in [attribute.g, *attribute.graphs]:
                yield from _external_tensors(subgraph)


# ---- the contract: dim names and a check of every graph input and output -------------------------------------

_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def apply_contract(model, plan: GraphPlan) -> None:
    """Rename the exporter's symbolic dims (``s13``, ``s13 + s29``) to the contract's names and check every graph
    input and output (name, dtype, shape) against ``plan``; a mismatch is an exporter change this code must follow."""
    graph = model.graph
    mapping = _symbol_mapping(graph.input, plan.inputs)
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.dim_param = _SYMBOL.sub(lambda m: mapping.get(m.group(), m.group()), dim.dim_param)
    check_contract(model, plan, set_names=True)


def _symbol_mapping(values, specs: list[dict[str, Any]]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for value, spec in zip(values, specs):
        for dim, want in zip(value.type.tensor_type.shape.dim, spec["shape"]):
            if dim.HasField("dim_param") and isinstance(want, str) and want.isidentifier():
                mapping.setdefault(dim.dim_param, want)
    return mapping


def check_contract(model, plan: GraphPlan, set_names: bool = False) -> None:
    """Raise unless the graph's inputs and outputs are exactly ``plan``'s (same order, dtype, equivalent shapes)."""
    graph = model.graph
    for kind, values, specs in (("input", graph.input, plan.inputs), ("output", graph.output, plan.outputs)):
        names = [value.name for value in values]
        if names != [spec["name"] for spec in specs]:
            expected = [spec["name"] for spec in specs]
            raise RuntimeError(f"{plan.name}: graph {kind}s are {names}, the contract says {expected}")
        for value, spec in zip(values, specs):
            _check_value(plan.name, value, spec, set_names, frozenset(plan.data_dependent_dims))


def _check_value(graph_name: str, value, spec: dict[str, Any], set_names: bool,
                 data_dependent: frozenset[str] = frozenset()) -> None:
    import onnx

    tensor_type = value.type.tensor_type
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
    where = f"{graph_name}: {value.name}"
    if dtype != spec["dtype"]:
        raise RuntimeError(f"{where} is {dtype}, the contract says {spec['dtype']}")
    dims = tensor_type.shape.dim
    if len(dims) != len(spec["shape"]):
        raise RuntimeError(f"{where} has rank {len(dims)}, the contract says shape {spec['shape']}")
    for dim, want in zip(dims, spec["shape"]):
        actual = dim.dim_param if dim.HasField("dim_param") else dim.dim_value if dim.HasField("dim_value") else None
        if (actual is None or want in data_dependent) and set_names:  # unknown or decided at run time (an If's
            actual = want  # branches disagree): record the contract's name
        if isinstance(want, int) and actual != want:
            raise RuntimeError(f"{where} has dim {actual!r} where the contract has {want}")
        if isinstance(want, str):
            if not isinstance(actual, str) or not same_expression(actual, want):
                raise RuntimeError(f"{where} has dim {actual!r} where the contract has {want!r}")
            if set_names:
                dim.dim_param = want


def evaluate_dim(expression: str, values: dict[str, int]) -> int:
    """The value of a dim expression such as ``past_sequence_length + sequence_length`` (+, -, *, // of names and
    integers); raises ValueError for anything else."""

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in values:
            return values[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp):
            ops = {ast.Add: int.__add__, ast.Sub: int.__sub__, ast.Mult: int.__mul__, ast.FloorDiv: int.__floordiv__}
            if type(node.op) in ops:
                return ops[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"unsupported dim expression {expression!r}")

    return walk(ast.parse(expression, mode="eval"))


def same_expression(a: str, b: str) -> bool:
    """Whether two dim expressions agree at a few random points (``s0 + s1`` == ``s1 + s0``)."""
    names = set(_SYMBOL.findall(a)) | set(_SYMBOL.findall(b))
    rng = random.Random(0)
    try:
        for _ in range(4):
            values = {name: rng.randrange(1000, 100000) for name in names}
            if evaluate_dim(a, values) != evaluate_dim(b, values):
                return False
    except ValueError:
        return False
    return True


# ---- int8 -------------------------------------------------------------------------------------------------------


def quantize_graph(
    plan: GraphPlan, source: Path, target: Path, external_bytes: int = EXTERNAL_DATA_BYTES
) -> list[Path]:
    """onnxruntime dynamic int8 quantization of the weight MatMuls / Gathers of one graph -> the files written.

    Only MatMuls with a constant weight are quantized (onnxruntime's default for dynamic mode), so the selection's
    similarity products stay in float. The exporter's value_info is dropped first: the quantizer rewrites
    initializers (Gemm -> MatMul transposes weights) and its shape inference then trips over the stale entries.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(source))
    external = sum(t.ByteSize() for t in model.graph.initializer) > external_bytes
    del model.graph.value_info[:]
    quantize_dynamic(model, str(target), weight_type=QuantType.QInt8, use_external_data_format=external)
    return _finish_quantized(plan, target, external)


def quantize_graph_int4(
    plan: GraphPlan, source: Path, target: Path, external_bytes: int = EXTERNAL_DATA_BYTES
) -> list[Path]:
    """onnxruntime MatMulNBits: 4-bit symmetric weights in blocks of ``Q4_BLOCK_SIZE`` for every MatMul with a
    constant weight of a decoder graph (the decoder's linear layers and the LM head) -> the files written; other
    graphs are copied as they are. Activations stay float; the selection's similarity products (no constant weight)
    are untouched."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(source))
    external = sum(t.ByteSize() for t in model.graph.initializer) > external_bytes
    if plan.name in DECODER_GRAPHS:
        # the selection's sums over a dim are matmuls with a [..., C, 1] tensor of ones: not weights, left float
        unit = {t.name: t for t in model.graph.initializer if 1 in t.dims}
        reductions = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in unit
                      and np.all(onnx.numpy_helper.to_array(unit[n.input[1]]) == 1)]
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=Q4_BLOCK_SIZE, is_symmetric=True,
                                         nodes_to_exclude=reductions)
        quantizer.process()
        model = quantizer.model.model
    onnx.save(model, str(target), save_as_external_data=external, all_tensors_to_one_file=True,
              location=target.name + EXTERNAL_DATA_SUFFIX)
    return _finish_quantized(plan, target, external)


def _finish_quantized(plan: GraphPlan, target: Path, external: bool) -> list[Path]:
    import onnx

    _tidy_quantized(target, external)
    quantized = onnx.load(str(target), load_external_data=False)
    check_contract(quantized, plan)
    files = [target]
    if external:
        files.append(relocate_external_data(quantized, target.parent, target.name + EXTERNAL_DATA_SUFFIX))
        onnx.save(quantized, str(target))
    return files


def _tidy_quantized(target: Path, external: bool) -> None:
    """Rewrite a quantized graph file with its nodes in topological order, If / Scan bodies' reads of outer values
    counted (onnx_ir's sort: onnxruntime's quantizers re-sort the main graph without them and can place the layer-K
    decoder's If before values its branches read), and with branch copies of outer weights dropped
    (``share_duplicate_initializers``: the 4-bit quantizer writes a branch's quantized weight into the branch)."""
    import onnx_ir as ir

    import onnx

    old_data = {entry.value for tensor in _external_tensors(onnx.load(str(target), load_external_data=False).graph)
                for entry in tensor.external_data if entry.key == "location"}
    model = ir.load(str(target))  # external weights stay lazy
    model.graph.sort()
    share_duplicate_initializers(model)
    staged = target.with_name(target.name + ".tidy")
    ir.save(model, str(staged), external_data=staged.name + "_data" if external else None)
    staged.replace(target)
    for location in old_data:  # the quantizer's data file; relocate_external_data names the new one
        (target.parent / location).unlink(missing_ok=True)


# ---- dtypes ---------------------------------------------------------------------------------------------------------


def check_dtype_runs(dtype: str, quantize: str) -> None:
    """Refuse dtypes onnxruntime's CPU provider cannot run, by asking it (a one-MatMul probe graph)."""
    if quantize == "int8" and dtype != "fp32":
        raise ValueError(
            f"--quantize int8 quantizes fp32 weights (onnxruntime dynamic quantization); use --dtype fp32 with "
            f"--quantize int8, or --dtype {dtype} without it"
        )
    if dtype == "fp32":
        return
    import onnx
    import onnxruntime
    from onnx import helper

    element = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}[dtype]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"]), helper.make_node("Softmax", ["c"], ["d"])], "probe",
        [helper.make_tensor_value_info(name, element, [2, 2]) for name in ("a", "b")],
        [helper.make_tensor_value_info("d", element, [2, 2])],
    )
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    try:
        onnxruntime.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own NotImplemented / Fail types
        raise ValueError(
            f"--dtype {dtype}: onnxruntime {onnxruntime.__version__} cannot run {dtype} MatMul / Softmax on its CPU "
            f"provider ({type(error).__name__}: {str(error).strip()[:160]}); export with --dtype fp16 or fp32"
        ) from None


# ================================================================================================================
# Folder contents besides the graphs
# ================================================================================================================


def graph_file(name: str, options: ExportOptions) -> str:
    suffix = QUANTIZED_SUFFIX.get(options.quantize) or DTYPE_SUFFIX[options.dtype]
    return f"{GRAPH_DIR}/{name}{suffix}.onnx"


def decoder_layout(shapes: LlavaShapes) -> dict[str, Any]:
    """What a runtime needs to build empty caches and positions for ``decoder_model_merged``."""
    return {
        "num_layers": shapes.num_layers,
        "num_key_value_heads": shapes.kv_heads,
        "head_dim": shapes.head_dim,
        "hidden_size": shapes.hidden,
        "vocab_size": shapes.vocab,
        "full_cache_layers": shapes.split_layer,  # layers 0 .. K-1 cache the full prompt, the rest the kept one
        "uses_attention_mask": shapes.split_layer == 0,
        "position_scheme": shapes.position_scheme,  # "1d": position_ids [1, S]; "mrope": [3, 1, S] (runtime/positions)
    }


# ================================================================================================================
# The entry point
# ================================================================================================================


def export_onnx(
    model_dir: Path,
    out_dir: Path,
    options: ExportOptions,
    *,
    model_id: str,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Export the pruned LLaVA in ``model_dir`` to ONNX graphs in ``out_dir`` (an existing, empty staging folder);
    returns the export_config.json payload it wrote. Stages reported to ``progress``: trace, lower, serialise."""
    import onnx

    progress = progress or (lambda stage: None)
    if options.target != "onnx":
        raise ValueError(f"export_onnx writes the onnx target, got options for {options.target!r}")
    check_method_exportable(options)
    check_dtype_runs(options.dtype, options.quantize)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    adapter = adapter_for(model_dir)
    model, processor = adapter.load(model_dir, dtype=TORCH_DTYPES[options.dtype], image_size=options.image_size)
    model.requires_grad_(False)
    if options.pruner.layer >= 1:  # the layer-K decoder's layers >= K see a length only its If knows: sdpa's
        model.set_attn_implementation({"text_config": "eager"})  # shape checks cannot trace it, eager attention can
    shapes = read_shapes(model, processor, options.pruner, TORCH_DTYPES[options.dtype])
    _check_max_seq_len(options.max_seq_len, shapes, model.config.text_config.max_position_embeddings)
    plans = graph_plans(model, shapes, options.pruner)

    progress("trace")
    programs = [trace(plan) for plan in plans]
    progress("lower")
    lowered = [lower(plan, program) for plan, program in zip(plans, programs)]
    del programs

    progress("serialise")
    graphs, written = _serialise(plans, lowered, out_dir, options)
    for path in written:
        if path.suffix == ".onnx":
            onnx.checker.check_model(str(path), full_check=True)  # path form: works with external data too
    tokenizer_files, copied = copy_model_files(model_dir, processor, out_dir, MODEL_FILES)
    # the stock processors then put as many image placeholders in the prompt as vision_encoder returns
    written_processor = write_processor_files(out_dir, adapter, processor, shapes.placeholders)
    copied += [name for name in written_processor if name not in copied]
    payload = build_export_config(
        options,
        random_weights=random_weights(model_dir),
        model_id=model_id,
        num_image_tokens=shapes.n_image,
        grid=shapes.grid,
        methods={plan.name: {"inputs": plan.inputs, "outputs": plan.outputs} for plan in plans},
        image_preprocessing=adapter.image_preprocessing(processor).to_dict(),
        tokenizer=adapter.tokenizer_info(model, processor, tokenizer_files),
        files=[str(path.relative_to(out_dir)) for path in written] + copied,
        extra=_onnx_fields(shapes, graphs, plans),
    )
    write_json(out_dir / "export_config.json", payload)
    return payload


def _onnx_fields(shapes: LlavaShapes, graphs: dict[str, str], plans: list[GraphPlan]) -> dict[str, Any]:
    """What export_config.json adds for this target (the graph contracts themselves are its "methods")."""
    dims = {name: cases for plan in plans for name, cases in plan.data_dependent_dims.items()}
    return {
        "graphs": graphs,  # graph name -> file, relative to the folder
        "image_placeholders": shapes.placeholders,  # image tokens the prompt must carry (R at layer 0, N after)
        "prompt_image_start": shapes.prompt_image_start,  # the layer-0 encoder's default image_start
        "decoder": decoder_layout(shapes),
        # M-RoPE families keep the kept tokens' original positions at layer 0 too (runtime/positions.py)
        **({"positions": "original"} if shapes.position_scheme == "mrope" else {}),
        # dims an If decides at run time (layer >= 1): name -> {"prompt": expression, "decoding step": expression}
        **({"data_dependent_dims": dims} if dims else {}),
    }


def _serialise(plans: list[GraphPlan], lowered: list, out_dir: Path, options: ExportOptions):
    """Save every graph (quantizing at --quantize int8 / int4) -> ({graph name: relative file}, files written)."""
    graph_dir = out_dir / GRAPH_DIR
    graph_dir.mkdir(parents=True, exist_ok=True)
    scratch = out_dir / ".fp32"  # unquantized graphs, removed once quantized
    graphs, written = {}, []
    for plan, onnx_program in zip(plans, lowered):
        relative = graph_file(plan.name, options)
        if options.quantize in QUANTIZED_SUFFIX:
            scratch.mkdir(exist_ok=True)
            save_graph(plan, onnx_program, scratch / f"{plan.name}.onnx")
            quantize = quantize_graph if options.quantize == "int8" else quantize_graph_int4
            written += quantize(plan, scratch / f"{plan.name}.onnx", out_dir / relative)
        else:
            written += save_graph(plan, onnx_program, out_dir / relative)
        graphs[plan.name] = relative
    shutil.rmtree(scratch, ignore_errors=True)
    return graphs, written


def _check_max_seq_len(max_seq_len: int, shapes: LlavaShapes, max_positions: int) -> None:
    if max_seq_len > max_positions:
        raise ValueError(
            f"max_seq_len={max_seq_len} exceeds the model's {max_positions} RoPE positions; "
            f"pass --max-seq-len <= {max_positions}"
        )
    needed = shapes.prompt_image_start + shapes.placeholders + 2
    if max_seq_len < needed:
        raise ValueError(
            f"max_seq_len={max_seq_len} cannot hold a prompt with {shapes.placeholders} image placeholders "
            f"(at least {needed} tokens); pass --max-seq-len >= {needed}"
        )
