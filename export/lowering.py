"""Lowering a large method to XNNPACK in slices of layers, so that the backend's working copies stay small.

ExecuTorch's ``to_backend`` deep-copies every partition it is about to hand to a backend (all partitions of a pass
at once, weights included) before the backend serialises them, and only then lets the copies go. For a decoder
that is all of its weights a second time: 13.5 GiB for LLaVA-1.5-7B in fp16. ``to_edge_transform_and_lower``
accepts several partitioners per method and runs them as passes, one after the other; ``layer_passes`` splits a
method's layers (``...layers.<i>`` in the module paths torch.export records on every node) into passes of at most
``budget_bytes`` of weights, and ``slice_partitioner`` makes an XNNPACK partitioner that delegates only the nodes of
one pass, so each deep copy holds one slice. Nodes outside any layer (embeddings, final norm, LM head, projector,
glue) go in a last pass. The program is the same as with one pass (tested: same tokens), with a delegate per slice.

Methods that share weights (layer K's ``prefill`` and ``decode`` hold the same decoder) each get the backend's
serialised copy of them, until the program is written and the copies merged by content. ``SharedNamedData`` merges
them as the passes go: each slice partitioner first points the delegates already made at one copy per content key
(XNNPACK keys its data by SHA-256), so at most a slice's worth of duplicates lives at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

# the outermost "<container>.<index>" of a module path: a block of a ModuleList (decoders and CLIP: "layers",
# Qwen2-VL's vision tower: "blocks") or of a Sequential (Qwen's merger "mlp.0": a small slice of its own)
_LAYER = re.compile(r"^(.*?[A-Za-z_]\w*)\.(\d+)(?:\.|$)")
LayerKey = tuple[str, int]  # ("model.language_model.layers", 5), ("model.visual.blocks", 12)


def layer_key(node: torch.fx.Node) -> LayerKey | None:
    """The block a node was traced in: the outermost indexed module (``<...>.layers.<i>``, ``<...>.blocks.<i>``)
    of the innermost module path in its ``nn_module_stack`` that has one, or None."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        match = _LAYER.match(str(path))
        if match:
            return match.group(1), int(match.group(2))
    return None


@dataclass(frozen=True)
class LayerPass:
    """The layers one partitioner pass delegates (``rest``: also every node outside a layer)."""

    layers: frozenset[LayerKey]
    rest: bool = False

    def owns(self, node: torch.fx.Node) -> bool:
        if node.op != "call_function":
            return False
        key = layer_key(node)
        return key in self.layers if key is not None else self.rest


def layer_passes(program: torch.export.ExportedProgram, budget_bytes: int) -> list[LayerPass]:
    """Split the layers of a traced program into passes of at most ``budget_bytes`` of parameters each (a layer
    larger than the budget is a pass of its own), in graph order; the nodes outside any layer go with the last
    pass, or in one of their own when they do not fit. A model within the budget is one pass."""
    parameters = {**program.graph_signature.inputs_to_parameters, **program.graph_signature.inputs_to_buffers}
    state = program.state_dict
    sizes: dict[LayerKey | None, int] = {}  # None: outside any layer
    counted: set[str] = set()
    for node in program.graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        key = layer_key(node)
        sizes.setdefault(key, 0)
        for source in node.all_input_nodes:
            name = parameters.get(source.name)
            if name is not None and name not in counted and isinstance(state.get(name), torch.Tensor):
                counted.add(name)
                sizes[key] += state[name].numel() * state[name].element_size()
    rest = sizes.pop(None, 0)
    groups: list[list[LayerKey | None]] = [[]]
    used = 0
    for key, nbytes in [*sizes.items(), (None, rest)]:
        if groups[-1] and used + nbytes > budget_bytes:
            groups.append([])
            used = 0
        groups[-1].append(key)
        used += nbytes
    return [LayerPass(frozenset(k for k in group if k is not None), rest=None in group) for group in groups]


class SharedNamedData:
    """One bytes object per named-data key across every delegate of every method (see the module docstring)."""

    def __init__(self) -> None:
        self.by_key: dict[str, Any] = {}
        self.merged_bytes = 0

    def adopt(self, graph_module: torch.nn.Module) -> None:
        """Point the named data of every lowered module under ``graph_module`` at the first copy of each key."""
        for module in graph_module.modules():
            output = getattr(module, "named_data_store_output", None)
            if output is None:
                continue
            for key, entry in output.pte_data.items():
                buffer = output.buffers[entry.buffer_index]
                kept = self.by_key.setdefault(key, buffer)
                if kept is not buffer and len(kept) == len(buffer):
                    output.buffers[entry.buffer_index] = kept
                    self.merged_bytes += len(buffer)


def _every_op_passes(program: torch.export.ExportedProgram, ops: set, check) -> bool:
    """Whether every node of ``program`` (control-flow bodies included) whose target is in ``ops`` passes
    ``check``, the partitioner's filter of the ops it keeps from decomposition."""
    return all(check(node) for module in program.graph_module.modules() if isinstance(module, torch.fx.GraphModule)
               for node in module.graph.nodes if node.op == "call_function" and node.target in ops)


@lru_cache(maxsize=1)
def _slice_partitioner_class() -> type:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class XnnpackSlicePartitioner(XnnpackPartitioner):
        """An XnnpackPartitioner that delegates only the nodes one ``LayerPass`` owns (and their constants)."""

        def __init__(self, layer_pass: LayerPass, decides_decomposition: bool, shared: SharedNamedData | None,
                     **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.layer_pass = layer_pass
            self.decides_decomposition = decides_decomposition
            self.shared = shared

        def partition(self, exported_program):  # noqa: ANN001 - ExecuTorch's signature
            if self.shared is not None:  # the delegates of the previous passes: one copy of each weight
                self.shared.adopt(exported_program.graph_module)
            return super().partition(exported_program)

        def ops_to_not_decompose(self, ep):  # noqa: ANN001 - ExecuTorch's signature
            # to_edge_transform_and_lower retraces the whole graph for each partitioner that filters which ops to
            # keep from decomposition. The first pass's partitioner of each kind decides (same configs, same
            # answer); the later ones list the same ops without a filter: the graph then holds nothing left to
            # decompose, so their turn costs no retrace.
            ops, check = super().ops_to_not_decompose(ep)
            if not self.decides_decomposition or check is None or _every_op_passes(ep, set(ops), check):
                # Every node of those ops passes the backend's check (the usual case: linears on weights), so
                # keeping them all is what the check would keep: ExecuTorch then takes its one-decomposition path
                # instead of two more whole-graph retraces per method (EDGE_DO_NOT_DECOMP). Same graph -- for
                # XNNPACK's kept ops (linear, elu, hardswish, prelu, pooling, upsampling, torchao's quant ops),
                # which no decomposition of another op produces, so checking the graph before decomposing suffices.
                return ops, None
            return ops, check

        def get_matched_nodes_from_configs(self, ep):  # noqa: ANN001 - ExecuTorch's signature
            kept = []
            for group in super().get_matched_nodes_from_configs(ep):
                ops = {node for node in group if self.layer_pass.owns(node)}
                if ops:  # the group's own ops, plus its constants / inputs that feed them
                    kept.append([node for node in group if node in ops or (
                        node.op != "call_function" and any(user in ops for user in node.users))])
            return kept

    return XnnpackSlicePartitioner


def slice_partitioner(layer_pass: LayerPass, decides_decomposition: bool, shared: SharedNamedData | None = None,
                      **kwargs: Any):
    """An XNNPACK partitioner (``XnnpackPartitioner(**kwargs)``) restricted to ``layer_pass``; pass
    ``decides_decomposition`` for the first pass of each partitioner kind (see ``ops_to_not_decompose``) and one
    ``shared`` store for every partitioner of a program."""
    return _slice_partitioner_class()(layer_pass, decides_decomposition, shared, **kwargs)
