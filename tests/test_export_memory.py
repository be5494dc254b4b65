"""Memory-lean export: lowering passes by slices of layers, one copy of shared weights, mapped checkpoint pages
handed back, the dtype a checkpoint is stored in."""

from __future__ import annotations

import gc
import json
import sys
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from export.common import checkpoint_dtype, resolve_dtype
from export.lowering import (
    LayerPass,
    LoweringMemory,
    layer_key,
    layer_passes,
    release_delegated_weights,
)
from export.memory import CheckpointPages, fewer_collections, mapped_ranges, release_tracing_caches


class Stack(nn.Module):
    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dims[0], bias=False)
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(dims, dims[1:]))
        self.head = nn.Linear(dims[-1], 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


@pytest.fixture(scope="module")
def traced() -> torch.export.ExportedProgram:
    return torch.export.export(Stack([16, 16, 16, 32, 16]).eval(), (torch.randn(2, 8),), strict=False)


def test_layer_key_reads_the_module_path(traced):
    keys = {layer_key(node) for node in traced.graph_module.graph.nodes if node.op == "call_function"}
    assert {("layers", i) for i in range(4)} <= keys and None in keys  # embed / head / relu glue: outside layers


def test_layer_passes_split_by_weight_budget(traced):
    layer_bytes = [16 * 16 * 4, 16 * 16 * 4, 16 * 32 * 4, 32 * 16 * 4]  # fp32 Linear weights, no bias
    rest_bytes = (8 * 16 + 16 * 4) * 4  # embed and head
    whole = layer_passes(traced, budget_bytes=sum(layer_bytes) + rest_bytes)
    assert whole == [LayerPass(frozenset(("layers", i) for i in range(4)), rest=True)]  # fits: one pass
    one_each = layer_passes(traced, budget_bytes=1)
    assert [sorted(p.layers) for p in one_each] == [[("layers", i)] for i in range(4)] + [[]]
    assert [p.rest for p in one_each] == [False] * 4 + [True]
    two = layer_passes(traced, budget_bytes=layer_bytes[2] + rest_bytes)
    assert [sorted(i for _, i in p.layers) for p in two] == [[0, 1], [2], [3]]
    assert [p.rest for p in two] == [False, False, True]  # the glue fits with the last layer
    pair = layer_passes(traced, budget_bytes=layer_bytes[0] + layer_bytes[1])  # embed's weight: with the glue,
    assert sorted(pair[0].layers) == [("layers", 0), ("layers", 1)]  # not counted in layer 0, which reads its output
    owned = [node for node in traced.graph_module.graph.nodes if any(p.owns(node) for p in one_each)]
    calls = [node for node in traced.graph_module.graph.nodes if node.op == "call_function"]
    assert owned == calls and all(sum(p.owns(node) for p in one_each) == 1 for node in calls)  # a partition


def _quantize_8da4w(model: nn.Module, group: int, filter_fn=None) -> None:
    """torchao's 8da4w (int8 dynamic activations, int4 weights in groups of ``group``), as the exporter applies it."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group)),
              filter_fn=filter_fn)


def test_layer_passes_count_quantized_weights_in_their_layers():
    """torch.export reads torchao's quantized weights through access_subclass_inner_tensor nodes traced outside
    every layer: they still count for the layer whose linear reads them, at the bytes they hold (int8-unpacked 4-bit
    data plus scales), so a quantized decoder is lowered a slice at a time (it was one pass: a transient 6.4 GiB
    at full size)."""
    model = Stack([16, 16, 16, 32, 16]).eval()
    _quantize_8da4w(model, group=16, filter_fn=lambda module, fqn: fqn.startswith("layers."))
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(2, 8),), strict=False)
    one_each = layer_passes(program, budget_bytes=1)
    assert [sorted(p.layers) for p in one_each] == [[("layers", i)] for i in range(4)] + [[]]
    int8_bytes = 16 * 16 + 16 * 16 + 16 * 32 + 32 * 16  # the layers' int8-unpacked weights alone
    assert len(layer_passes(program, budget_bytes=int8_bytes)) > 1  # scales count too: they do not all fit
    whole = layer_passes(program, budget_bytes=1 << 30)
    assert whole == [LayerPass(frozenset(("layers", i) for i in range(4)), rest=True)]


def test_lowering_memory_keeps_one_copy_per_named_data_key():
    def delegate(*entries: tuple[str, bytes]) -> nn.Module:
        module = nn.Module()
        module.named_data_store_output = SimpleNamespace(
            buffers=[data for _, data in entries],
            pte_data={key: SimpleNamespace(buffer_index=i) for i, (key, _) in enumerate(entries)},
        )
        return module

    weight = bytes(range(256)) * 64
    first, second = delegate(("w", weight), ("s", b"scale")), delegate(("w", bytes(bytearray(weight))), ("x", b"other"))
    assert second.named_data_store_output.buffers[0] is not weight  # an equal copy, as a second method makes
    root = nn.Module()
    root.a, root.b = first, second
    shared = LoweringMemory()
    shared.adopt(root)
    assert second.named_data_store_output.buffers[0] is first.named_data_store_output.buffers[0]
    assert shared.merged_bytes == len(weight)
    shared.adopt(root)  # adopting again changes nothing
    assert shared.merged_bytes == len(weight)


def _rss_file_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT and /proc are Linux's")
def test_checkpoint_pages_hands_mapped_weights_back(tmp_path):
    path = tmp_path / "weights.bin"
    size = 64 << 20
    np.arange(size // 4, dtype=np.float32).tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r")
    before = _rss_file_bytes()
    total = float(mapped.sum())  # touches every page: they are resident now
    assert _rss_file_bytes() - before > size // 2
    assert mapped_ranges([path.resolve()])
    with CheckpointPages([path], interval=0.05):
        pass  # released once more on exit
    assert _rss_file_bytes() - before < size // 4, "the mapped pages stayed resident"
    assert float(mapped.sum()) == total  # nothing is lost: the pages come back from the file


def test_dtype_auto_is_the_checkpoints_own(tmp_path):
    for stored, expected in (("float16", "fp16"), ("bfloat16", "bf16"), ("float32", "fp32"), (None, "fp32")):
        folder = tmp_path / str(stored)
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"text_config": {"dtype": stored}}))
        assert checkpoint_dtype(folder) == expected
    half = tmp_path / "float16"
    assert resolve_dtype("auto", half, "executorch", "none")[0] == "fp16"  # never an fp32 copy of fp16 weights
    assert resolve_dtype("auto", tmp_path / "bfloat16", "onnx", "none")[0] == "fp16"  # onnxruntime CPU: no bf16
    assert resolve_dtype("auto", half, "onnx", "int8")[0] == "fp32"  # int8 quantizes fp32 weights
    assert resolve_dtype("auto", half, "onnx", "int4")[0] == "fp16"
    assert resolve_dtype("fp32", half, "executorch", "none")[0] == "fp32"  # asked for: as asked


class InputWeight(nn.Module):
    """A linear whose weight is an input: XNNPACK's linear config cannot take it (weights must be constants)."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, weight)


def test_deciding_partitioner_skips_the_check_only_when_every_op_passes(traced):
    """The first slice partitioner returns no filter when every node of the ops it keeps from decomposition passes
    XNNPACK's check (ExecuTorch then decomposes once, not three times per method, and keeps the same ops); when one
    does not, it returns XNNPACK's filter; later partitioners never filter."""
    from export.lowering import slice_partitioner

    everything = LayerPass(frozenset(("layers", i) for i in range(4)), rest=True)
    program = traced.run_decompositions({})  # what ExecuTorch asks the partitioner about: functionalized
    ops, check = slice_partitioner(everything, True).ops_to_not_decompose(program)
    linears = [n for n in program.graph_module.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert torch.ops.aten.linear.default in ops and len(linears) == 6 and check is None
    odd = torch.export.export(InputWeight(), (torch.randn(2, 8), torch.randn(4, 8)), strict=False)
    odd = odd.run_decompositions({})
    ops, check = slice_partitioner(everything, True).ops_to_not_decompose(odd)
    node = next(n for n in odd.graph_module.graph.nodes if n.target == torch.ops.aten.linear.default)
    assert check is not None and not check(node)
    assert slice_partitioner(everything, False).ops_to_not_decompose(odd)[1] is None


def test_release_tracing_caches_empties_live_shape_envs_fake_tensor_caches():
    """A ShapeEnv that outlives an export keeps cached fake-tensor results, and through their keys the traced weights
    (a full-depth LLaVA-7B 8da4w export was killed for memory in the validation after it): release_tracing_caches
    empties the cache of every ShapeEnv still alive."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    weight = torch.zeros(4, 4)
    env.fake_tensor_cache["key holding a weight"] = weight
    release_tracing_caches()
    assert env.fake_tensor_cache == {}


def _lowered(program: torch.export.ExportedProgram):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])


def test_release_delegated_weights_frees_the_lowered_originals_and_writes_the_same_program(traced):
    """Each delegate's original program keeps its weights after the backend has copied them into its own bytes: they
    are swapped for one-element stand-ins of the same shape and dtype, and the written program does not change."""
    kept, released = _lowered(traced), _lowered(traced)
    graph_module = released.exported_program().graph_module
    originals = [m.original_module for m in graph_module.modules() if type(m).__name__ == "LoweredBackendModule"]
    weights = {name: (t.shape, t.dtype) for o in originals for name, t in o.state_dict.items()}
    total = sum(t.numel() * t.element_size() for o in originals for t in o.state_dict.values())
    assert originals and total == (8 * 16 + 16 * 16 * 2 + 16 * 32 * 2 + 16 * 4) * 4  # every Linear is delegated

    assert release_delegated_weights(graph_module) == total
    after = {name: t for o in originals for name, t in o.state_dict.items()}
    assert {name: (t.shape, t.dtype) for name, t in after.items()} == weights
    assert all(t.untyped_storage().nbytes() == t.element_size() for t in after.values())
    assert all(isinstance(t, nn.Parameter) for t in after.values())  # what ExportedProgram.module() expects
    assert release_delegated_weights(graph_module) == 0  # nothing left to let go
    assert released.to_executorch().buffer == kept.to_executorch().buffer


def test_lowering_memory_releases_the_traced_programs_once_the_first_pass_starts():
    """ExecuTorch makes every method's edge program before its first partitioner runs and never reads the traced
    programs again: their weights (torchao's quantized tensors included) go when the first pass starts, the edge
    program keeps its own references, and the written program is the one lowered without any release."""
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    from export.lowering import slice_partitioner

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(32, 32, bias=False) for _ in range(2))
            self.register_buffer("scale", torch.linspace(0.5, 1.5, 32))  # not delegated: the edge program keeps it

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return torch.cumsum(x, -1) * self.scale  # cumsum: portable, so the buffer stays outside the delegates

    def lowered(release: bool) -> bytes:
        torch.manual_seed(0)
        model = Decoder().eval()
        _quantize_8da4w(model, group=32)
        with torch.no_grad():
            traced = torch.export.export(model, (torch.randn(2, 32),), strict=False)
        memory = LoweringMemory([traced] if release else [])
        passes = [LayerPass(frozenset({("layers", 0)})), LayerPass(frozenset({("layers", 1)}), rest=True)]
        partitioners = [p for i, layer_pass in enumerate(passes) for p in (
            slice_partitioner(layer_pass, i == 0, memory, config_precisions=ConfigPrecisionType.DYNAMIC_QUANT,
                              per_op_mode=True),
            slice_partitioner(layer_pass, i == 0, memory))]
        edge = to_edge_transform_and_lower(traced, partitioner=partitioners,
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False))
        memory.pass_starts(edge.exported_program().graph_module)
        if release:
            left = list(traced.state_dict.values())
            assert len(left) == 3 and all(type(t) in (torch.Tensor, nn.Parameter) for t in left)  # no subclass left
            assert all(t.untyped_storage().nbytes() <= t.element_size() for t in left)
            assert memory.released_bytes >= 2 * 32 * 32  # the int8-unpacked 4-bit weights, at least
        return edge.to_executorch().buffer

    assert lowered(release=True) == lowered(release=False)


def test_fewer_collections_restores_the_collector():
    thresholds = gc.get_threshold()
    with fewer_collections(gen0_threshold=12345):
        assert gc.get_threshold()[0] == 12345 and gc.get_freeze_count() > 0  # the imports are out of the scans
        cycle = [None]
        cycle[0] = cycle  # garbage made inside is still collected
        probe = weakref.ref(Probe(cycle))
        del cycle
        gc.collect()
        assert probe() is None
    assert gc.get_threshold() == thresholds and gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), fewer_collections():
        raise RuntimeError("an export that fails")
    assert gc.get_threshold() == thresholds and gc.get_freeze_count() == 0


def _frozen(thing: object) -> bool:
    """Whether ``thing`` (a container the collector tracks) is frozen: gc.get_objects lists generations 0-2 only.
    (Not gc.get_freeze_count(): it drops whenever a frozen object is freed by reference counting, e.g. by another
    thread of the test process.)"""
    return not any(o is thing for o in gc.get_objects())


def test_fewer_collections_leaves_objects_frozen_before_it_frozen():
    """Nested, or inside a caller's own gc.freeze: the inner one's exit neither unfreezes the outer's objects nor
    leaves its own threshold behind."""
    thresholds = gc.get_threshold()
    before = [object()]  # alive before every freeze
    with fewer_collections(gen0_threshold=4321):
        assert _frozen(before)
        between = [object()]  # made inside the outer one, before the inner one
        with fewer_collections(gen0_threshold=12345):
            assert gc.get_threshold()[0] == 12345 and _frozen(before) and not _frozen(between)
        assert gc.get_threshold()[0] == 4321 and _frozen(before)
    assert gc.get_threshold() == thresholds and not _frozen(before) and not _frozen(between)
    gc.freeze()
    try:
        with fewer_collections():
            pass
        assert _frozen(before)  # the caller's freeze stands
    finally:
        gc.unfreeze()
    assert not _frozen(before)


class Probe:
    def __init__(self, cycle: list) -> None:
        self.cycle = cycle
        cycle.append(self)
