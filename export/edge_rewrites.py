"""Exact rewrites of a method's edge program, run before partitioning, that let XNNPACK delegate more of it in fewer,
larger partitions.

A node XNNPACK declines splits the partition it sits in, and every partition is a delegate call at run time (with
its inputs and outputs crossing the delegate boundary, and, for a dynamic token count, a re-plan when the count
changes). ExecuTorch 1.5.1's XNNPACK partitioner (``backends/xnnpack/partition/config/generic_node_configs.py``)
declines:

* a ``view_copy`` whose shape holds a symbolic size (``[1, s0, -1, 16]``: a decoder's head split over a dynamic
  number of tokens) -- its ``ViewCopyConfig`` takes concrete sizes with at most one inferred (-1) dimension;
* an ``unsqueeze_copy`` anywhere but on the trailing dimension;
* every ``squeeze_copy`` (it has no config for one);
* every ``expand_copy``, including those that expand a tensor to its own shape (``aten.matmul``'s decomposition
  writes one before each operand of a batched matmul).

``view_shapes`` writes each view, unsqueeze and squeeze of a contiguous tensor whose result has at most one
symbolic size as a ``view_copy`` to concrete sizes with that one size inferred (-1); ``drop_same_shape_expands``
removes the expands of a contiguous tensor to a shape known to be its own. Both leave every value the program
computes as it was: a view with one inferred size is the same view (the size follows from the element count; a
shape with a 0 beside the symbolic size is left alone), and an expand to the same shape copies its input. Of a
tensor in another dim order (channels-last) either is a copy into the contiguous order, which a view is not
(ExecuTorch runs a view in place, on the same bytes): left alone. So is a squeeze of a symbolic size: the program
drops that size exactly when it is 1 at run time (another rank), which no fixed view does, and the shape
environment cannot say whether it can be 1 (it takes every backed size >= 2). A data-dependent (unbacked) size is
never compared at export time (it has no answer there). The tiny LLaVA demo's delegates go from 26 to 19
(``vision_encoder``) and 48 to 28 (``text_decoder``): decode 1.66x the tokens/s, the prefill after the image 1.19x
slower (not profiled; presumably XNNPACK re-planning the larger delegates for each new token count), the export no
faster (README.md, "Export time": benchmarks/edge_rewrites.py).

Both are ``torch.fx`` graph-module passes (``GraphModule -> PassResult``) for ``to_edge_transform_and_lower``'s
``transform_passes``; they change the top-level graph of a method (control-flow bodies are left as they are).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.passes.infra.pass_base import PassResult


def inferred_view_shape(shape: Sequence[int | torch.SymInt]) -> list[int] | None:
    """The sizes of a view to ``shape`` with its one symbolic size (if any) inferred: [1, s0, 4, 16] -> [1, -1, 4,
    16], [2, 3] -> [2, 3]; None when more than one size is symbolic, or when one is and another is 0 (a -1 next
    to a 0 has no single meaning). A symbolic size may be data-dependent (unbacked) and may be 0 at run time: a -1
    among non-zero sizes is 0 then."""
    symbolic = [index for index, size in enumerate(shape) if not isinstance(size, int)]
    if len(symbolic) > 1 or (symbolic and any(size == 0 for size in shape if isinstance(size, int))):
        return None  # (the symbolic size is not asked: a data-dependent one has no answer at export time)
    return [-1 if index in symbolic else int(size) for index, size in enumerate(shape)]


def _squeeze_ops() -> tuple:
    """The edge dialect's squeezes: (all dims, one dim, a list of dims)."""
    from executorch.exir.dialects._ops import ops as exir_ops

    squeeze = exir_ops.edge.aten.squeeze_copy
    return squeeze.default, squeeze.dim, squeeze.dims


def _view_ops() -> tuple[set, object]:
    """(every op ``view_shapes`` rewrites, the edge dialect's view_copy)."""
    from executorch.exir.dialects._ops import ops as exir_ops

    aten = exir_ops.edge.aten
    return {aten.view_copy.default, aten.unsqueeze_copy.default, *_squeeze_ops()}, aten.view_copy.default


def _contiguous(node: object) -> bool:
    """Whether ``node`` is a tensor node known to be contiguous (ExecuTorch: the default dim order), so that a view
    of it, or an expand of it to its own shape, is the same bytes; False for another dim order (channels-last)
    or when it is not known (a data-dependent stride)."""
    from torch._prims_common import is_contiguous_or_false

    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(value, torch.Tensor) and is_contiguous_or_false(value)


def _same_shape(first: Sequence, second: Sequence) -> bool:
    """Whether two shapes are known equal for every input (a data-dependent size is never guessed at)."""
    return len(first) == len(second) and all(statically_known_true(a == b) for a, b in zip(first, second))


def _is_size_node(node: torch.fx.Node) -> bool:
    """A node computing a size: ``aten.sym_size.int`` or Python integer arithmetic on SymInts (``operator.mul``)."""
    if node.op != "call_function":
        return False
    arithmetic = getattr(node.target, "__module__", None) == "_operator"
    return node.target is torch.ops.aten.sym_size.int or (arithmetic and isinstance(node.meta.get("val"), torch.SymInt))


def _erase_if_unused(graph: torch.fx.Graph, args: Sequence) -> None:
    """Erase the size nodes among ``args`` (a node's former arguments, nested once) that nothing reads now, and the
    size nodes they read that nothing else does: sym_size and the SymInt arithmetic over it (``operator.mul``:
    ``4 * s0``)."""
    pending = [item for arg in args for item in (arg if isinstance(arg, (list, tuple)) else (arg,))
               if isinstance(item, torch.fx.Node)]
    erased: set[torch.fx.Node] = set()
    while pending:
        node = pending.pop()
        if node in erased or node.users or not _is_size_node(node):
            continue
        pending.extend(node.all_input_nodes)
        graph.erase_node(node)
        erased.add(node)


def _squeeze_is_fixed(node: torch.fx.Node) -> bool:
    """Whether a squeeze drops the same dimensions for every input: each size it may drop is a concrete int. A
    symbolic size is dropped at run time exactly when it is 1 (a different rank: no fixed view), and whether it can
    be 1 is not known here: the shape environment assumes every backed size >= 2 even where the export allows 1
    (``Dim("T", min=1)``). True for a node that is no squeeze."""
    every_dim, one_dim, some_dims = _squeeze_ops()
    if node.target not in (every_dim, one_dim, some_dims):
        return True
    shape = list(node.args[0].meta["val"].shape)
    if node.target is every_dim:
        dims = range(len(shape))
    else:
        dims = node.args[1] if node.target is some_dims else [node.args[1]]
        dims = [dim % len(shape) for dim in dims] if shape else []
    return all(isinstance(shape[dim], int) for dim in dims)


def _result(graph_module: torch.fx.GraphModule, changed: bool) -> PassResult:
    """A pass's result: a changed graph checked (``Graph.lint``) and its code regenerated."""
    if changed:
        graph_module.graph.lint()
        graph_module.recompile()
    return PassResult(graph_module, changed)


def view_shapes(graph_module: torch.fx.GraphModule) -> PassResult:
    """Every view_copy / unsqueeze_copy / squeeze_copy (of concrete sizes only: ``_squeeze_is_fixed``) of a
    contiguous tensor in the top-level graph whose result has at most one symbolic size becomes
    ``view_copy(input, inferred_view_shape(result shape))`` (the result's meta is unchanged); the size nodes only
    the old shape read are erased. Edge dialect; needs each node's ``meta["val"]``."""
    targets, view = _view_ops()
    graph, changed = graph_module.graph, False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in targets or "val" not in node.meta \
                or not _contiguous(node.args[0]) or not _squeeze_is_fixed(node):
            continue
        shape = inferred_view_shape(list(node.meta["val"].shape))
        if shape is None or (node.target is view and list(node.args[1]) == shape):
            continue
        former = node.args[1:]
        node.target, node.args, node.kwargs = view, (node.args[0], shape), {}
        _erase_if_unused(graph, former)
        changed = True
    return _result(graph_module, changed)


def drop_same_shape_expands(graph_module: torch.fx.GraphModule) -> PassResult:
    """Every expand_copy of the top-level graph from a contiguous tensor to a shape known to be the tensor's own is
    removed, its readers reading the input (one that is the graph's output is kept). Edge dialect; needs each
    node's ``meta["val"]``."""
    from executorch.exir.dialects._ops import ops as exir_ops

    expand = exir_ops.edge.aten.expand_copy.default
    graph, changed = graph_module.graph, False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not expand:
            continue
        source = node.args[0]
        if (not _contiguous(source) or "val" not in node.meta or any(user.op == "output" for user in node.users)
                or not _same_shape(source.meta["val"].shape, node.meta["val"].shape)):
            continue
        former = node.args[1:]
        node.replace_all_uses_with(source)
        graph.erase_node(node)
        _erase_if_unused(graph, former)
        changed = True
    return _result(graph_module, changed)


def xnnpack_rewrites() -> list:
    """The passes above, in order, for ``to_edge_transform_and_lower(transform_passes=...)``."""
    return [view_shapes, drop_same_shape_expands]
