"""ONNX target: a pruned VLM (any adapter's family: LLaVA-1.5, Qwen2-VL / Qwen2.5-VL) as the graphs of the
onnx-community / transformers.js folder layout.

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
whose body reads no outer value, which OpenVINO converts as well as onnxruntime runs it. Nothing here knows a grid,
a layer count or a width: all come from the model's config through its family's adapter.

The graphs as modules and their plans: export/onnx_graphs.py; writing, external data and quantization:
export/onnx_files.py; the contract check: export/onnx_contract.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from pruner_core.adapters import adapter_for
from pruner_core.adapters.hub import random_weights

from .common import (
    ExportOptions,
    build_export_config,
    check_method_exportable,
    copy_model_files,
    write_json,
    write_processor_files,
)
from .onnx_files import quantize_graph, quantize_graph_int4, save_graph
from .onnx_graphs import GraphPlan, OnnxShapes, graph_plans, read_shapes

GRAPH_DIR = "onnx"
DTYPE_SUFFIX = {"fp32": "", "fp16": "_fp16"}
QUANTIZED_SUFFIX = {"int8": "_quantized", "int4": "_q4"}
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Model files a transformers.js-style runtime reads besides the graphs, the tokenizer and the processor files.
MODEL_FILES = ("config.json", "generation_config.json")


Progress = Callable[[str], None]


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


def decoder_layout(shapes: OnnxShapes) -> dict[str, Any]:
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
    """Export the pruned VLM in ``model_dir`` to ONNX graphs in ``out_dir`` (an existing, empty staging folder);
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


def _onnx_fields(shapes: OnnxShapes, graphs: dict[str, str], plans: list[GraphPlan]) -> dict[str, Any]:
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


def _check_max_seq_len(max_seq_len: int, shapes: OnnxShapes, max_positions: int) -> None:
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
