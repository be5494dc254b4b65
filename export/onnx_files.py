"""The ONNX graph files: one lowered graph written with its contract's dim names, weights above a size kept in
``<graph>.onnx_data`` (transformers.js' name), and onnxruntime int8 / 4-bit (MatMulNBits) quantization of a written
graph, re-checked against its contract.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .onnx_compat import portable_loops
from .onnx_contract import apply_contract, check_contract
from .onnx_graphs import GraphPlan
from .onnx_weights import share_duplicate_initializers

DECODER_GRAPHS = frozenset({"decoder_model_merged"})  # the graph holding the decoder's linears
Q4_BLOCK_SIZE = 32  # weights per 4-bit block (one fp scale each), as transformers.js' q4 files
EXTERNAL_DATA_BYTES = 1 << 30  # graphs with more weights than this keep them in "<graph>.onnx_data" (protobuf: 2 GiB)
EXTERNAL_DATA_SUFFIX = "_data"  # transformers.js looks for "<graph>.onnx_data"
INLINE_TENSOR_BYTES = 1024  # external tensors up to this size go back into the graph file


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
    (``share_duplicate_initializers``: the 4-bit quantizer writes a branch's quantized weight into the branch), and
    with tensors up to ``INLINE_TENSOR_BYTES`` in the graph file."""
    import onnx_ir as ir

    import onnx

    old_data = {entry.value for tensor in _external_tensors(onnx.load(str(target), load_external_data=False).graph)
                for entry in tensor.external_data if entry.key == "location"}
    model = ir.load(str(target))  # external weights stay lazy
    model.graph.sort()
    share_duplicate_initializers(model)
    staged = target.with_name(target.name + ".tidy")
    # onnx_ir's own threshold is 256 bytes: shape and split-size tensors up to INLINE_TENSOR_BYTES stay in the graph
    # (see inline_small_external_tensors: the full check cannot read them from the data file)
    ir.save(model, str(staged), external_data=staged.name + "_data" if external else None,
            size_threshold_bytes=INLINE_TENSOR_BYTES)
    staged.replace(target)
    for location in old_data:  # the quantizer's data file; relocate_external_data names the new one
        (target.parent / location).unlink(missing_ok=True)
