"""Lowering a large method to XNNPACK in slices of layers, so that the backend's working copies stay small.

ExecuTorch's ``to_backend`` deep-copies every partition it is about to hand to a backend (all partitions of a pass
at once, weights included) before the backend serialises them, and only then lets the copies go. For a decoder
that is all of its weights a second time: 13.5 GiB for LLaVA-1.5-7B in fp16. ``to_edge_transform_and_lower``
accepts several partitioners per method and runs them as passes, one after the other; ``layer_passes`` splits a
method's layers (``...layers.<i>`` in the module paths torch.export records on every node) into passes of at most
``budget_bytes`` of weights, and ``slice_partitioner`` makes an XNNPACK partitioner that delegates only the nodes of
one pass, so each deep copy holds one slice. Nodes outside any layer (embeddings, final norm, LM head, projector,
glue) go in a last pass. The program is the same as with one pass (tested: same tokens), with a delegate per slice.

``LoweringMemory`` lets go of what the passes no longer need, as each pass starts:

* Methods that share weights (layer K's ``prefill`` and ``decode`` hold the same decoder) each get the backend's
  serialised copy of them, until the program is written and the copies merged by content: the delegates already
  made are pointed at one copy per content key (XNNPACK keys its data by SHA-256), so at most a slice's worth of
  duplicates lives at a time.
* A delegate keeps the edge program it was lowered from, weights included, though the backend has serialised them
  (``release_delegated_weights``), and the traced programs share those weights' storage until the lowering returns.
  When the first pass starts, ExecuTorch has made every method's edge program and does not read the traced programs
  again: their weights are released, and from then on each weight lives until its slice is lowered, then only as
  the backend's copy. For 8da4w that is the decoder's int8-unpacked 4-bit weights (1 byte per parameter, 6.1 GiB
  for LLaVA-1.5-7B) next to their packed copy; in fp16, every delegated weight a second time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable

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


def _reads_subclass_data(node: torch.fx.Node) -> bool:
    """Whether ``node`` is torch.export's read of a tensor subclass's inner tensor (``access_subclass_inner_tensor``,
    registered by torch.export when a program holds subclass weights)."""
    target = getattr(torch.ops.export, "access_subclass_inner_tensor", None)
    return target is not None and node.target is target.default


def _reader_layer(node: torch.fx.Node, hops: int = 4) -> LayerKey | None:
    """The block of the first node that reads ``node``'s output, following nodes traced outside any block for up
    to ``hops`` steps (breadth first), or None."""
    frontier = [node]
    for _ in range(hops):
        frontier = [user for reader in frontier for user in reader.users]
        for user in frontier:
            key = layer_key(user) if user.op == "call_function" else None
            if key is not None:
                return key
    return None


def layer_passes(program: torch.export.ExportedProgram, budget_bytes: int) -> list[LayerPass]:
    """Split the layers of a traced program into passes of at most ``budget_bytes`` of parameters each (a layer
    larger than the budget is a pass of its own), in graph order; the nodes outside any layer go with the last
    pass, or in one of their own when they do not fit. A model within the budget is one pass.

    A parameter counts for the layer of the node that reads it. torch.export reads a tensor subclass's data
    (torchao's 8da4w and int8 weights) through ``access_subclass_inner_tensor`` nodes at the top of the graph,
    outside every layer: such a weight counts for the layer of the first node that reads what they made
    (``_reader_layer``); counting them as outside every layer made the whole quantized decoder one pass (measured at
    full size: a transient 6.4 GiB, all 224 linears of LLaVA-1.5-7B copied for the backend at once). A plain weight
    read outside every layer (embeddings, LM head, projector) counts for the nodes outside any layer, with which it
    is delegated. Sizes are the bytes held (a subclass's inner tensors: 1 byte per int8-unpacked 4-bit weight), not
    the weights' nominal dtype."""
    parameters = {**program.graph_signature.inputs_to_parameters, **program.graph_signature.inputs_to_buffers}
    state = program.state_dict
    calls = [node for node in program.graph_module.graph.nodes if node.op == "call_function"]
    sizes: dict[LayerKey | None, int] = {layer_key(node): 0 for node in calls}  # graph order; None: outside layers
    counted: set[str] = set()
    for node in calls:
        key = layer_key(node)
        for source in node.all_input_nodes:
            name = parameters.get(source.name)
            if name is not None and name not in counted and isinstance(state.get(name), torch.Tensor):
                counted.add(name)
                owner = key if key is not None or not _reads_subclass_data(node) else _reader_layer(node)
                sizes[owner] += _held_bytes(state[name])
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


def _weightless(tensor: torch.Tensor) -> torch.Tensor:
    """A plain stand-in with ``tensor``'s shape, dtype, device and kind (parameter or not) and one element of
    storage (a tensor subclass becomes a plain tensor of its outer shape and dtype)."""
    stand_in = torch.zeros((), dtype=tensor.dtype, device=tensor.device).expand(tensor.shape)
    return torch.nn.Parameter(stand_in, requires_grad=False) if isinstance(tensor, torch.nn.Parameter) else stand_in


def _held_bytes(tensor: torch.Tensor) -> int:
    """Bytes of ``tensor``'s data, a tensor subclass's inner tensors summed (torchao's quantized weights)."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter):
        return tensor.numel() * tensor.element_size()
    names = tensor.__tensor_flatten__()[0] if hasattr(tensor, "__tensor_flatten__") else []
    return sum(_held_bytes(getattr(tensor, name)) for name in names)


def release_program_weights(program: torch.export.ExportedProgram) -> int:
    """Swap every entry of ``program``'s state dict (parameters and persistent buffers; a tensor subclass, such as
    torchao's quantized weights, becomes a plain stand-in) for a one-element stand-in of the same shape and dtype;
    returns the bytes let go from this program (storage another holder shares lives on). Lifted constants
    are left: they are small, and ExecuTorch hands a method's edge program the same constants dict as the program
    it was made from. The graph is left as it is: shapes and dtypes still read right, but the program computes
    with zeros and must not be run again."""
    released = 0
    table = program.state_dict
    for name, tensor in list(table.items()):
        plain = type(tensor) in (torch.Tensor, torch.nn.Parameter)
        if isinstance(tensor, torch.Tensor) and tensor.numel() > 1 and (not plain or any(tensor.stride())):
            released += _held_bytes(tensor)
            table[name] = _weightless(tensor)
    return released


def release_delegated_weights(graph_module: torch.nn.Module) -> int:
    """Swap the weights of every delegate's original program under ``graph_module`` for stand-ins
    (``release_program_weights``); returns the bytes let go.

    A ``LoweredBackendModule`` keeps the edge program it was lowered from until the program is written, though the
    backend has serialised its weights into its own bytes (XNNPACK: the named data, a copy) and only the graph is
    read again: the emitter maps its debug handles, and ExecuTorch's passes re-run ``executorch_call_delegate`` on
    fake tensors, which need shapes and dtypes only (tested: the written program is byte-identical). The lowered
    modules cannot be run eagerly afterwards: call this only on a program that is going to be written."""
    return sum(release_program_weights(module.original_module)
               for module in graph_module.modules() if type(module).__name__ == "LoweredBackendModule")


class LoweringMemory:
    """What the lowering passes of one program let go of as they go (see the module docstring): one bytes object
    per named-data key across every delegate of every method, no weights in the delegates' original programs, and,
    from the first pass on, none in the traced programs ``traced``."""

    def __init__(self, traced: Iterable[torch.export.ExportedProgram] = ()) -> None:
        self.by_key: dict[str, Any] = {}
        self.merged_bytes = 0  # duplicate named data dropped
        self.released_bytes = 0  # weights swapped for stand-ins
        self.traced = list(traced)

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

    def pass_starts(self, graph_module: torch.nn.Module) -> None:
        """A lowering pass over ``graph_module`` (a method's current edge program) starts, or the last has ended:
        release the traced programs' weights (once: ExecuTorch has made every edge program from them by now), merge
        the named data, release the delegates' weights."""
        for program in self.traced:
            self.released_bytes += release_program_weights(program)
        self.traced = []
        self.adopt(graph_module)
        self.released_bytes += release_delegated_weights(graph_module)


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

        def __init__(self, layer_pass: LayerPass, decides_decomposition: bool, memory: LoweringMemory | None,
                     **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.layer_pass = layer_pass
            self.decides_decomposition = decides_decomposition
            self.memory = memory
            self.partitioned = False

        def partition(self, exported_program):  # noqa: ANN001 - ExecuTorch's signature
            self.partitioned = True
            if self.memory is not None:  # what the previous passes no longer need
                self.memory.pass_starts(exported_program.graph_module)
            return super().partition(exported_program)

        def ops_to_not_decompose(self, ep):  # noqa: ANN001 - ExecuTorch's signature
            # to_edge_transform_and_lower retraces the whole graph for each partitioner that filters which ops to
            # keep from decomposition. The first pass's partitioner of each kind decides (same configs, same
            # answer); the later ones list the same ops without a filter: the graph then holds nothing left to
            # decompose, so their turn costs no retrace.
            ops, check = super().ops_to_not_decompose(ep)
            if self.decides_decomposition and check is not None and not _every_op_passes(ep, set(ops), check):
                return [*ops, *self._size_queries()], check
            # Every node of those ops passes the backend's check (the usual case: linears on weights), so keeping
            # them all is what the check would keep: ExecuTorch then takes its one-decomposition path instead of two
            # more whole-graph retraces per method (EDGE_DO_NOT_DECOMP). Same graph -- for XNNPACK's kept ops
            # (linear, elu, hardswish, prelu, pooling, upsampling, torchao's quant ops), which no decomposition of
            # another op produces, so checking the graph before decomposing suffices.
            return [*ops, *self._size_queries()], None

        def _size_queries(self) -> list:
            # aten.sym_size.int is in ExecuTorch's decomposition table, "decomposes" into itself, and a method with
            # a dynamic dimension keeps one (its runtime shape checks): left in the table, it makes ExecuTorch re-run
            # the whole method's decomposition for every partitioner (a tiny 8da4w decoder lowered one layer per
            # pass: 10 more retraces, 40 s). Listed while the edge program is made (the graph is the same); not once
            # this partitioner has partitioned, when ExecuTorch asks again, to check that every op kept from
            # decomposition was delegated.
            return [] if self.partitioned else [torch.ops.aten.sym_size.int]

        def get_matched_nodes_from_configs(self, ep):  # noqa: ANN001 - ExecuTorch's signature
            kept = []
            for group in super().get_matched_nodes_from_configs(ep):
                ops = {node for node in group if self.layer_pass.owns(node)}
                if ops:  # the group's own ops, plus its constants / inputs that feed them
                    kept.append([node for node in group if node in ops or (
                        node.op != "call_function" and any(user in ops for user in node.users))])
            return kept

    return XnnpackSlicePartitioner


def slice_partitioner(layer_pass: LayerPass, decides_decomposition: bool, memory: LoweringMemory | None = None,
                      **kwargs: Any):
    """An XNNPACK partitioner (``XnnpackPartitioner(**kwargs)``) restricted to ``layer_pass``; pass
    ``decides_decomposition`` for the first pass of each partitioner kind (see ``ops_to_not_decompose``) and one
    ``LoweringMemory`` for every partitioner of a program."""
    return _slice_partitioner_class()(layer_pass, decides_decomposition, memory, **kwargs)
