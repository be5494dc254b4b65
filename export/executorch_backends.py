"""ExecuTorch lowering: a recipe per backend, torchao quantisation, and trace -> lower -> write of a program's methods.

Family-agnostic: the methods come from export/executorch_export.py (``plan_methods``), the weights' places from the
model's adapter (``language_model``, ``lm_head``). Shapes are the methods' own.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from pruner_core.primitives import stable_argsort

from .common import ExportOptions
from .edge_rewrites import xnnpack_rewrites
from .lowering import LoweringMemory, layer_passes, slice_partitioner
from .parallel_lowering import lower_in_two_processes, second_process_methods

QUANT_GROUP_SIZE = 128  # torchao 8da4w group size, as ExecuTorch's LLaVA / Llama exports


class BackendUnavailableError(ImportError):
    """The chosen ExecuTorch backend's lowering toolchain is not usable on this machine."""


# ================================================================================================================
# Backends: a recipe per name (availability check before any work, partitioners per method)
# ================================================================================================================


@dataclass(frozen=True)
class BackendRecipe:
    """How one ExecuTorch backend lowers a method: ``check`` raises before any work; ``partitioners(options,
    method, program, memory)`` is called per method with its traced program and the program's ``LoweringMemory``,
    and returns the lowering passes, each a list of partitioners applied in order (partitioner objects keep state;
    see ``lower``); ``edge_passes()`` the graph passes every method's edge program goes through before it is
    partitioned (``to_edge_transform_and_lower``'s ``transform_passes``)."""

    name: str
    check: Callable[[ExportOptions], None]
    partitioners: Callable[[ExportOptions, str, torch.export.ExportedProgram, LoweringMemory], list[list]]
    edge_passes: Callable[[], list] = list


def _check_nothing(options: ExportOptions) -> None:
    return None




def _xnnpack_partitioners(options: ExportOptions, method: str, program: torch.export.ExportedProgram,
                          memory: LoweringMemory) -> list[list]:
    """One pass per slice of layers (export/lowering.py: bounds the backend's working copy of the weights)."""
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType

    passes = layer_passes(program, options.lowering_slice_bytes)
    if options.quantize == "8da4w" or options.quantize_vision == "int8":
        # dynamically quantised linears first, one per partition (keeps one unpacked weight in memory at a time),
        # then everything else, as ExecuTorch's LLaVA export does
        return [[slice_partitioner(p, i == 0, memory, config_precisions=ConfigPrecisionType.DYNAMIC_QUANT,
                                   per_op_mode=True),
                 slice_partitioner(p, i == 0, memory)] for i, p in enumerate(passes)]
    return [[slice_partitioner(p, i == 0, memory)] for i, p in enumerate(passes)]


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
                          memory: LoweringMemory) -> list[list]:
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
                          memory: LoweringMemory) -> list[list]:
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
    "xnnpack": BackendRecipe("xnnpack", _check_nothing, _xnnpack_partitioners, xnnpack_rewrites),
    "portable": BackendRecipe("portable", _check_portable, lambda options, method, program, memory: [[]]),
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
# Quantisation
# ================================================================================================================


def quant_group_size(in_features: int, preferred: int = QUANT_GROUP_SIZE) -> int:
    """``preferred`` when it divides the width, else the largest divisor below it (tiny widths)."""
    return max(g for g in range(1, min(preferred, in_features) + 1) if in_features % g == 0)


def decoder_linears(model: nn.Module) -> set[nn.Module]:
    """The decoder's linear layers and the LM head, found through the model's adapter (any family)."""
    from pruner_core.adapters import adapter_for

    adapter = adapter_for(model)
    head = adapter.lm_head(model)
    return {m for m in [*adapter.language_model(model).modules(), head] if isinstance(m, nn.Linear)}


def quantize_decoder_8da4w(model: nn.Module) -> None:
    """torchao int8 dynamic activations + int4 grouped weights on the decoder's linear layers and the LM head."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    decoder = decoder_linears(model)
    for width in sorted({m.in_features for m in decoder}):  # one quantize_ per group size: it must divide the width
        config = Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(quant_group_size(width))
        )

        def selected(module: nn.Module, fqn: str, width: int = width) -> bool:
            return module in decoder and module.in_features == width

        quantize_(model, config, filter_fn=selected)


def quantize_vision_int8(model: nn.Module) -> None:
    """torchao int8 dynamic activations + per-channel int8 weights on the linear layers outside the decoder: the
    vision tower's and the projector's / merger's (XNNPACK's dynamically quantised linears run them)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis

    decoder = decoder_linears(model)

    def selected(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and module not in decoder

    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    quantize_(model, config, filter_fn=selected)


# ================================================================================================================
# Tracing, lowering, writing
# ================================================================================================================


def _argsort(values: torch.Tensor, dim: int = -1, descending: bool = False, stable: bool = False) -> torch.Tensor:
    """aten::argsort as ``stable_argsort`` (two topk, no aten::sort), along ``dim``: the same indices, ties by
    index."""
    moved = values.movedim(dim, -1)
    return stable_argsort(-moved if descending else moved).movedim(-1, dim)


def without_sort(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """ExecuTorch 1.5.1 has no aten::sort kernel: any argsort a traced method holds (Qwen2.5-VL's tower inverts its
    window order with one) becomes ``stable_argsort``'s topk ops; a program without one is returned as is."""
    argsorts = {torch.ops.aten.argsort.default, torch.ops.aten.argsort.stable}
    if not any(node.target in argsorts for node in program.graph.nodes):
        return program

    def stable(values, *, stable=False, dim=-1, descending=False):
        return _argsort(values, dim, descending)

    return program.run_decompositions({torch.ops.aten.argsort.default: _argsort, torch.ops.aten.argsort.stable: stable})


def without_metadata_asserts(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` with its ``aten._assert_tensor_metadata`` nodes erased, in every graph it holds, in place.
    torch.export writes one for a ``Tensor.to`` (RMSNorm's two per norm, the rotary's, a cast to the dtype a tensor
    already has): a trace-time check of dtype and device that computes nothing, which ExecuTorch
    erases anyway in its first edge pass (``RemoveNonCoreAtenOpGraphAssertsPass``, exir/passes/
    remove_graph_asserts_pass.py), after two whole-program retraces have carried them. Erased before those, they
    also no longer keep weights of nodes that are otherwise dead alive into the program: the demo's layer-2 .pte
    dropped two unused CLIP weights (the last tower layer's q_proj / k_proj, past LLaVA's feature layer; 8 KiB
    there, 8 MiB at LLaVA-1.5-7B's fp32 widths), with the same instructions and delegates (measured)."""
    target = torch.ops.aten._assert_tensor_metadata.default
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            asserts = [node for node in module.graph.nodes if node.op == "call_function" and node.target is target]
            for node in asserts:
                module.graph.erase_node(node)
            if asserts:
                module.recompile()
    return program


def trace(plans: list) -> dict[str, torch.export.ExportedProgram]:
    """torch.export every method (``MethodPlan``s: non-strict, under no_grad: the selection's scan / cond need
    both), without aten::sort and without trace-time metadata asserts (``without_metadata_asserts``)."""
    programs = {}
    with torch.no_grad():
        for plan in plans:
            programs[plan.name] = without_metadata_asserts(without_sort(torch.export.export(
                plan.module, plan.example, dynamic_shapes=plan.dynamic_shapes, strict=False
            )))
    return programs


def trace_and_lower(plans: list, recipe: BackendRecipe, options: ExportOptions, constants: dict[str, Any],
                    progress: Callable[[str], None] | None = None):
    """``trace`` then ``lower`` every method (``MethodPlan``s), saying "trace" and "lower" to ``progress`` as each
    stage starts -> the edge programs, for ``write_program``.

    Takes the plans: ``plans`` is emptied, and each plan let go once traced, so that with the caller holding no
    module of the model only the traced programs reference the weights (which lowering releases as it goes). With
    ``options.jobs`` >= 2, a small model's methods without control flow are traced and lowered in a second process
    meanwhile (export/parallel_lowering.py); the program written is the same."""
    progress = progress or (lambda stage: None)
    second = second_process_methods(plans, options.jobs)
    names = [plan.name for plan in plans]
    pending = {plan.name: plan for plan in plans}
    plans.clear()

    def make(group: list[str], methods: dict[str, Any], report: Callable[[str], None]):
        report("trace")
        programs = trace([pending.pop(name) for name in group])
        report("lower")
        return lower(programs, recipe, options, methods)

    if not second:
        return make(names, constants, progress)
    return lower_in_two_processes(names, second, make, constants, progress)


def lower(programs: dict, recipe: BackendRecipe, options: ExportOptions, constants: dict[str, Any]):
    """Edge programs with the backend's delegates: every method's edge program through the recipe's
    ``edge_passes``, then its partitioner passes, in order, as one list of partitioners.
    The traced ``programs`` give up their weights on the way (export/lowering.py ``LoweringMemory``): they cannot
    be run afterwards, and the edge program returned is for writing (``write_program``), not for running eagerly."""
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    memory = LoweringMemory(programs.values())
    partitioners = {name: [p for step in recipe.partitioners(options, name, program, memory) for p in step]
                    for name, program in programs.items()}
    with torch.no_grad():
        edge = to_edge_transform_and_lower(
            programs, transform_passes=recipe.edge_passes() or None, partitioner=partitioners,
            constant_methods=constants, compile_config=EdgeCompileConfig(_check_ir_validity=False),
        )
    for name in edge.methods:
        memory.pass_starts(edge.exported_program(name).graph_module)  # what the last pass left
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

